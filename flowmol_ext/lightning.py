"""FlowMolModule: the pretraining LightningModule (loss, optimiser, validation sampling + metrics).

DDP-ready: losses are logged with ``sync_dist=True``; sample metrics are torchmetrics objects whose
states are summed across ranks; each rank samples its share of the validation molecules; nothing
assumes rank 0 except what Lightning itself does (checkpoint writing).
"""

from __future__ import annotations

import copy
import time
from typing import Any

import pytorch_lightning as pl
import torch
from pydantic import Field
from torch import Tensor

from flowmol_ext.batch import MolBatch
from flowmol_ext.config import StrictModel
from flowmol_ext.data.datamodule import DataConfig
from flowmol_ext.model.config import ModelConfig
from flowmol_ext.model.flow import FlowMol
from flowmol_ext.model.sampler import SamplerConfig, sample_molecules


class OptimConfig(StrictModel):
    """Adam with constant learning rate after an optional linear warm-up (FlowMol2 recipe)."""

    lr: float = 2.5e-4
    weight_decay: float = 1e-12
    grad_clip_value: float = 1.0  # clip by value, as FlowMol (Lightning gradient_clip_algorithm="value")
    warmup_steps: int = 0
    # Exponential moving average of the weights (None: off). When on, validation, sampling and every
    # exported model directory use the EMA weights; the decay ramps as min(d, (1+n)/(10+n)) at step n.
    ema_decay: float | None = Field(default=None, gt=0.0, lt=1.0)


class ValidationSamplingConfig(StrictModel):
    """Periodic sampling during validation; off by default on CPU because it is costly."""

    n_molecules: int = 0  # 0 disables; split across ranks
    steps: int = 50
    every_n_val: int = 1  # sample at every k-th validation run


class TrainConfig(StrictModel):
    """Trainer settings. Checkpoints go to ``<run_dir>/checkpoints``; metrics to ``<run_dir>/logs``."""

    run_dir: str = "runs/pretrain_qm9_small"
    seed: int = 0
    max_steps: int = 100_000
    max_epochs: int | None = None
    max_time: str | None = None  # "DD:HH:MM:SS" wall-clock budget
    checkpoint_every_n_steps: int = 500
    val_every_n_steps: int = 1000
    limit_val_batches: int | float = 8
    log_every_n_steps: int = 20
    accelerator: str = "auto"
    devices: int | str = 1
    strategy: str = "auto"
    precision: str = "32-true"
    tensorboard: bool = False
    num_threads: int | None = None  # torch intra-op threads on CPU
    float32_matmul_precision: str = "highest"  # "high" allows TF32 matmuls on Ampere+ GPUs
    init_from: str | None = None  # start a new run from these weights (registry name or model dir)


class PretrainConfig(StrictModel):
    """The whole pretraining config file (configs/flowmol_qm9_*.yaml)."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    sampler: SamplerConfig = SamplerConfig()
    validation_sampling: ValidationSamplingConfig = ValidationSamplingConfig()


class FlowMolModule(pl.LightningModule):
    """Pretrains :class:`FlowMol` with the endpoint flow-matching loss (x 3, a 0.4, c 1, e 2)."""

    def __init__(self, cfg: PretrainConfig | dict[str, Any], n_atoms_hist: list[int] | None = None,
                 train_smiles: set[str] | None = None) -> None:
        super().__init__()
        if isinstance(cfg, dict):
            cfg = PretrainConfig.model_validate(cfg)
        self.cfg = cfg
        self.save_hyperparameters({"cfg": cfg.model_dump(mode="json"), "n_atoms_hist": n_atoms_hist})
        self.model = FlowMol(cfg.model)
        self.model.metadata = {"n_atoms_hist": n_atoms_hist}
        self.ema = copy.deepcopy(self.model).requires_grad_(False) if cfg.optim.ema_decay is not None else None
        self.train_smiles = train_smiles
        self._t0 = time.time()
        self._n_val_runs = 0

    @property
    def export_model(self) -> FlowMol:
        """The weights that validation, sampling and model directories use: the EMA copy when on."""
        return self.ema if self.ema is not None else self.model

    def reset_ema(self) -> None:
        """Restart the average at the current weights (after loading ``init_from`` weights)."""
        if self.ema is not None:
            self.ema.load_state_dict(self.model.state_dict())

    # -- training -------------------------------------------------------------------------------
    def training_step(self, batch: tuple[MolBatch, Tensor], batch_idx: int) -> Tensor:
        mols, x0 = batch
        terms = self.model.training_loss(mols, x0)
        bs = mols.num_graphs
        self.log("train/loss", terms.total, prog_bar=True, batch_size=bs)
        for k in ("x", "a", "c", "e"):
            self.log(f"train/loss_{k}", getattr(terms, k), batch_size=bs)
        self.log("train/wall_time_s", time.time() - self._t0, batch_size=bs, reduce_fx="max")
        return terms.total

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # Update right after the step, before any callback (checkpointing) sees this batch's weights.
        super().optimizer_step(*args, **kwargs)
        self.update_ema()

    def update_ema(self) -> None:
        """ema ← ema + (1 − d)(θ − ema), d = min(ema_decay, (1+n)/(10+n)) at global step n."""
        if self.ema is None:
            return
        n = int(self.global_step)
        decay = min(float(self.cfg.optim.ema_decay), (1.0 + n) / (10.0 + n))
        with torch.no_grad():
            ema_p = list(self.ema.parameters())
            torch._foreach_lerp_(ema_p, list(self.model.parameters()), 1.0 - decay)
            for eb, b in zip(self.ema.buffers(), self.model.buffers()):
                eb.copy_(b)

    def validation_step(self, batch: tuple[MolBatch, Tensor], batch_idx: int) -> None:
        mols, x0 = batch
        terms = self.export_model.training_loss(mols, x0)
        bs = mols.num_graphs
        self.log("val/loss", terms.total, prog_bar=True, batch_size=bs, sync_dist=True)
        for k in ("x", "a", "c", "e"):
            self.log(f"val/loss_{k}", getattr(terms, k), batch_size=bs, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        vs = self.cfg.validation_sampling
        self._n_val_runs += 1
        if vs.n_molecules <= 0 or self.trainer.sanity_checking or (self._n_val_runs % vs.every_n_val):
            return
        from flowmol_ext.metrics import (  # rdkit needed only here
            AtomStability,
            MoleculeStability,
            Novelty,
            Uniqueness,
            Validity,
        )

        world = max(1, self.trainer.world_size)
        n_local = max(1, vs.n_molecules // world)
        scfg = self.cfg.sampler.model_copy(update={"steps": vs.steps})
        seed = int(self.global_step) * 1000 + int(self.global_rank)
        mols = sample_molecules(self.export_model, n_local, scfg, seed=seed, progress=False, device=self.device)
        metrics = {"atom_stability": AtomStability(), "mol_stability": MoleculeStability(),
                   "validity": Validity(), "uniqueness": Uniqueness()}
        if self.train_smiles:
            metrics["novelty"] = Novelty(self.train_smiles)
        for name, m in metrics.items():
            m = m.to(self.device)
            m.update(mols)
            self.log(f"val_sample/{name}", m.compute(), sync_dist=False)  # compute() already syncs states

    # -- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        o = self.cfg.optim
        opt = torch.optim.Adam(self.model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        if o.warmup_steps <= 0:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / o.warmup_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class ExportModelDir(pl.Callback):
    """Write a self-describing model directory (config.yaml + weights, no optimiser state) beside
    every checkpoint: ``<run_dir>/model_last``, plus a snapshot every ``snapshot_every_n_steps``
    under ``<run_dir>/snapshots/step_XXXXXXX`` for learning curves."""

    def __init__(self, run_dir: str, snapshot_every_n_steps: int = 0) -> None:
        self.run_dir = run_dir
        self.snapshot_every = snapshot_every_n_steps

    def _export(self, trainer: pl.Trainer, module: FlowMolModule, name: str) -> None:
        from pathlib import Path

        from flowmol_ext.pretrained import save_model_dir

        extra = {"n_atoms_hist": module.model.metadata.get("n_atoms_hist"), "global_step": int(trainer.global_step),
                 "wall_time_s": time.time() - module._t0, "ema_decay": module.cfg.optim.ema_decay}
        save_model_dir(module.export_model, Path(self.run_dir) / name, extra=extra)

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        if not trainer.is_global_zero:
            return
        step = int(trainer.global_step)
        if self.snapshot_every and step % self.snapshot_every == 0:
            self._export(trainer, module, f"snapshots/step_{step:07d}")

    def on_save_checkpoint(self, trainer: pl.Trainer, module: pl.LightningModule, checkpoint: dict) -> None:
        if trainer.is_global_zero:
            self._export(trainer, module, "model_last")


def _next_log_version(log_root: Any) -> str:
    existing = sorted(p.name for p in log_root.glob("v*") if p.is_dir()) if log_root.exists() else []
    return f"v{len(existing)}"


def pretrain(cfg: PretrainConfig, resume: bool = False, snapshot_every_n_steps: int = 0) -> Any:
    """Run (or resume) pretraining into ``cfg.train.run_dir``. Returns the run directory Path."""
    from pathlib import Path

    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    from flowmol_ext.config import dump_config
    from flowmol_ext.data.datamodule import QM9DataModule
    from flowmol_ext.data.store import load_stats

    tc = cfg.train
    run_dir = Path(tc.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    last_ckpt = ckpt_dir / "last.ckpt"
    if resume and not last_ckpt.is_file():
        raise FileNotFoundError(f"cannot resume: no checkpoint at {last_ckpt}")
    if not resume and last_ckpt.is_file():
        raise ValueError(f"{run_dir} already holds a run; pass --resume {run_dir} to continue it, "
                         "or choose another train.run_dir")
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    torch.set_float32_matmul_precision(tc.float32_matmul_precision)
    pl.seed_everything(tc.seed, workers=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")

    stats = load_stats(cfg.data.data_dir, "train")
    train_smiles = None
    if cfg.validation_sampling.n_molecules > 0:
        from flowmol_ext.data.store import load_train_smiles

        train_smiles = load_train_smiles(cfg.data.data_dir)
    module = FlowMolModule(cfg, n_atoms_hist=[int(v) for v in stats.n_atoms_hist.tolist()],
                           train_smiles=train_smiles)
    if tc.init_from and not resume:
        from flowmol_ext.pretrained import load_pretrained

        init = load_pretrained(tc.init_from)
        if init.cfg != cfg.model:
            raise ValueError(f"train.init_from={tc.init_from!r} has a different model config than this run's 'model'")
        module.model.load_state_dict(init.state_dict())
        module.reset_ema()
    dm = QM9DataModule(cfg.data)
    log_root = run_dir / "logs"
    version = _next_log_version(log_root)
    loggers: list[Any] = [CSVLogger(str(run_dir), name="logs", version=version)]
    if tc.tensorboard:
        loggers.append(TensorBoardLogger(str(run_dir), name="tb", version=version))
    callbacks = [
        ModelCheckpoint(dirpath=str(ckpt_dir), filename="step{step:07d}", save_last=True, save_top_k=1,
                        every_n_train_steps=tc.checkpoint_every_n_steps, auto_insert_metric_name=False),
        ModelCheckpoint(dirpath=str(ckpt_dir), filename="best-step{step:07d}-val{val/loss:.4f}", monitor="val/loss",
                        mode="min", save_top_k=1, auto_insert_metric_name=False),
        ExportModelDir(str(run_dir), snapshot_every_n_steps),
    ]
    trainer = pl.Trainer(
        default_root_dir=str(run_dir), max_steps=tc.max_steps, max_epochs=tc.max_epochs, max_time=tc.max_time,
        accelerator=tc.accelerator, devices=tc.devices, strategy=tc.strategy, precision=tc.precision,
        gradient_clip_val=cfg.optim.grad_clip_value, gradient_clip_algorithm="value",
        val_check_interval=tc.val_every_n_steps, check_val_every_n_epoch=None,
        limit_val_batches=tc.limit_val_batches, log_every_n_steps=tc.log_every_n_steps,
        logger=loggers, callbacks=callbacks, num_sanity_val_steps=0, enable_progress_bar=True,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=str(last_ckpt) if resume else None)
    # Final export so the run always ends with a loadable model directory.
    if trainer.is_global_zero:
        callbacks[2]._export(trainer, module, "model_last")
    return run_dir
