"""The molecular AM stage under DDP (2 CPU processes, gloo) equals one process on the same total trajectories.

Each rank samples its own trajectories (seed from the stage, the step and the rank); DDP averages the gradients.
The reference computes, in this process, the loss of exactly those two trajectory batches (THE AM step function
with the ranks' seeds), averages their gradients, and takes the same Adam step.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fdc_mol.fdc.adjoint_matching import am_step_loss

ROOT = Path(__file__).resolve().parents[3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _reference_params() -> list[torch.Tensor]:
    from tests.fdc_mol.molecular.ddp_worker import AM, LR, setup

    flow, base, stage = setup()
    flow.train()
    params = [p for p in flow.model.parameters() if p.requires_grad]
    grads = [torch.zeros_like(p) for p in params]
    for rank in (0, 1):
        seed = stage.seed * 100_003 + 0 * 31 + rank * 7_919  # the module's per-(step, rank) seed
        out = am_step_loss(flow, base, stage.terminal_grad, AM, lam=stage.lam,
                           generator=torch.Generator().manual_seed(seed),
                           timestep_generator=torch.Generator().manual_seed(seed))
        for g, gr in zip(grads, torch.autograd.grad(out.loss, params)):
            g += gr / 2
    opt = torch.optim.Adam(params, lr=LR)
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    return [p.detach().clone() for p in params]


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_on_the_same_trajectories(tmp_path: Path) -> None:
    out = tmp_path / "ddp_params.pt"
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
               "RANK": str(rank), "LOCAL_RANK": str(rank), "NODE_RANK": "0", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(ROOT)}
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "tests/fdc_mol/molecular/ddp_worker.py"),
                                       str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    ddp = torch.load(out)
    ref = _reference_params()
    start = [p for p in __import__("tests.fdc_mol.molecular.ddp_worker", fromlist=["setup"]).setup()[0]
             .model.parameters() if p.requires_grad]
    moved = max(float((a - b.detach()).abs().max()) for a, b in zip(ref, start))
    assert moved > 1e-4  # the step changed the weights
    for a, b in zip(ddp, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
