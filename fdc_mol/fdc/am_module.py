"""Adjoint matching as a LightningModule: one AM optimizer step per training step.

Trajectories are generated on the fly by the current (fine) model with the memoryless SDE, the lean
adjoint uses the frozen base model π_{k−1}, and the loss is [AM]'s with the "+σã" sign
(:mod:`fdc_mol.fdc.adjoint_matching`). Lightning supplies logging, the progress bar, checkpoints
and device/strategy handling, exactly as in pretraining.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .adjoint_matching import AMConfig, am_loss_for_trajectory, lean_adjoint, timestep_subset
from .flow import Trajectory, per_sample_sqnorm
from .flowmol_flow import FlowMolFlow


class _Steps(Dataset):
    """A dataset of n empty items: AM generates its own data, Lightning only needs the step count."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class AdjointMatchingModule(pl.LightningModule):
    """Fine-tunes ``fine`` toward the terminal gradient ``terminal_grad(x1, traj)`` (= ∇g/η, (N, 3))."""

    def __init__(self, fine: FlowMolFlow, base: FlowMolFlow, terminal_grad: Callable[[Tensor, Trajectory], Tensor],
                 am: AMConfig, lr: float, lam: float, seed: int) -> None:
        super().__init__()
        fine.model.train()  # load_pretrained returns eval mode; the network has no dropout/batch norm
        self.fine = fine
        object.__setattr__(self, "base", base)  # frozen π_{k−1}: not a submodule, not in checkpoints
        self.terminal_grad = terminal_grad
        self.am = am
        self.lr = lr
        self.lam = lam
        self.seed = seed

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Steps(10**9), batch_size=1)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        gen = torch.Generator(device=self.device).manual_seed(self.seed * 100_003 + int(self.global_step))
        traj = self.fine.sample(self.am.n_traj, self.am.steps, memoryless=True, record=True, generator=gen)
        g = torch.nan_to_num(self.terminal_grad(traj.x1.detach(), traj), nan=0.0)
        adj, v_base = lean_adjoint(self.base, traj, g)
        idx = timestep_subset(self.am.steps, self.am.final_frac, self.am.random_frac,
                              torch.Generator().manual_seed(self.seed + int(self.global_step)))
        clip = None if self.am.lct is None else self.am.lct * self.lam**2
        loss = am_loss_for_trajectory(self.fine, traj, adj, v_base, idx, clip=clip)
        self.log("am/loss", loss, prog_bar=True, batch_size=traj.n)
        self.log("am/terminal_grad_norm", per_sample_sqnorm(g, traj).sqrt().mean(), batch_size=traj.n)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.fine.trainable_parameters(), lr=self.lr)
