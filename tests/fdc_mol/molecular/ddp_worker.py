"""One rank of the DDP test (run by tests/fdc_mol/molecular/test_ddp.py with LOCAL_RANK etc. set).

Runs one adjoint-matching step of the Lightning solver on the tiny network and, on rank 0, saves the trainable
parameters after the step to the file given as argv[1]."""

from __future__ import annotations

import os
import sys

import torch

from fdc_mol.fdc.adjoint_matching import AMConfig
from fdc_mol.fdc.loop import Stage
from fdc_mol.fdc.utilities import Fitted
from fdc_mol.molecular.am_module import LightningAMSolver
from fdc_mol.molecular.flowmol_flow import FlowMolFlow
from fdc_mol.molecular.reward_oracle import reward_oracle
from tests.fdc_mol.test_finetune import CompactnessReward, tiny_model

AM = AMConfig(n_traj=4, steps=6, lct=None, grad_clip_norm=None)
LR = 1e-2
STAGE_SEED = 11


def setup() -> tuple[FlowMolFlow, FlowMolFlow, Stage]:
    torch.set_num_threads(1)
    flow = FlowMolFlow(tiny_model(seed=1), n_atoms=5, trainable="positions")
    oracle = reward_oracle(CompactnessReward())

    def grad(x: torch.Tensor, traj) -> torch.Tensor:  # noqa: ANN001
        return oracle(x, traj)[1]

    stage = Stage(k=1, eta=1.0, fitted=Fitted(0.0, lambda x, t: x), terminal_grad=grad, lam=1.0, steps=1,
                  seed=STAGE_SEED)
    return flow, flow.copy_frozen(), stage


def main() -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    flow, base, stage = setup()
    solver = LightningAMSolver(AM, LR, accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto",
                               progress=False)
    solver.solve(flow, base, stage)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        torch.save([p.detach().clone() for p in flow.model.parameters() if p.requires_grad], sys.argv[1])


if __name__ == "__main__":
    main()
