"""Adjoint matching on molecules through Lightning: a thin LightningModule around THE AM step
(:func:`fdc_mol.fdc.adjoint_matching.am_step_loss`) and the inner solver that runs it per FDC stage.

Lightning supplies logging, the progress bar, gradient clipping, devices and strategies (DDP: each rank
samples its own trajectories with a rank-dependent seed and Lightning averages the gradients). The Adam
state is carried from stage to stage (as in the 2-D settings and the paper's code) and stored with each
stage, so a resumed run continues the same optimizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from fdc_mol.fdc.adjoint_matching import AMConfig, am_step_loss
from fdc_mol.fdc.flow import FlowModel
from fdc_mol.fdc.loop import Stage

__all__ = ["AdjointMatchingModule", "LightningAMSolver"]


class _Steps(Dataset):
    """n empty items: AM generates its own data, Lightning only needs the step count."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class AdjointMatchingModule(pl.LightningModule):
    """One AM optimizer step per training step: fresh trajectories of ``fine``, lean adjoint through ``base``.

    optimizer_state: an Adam state dict to continue (from the previous stage), or None.
    """

    def __init__(self, fine: FlowModel, base: FlowModel, stage: Stage, am: AMConfig, lr: float,
                 optimizer_state: dict[str, Any] | None = None) -> None:
        super().__init__()
        fine.train()  # load_pretrained returns eval mode; the network has no dropout/batch norm
        self.fine = fine
        object.__setattr__(self, "base", base)  # frozen π_{k−1}: not a submodule, not in checkpoints
        object.__setattr__(self, "stage", stage)
        self.am, self.lr = am, float(lr)
        self.optimizer_state = optimizer_state

    def train_dataloader(self) -> DataLoader:
        # One item per optimizer step; no distributed sampler (every rank makes its own trajectories).
        return DataLoader(_Steps(max(1, self.stage.steps)), batch_size=1)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        seed = self.stage.seed * 100_003 + int(self.global_step) * 31 + int(self.global_rank) * 7_919
        gen = torch.Generator(device=self.device).manual_seed(seed)
        out = am_step_loss(self.fine, self.base, self.stage.terminal_grad, self.am, lam=self.stage.lam,
                           generator=gen, timestep_generator=torch.Generator().manual_seed(seed))
        self.log("am/loss", out.loss, prog_bar=True, batch_size=self.am.n_traj)
        for key, val in out.metrics.items():
            if key != "loss":
                self.log(f"am/{key}", val, batch_size=self.am.n_traj, prog_bar=key == "n_signal")
        self.step_metrics.append(out.metrics)
        return out.loss

    def on_train_start(self) -> None:
        self.step_metrics: list[dict[str, float]] = []

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        norm = torch.nn.utils.get_total_norm([p.grad for p in self.fine.parameters() if p.grad is not None])
        self.log("am/param_grad_norm", norm, batch_size=self.am.n_traj)
        if self.step_metrics:
            self.step_metrics[-1]["param_grad_norm"] = float(norm)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        opt = torch.optim.Adam([p for p in self.fine.parameters() if p.requires_grad], lr=self.lr)
        if self.optimizer_state is not None:
            opt.load_state_dict(self.optimizer_state)
        return opt


class LightningAMSolver:
    """The FDC inner solver for molecules: ``stage.steps`` AM steps in one Lightning ``fit`` per stage.

    log_dir: each stage's CSV log goes to ``log_dir/stage_KKK``. grad_clip_norm: Lightning's norm clip.
    accelerator/devices/strategy: Lightning's (cpu, 1, "auto" by default; "ddp" for several processes).
    """

    def __init__(self, am: AMConfig, lr: float, *, log_dir: str | Path | None = None, accelerator: str = "cpu",
                 devices: int = 1, strategy: str = "auto", progress: bool = True) -> None:
        if not lr > 0:
            raise ValueError(f"learning rate must be > 0, got {lr}")
        self.am, self.lr = am, float(lr)
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.accelerator, self.devices, self.strategy, self.progress = accelerator, devices, strategy, progress
        self.optimizer_state: dict[str, Any] | None = None

    def solve(self, fine: FlowModel, base: FlowModel, stage: Stage) -> dict[str, float]:
        module = AdjointMatchingModule(fine, base, stage, self.am, self.lr, self.optimizer_state)
        logger: Any = False
        if self.log_dir is not None:
            logger = pl.loggers.CSVLogger(str(self.log_dir), name=f"stage_{stage.k:03d}", version="")
        trainer = pl.Trainer(
            max_steps=stage.steps, accelerator=self.accelerator, devices=self.devices, strategy=self.strategy,
            logger=logger, enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
            gradient_clip_val=self.am.grad_clip_norm, gradient_clip_algorithm="norm", log_every_n_steps=1,
            enable_progress_bar=self.progress, use_distributed_sampler=False, max_epochs=-1,
        )
        trainer.fit(module)
        self.optimizer_state = trainer.optimizers[0].state_dict()
        rows = module.step_metrics
        keys = rows[0].keys() if rows else []
        return {k: float(sum(r.get(k, 0.0) for r in rows) / len(rows)) for k in keys}

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer_state = state.get("optimizer")
