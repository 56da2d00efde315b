"""FlowMolModule: the pretraining LightningModule (loss, optimiser, validation sampling + metrics).

DDP-ready: losses are logged with ``sync_dist=True``; sample metrics are torchmetrics objects whose
states are summed across ranks; each rank samples its share of the validation molecules; nothing
assumes rank 0 except what Lightning itself does (checkpoint writing).

Resumable exactly: the data order and priors are functions of (seed, epoch, position) (see
:mod:`flowmol_ext.data.datamodule`), and each training step reseeds the global torch RNG from
(seed, global step, rank), so a run resumed from a checkpoint at step k takes the same steps as an
uninterrupted run (bit-identical on CPU with the same thread count). ``--resume`` falls back to the
newest intact ``step*.ckpt`` when ``last.ckpt`` is truncated or corrupt. SIGTERM/SIGINT stop at the
next batch boundary after saving ``last.ckpt`` (see :mod:`flowmol_ext.signals`).
"""

from __future__ import annotations

import copy
import logging
import math
import re
import time
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pydantic import Field, field_validator
from pytorch_lightning.plugins.io import TorchCheckpointIO
from torch import Tensor

from flowmol_ext.batch import MolBatch
from flowmol_ext.config import StrictModel
from flowmol_ext.data.datamodule import DataConfig, mix_seed
from flowmol_ext.model.config import ModelConfig
from flowmol_ext.model.flow import FlowMol
from flowmol_ext.model.sampler import SamplerConfig, sample_molecules

log = logging.getLogger(__name__)


class OptimConfig(StrictModel):
    """Adam with an optional linear warm-up, then a constant learning rate (FlowMol2 recipe) or a
    cosine decay to ``final_lr_frac * lr`` over ``decay_steps`` steps (held there afterwards)."""

    lr: float = Field(default=2.5e-4, gt=0.0)
    weight_decay: float = Field(default=1e-12, ge=0.0)
    grad_clip_value: float = Field(default=1.0, gt=0.0)  # clip by value, as FlowMol (gradient_clip_algorithm="value")
    warmup_steps: int = Field(default=0, ge=0)
    # Cosine decay after the warm-up: lr(s) = lr * (f + (1 - f) * (1 + cos(pi * min(1, s'/D))) / 2),
    # s' = s - warmup_steps, D = decay_steps, f = final_lr_frac. None: constant (the FlowMol2 recipe).
    # Steps count from the start of this run (a continuation with init_from decays from its first step).
    decay_steps: int | None = Field(default=None, ge=1)
    final_lr_frac: float = Field(default=0.1, ge=0.0, le=1.0)
    # Exponential moving average of the weights (None: off). When on, validation, sampling and every
    # exported model directory use the EMA weights; the decay ramps as min(d, (1+n)/(10+n)) at step n.
    ema_decay: float | None = Field(default=None, gt=0.0, lt=1.0)


class ValidationSamplingConfig(StrictModel):
    """Periodic sampling during validation; off by default on CPU because it is costly."""

    n_molecules: int = Field(default=0, ge=0)  # 0 disables; split across ranks
    steps: int = Field(default=50, ge=1)
    every_n_val: int = Field(default=1, ge=1)  # sample at every k-th validation run


class TrainConfig(StrictModel):
    """Trainer settings. Checkpoints go to ``<run_dir>/checkpoints``; metrics to ``<run_dir>/logs``."""

    run_dir: str = "runs/pretrain_qm9_small"
    seed: int = 0
    max_steps: int = Field(default=100_000, ge=-1)  # -1: no step limit (then set max_epochs or max_time)
    max_epochs: int | None = Field(default=None, ge=0)
    max_time: str | None = None  # "DD:HH:MM:SS" wall-clock budget
    checkpoint_every_n_steps: int = Field(default=500, ge=1)
    val_every_n_steps: int = Field(default=1000, ge=1)
    limit_val_batches: int | float = Field(default=8, ge=0)  # int: batches; float in [0, 1]: fraction
    log_every_n_steps: int = Field(default=20, ge=1)
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    devices: int | str = 1
    strategy: str = "auto"
    precision: Literal["32-true", "32", "64-true", "64", "16-mixed", "bf16-mixed", "16-true", "bf16-true"] = "32-true"
    tensorboard: bool = False
    num_threads: int | None = Field(default=None, ge=1)  # torch intra-op threads on CPU
    float32_matmul_precision: Literal["highest", "high", "medium"] = "highest"  # "high": TF32 on Ampere+
    init_from: str | None = None  # start a new run from these weights (registry name or model dir)
    # torch.compile the network (inductor, dynamic shapes): train step 1.36-1.60x on CPU after minutes of compiling
    compile: bool = False

    @field_validator("max_time")
    @classmethod
    def _max_time_format(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"\d+:\d{1,2}:\d{1,2}:\d{1,2}", str(v).strip()):
            raise ValueError("must be DD:HH:MM:SS, e.g. 00:12:00:00 for 12 hours")
        return None if v is None else str(v).strip()

    @field_validator("limit_val_batches")
    @classmethod
    def _limit_val(cls, v: int | float) -> int | float:
        if isinstance(v, float) and v > 1.0:
            raise ValueError("a float is a fraction of the validation set and must be in [0, 1]; use an int for "
                             "a number of batches")
        return v

    @field_validator("devices")
    @classmethod
    def _devices(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1 and v != -1:
            raise ValueError("must be >= 1, -1 (all) or 'auto'")
        if isinstance(v, str) and v != "auto" and not re.fullmatch(r"-1|\d+|(\d+,)*\d+,?", v.strip()):
            raise ValueError("must be an int, 'auto', or a comma-separated list of device ids")
        return v


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
        if cfg.train.compile:  # a flag outside the module's state: checkpoints are those of the eager network
            self.model.set_compile(True)
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
        # The step's random draws (times, masks) depend on (seed, step, rank) only: exact resume.
        torch.manual_seed(mix_seed(self.cfg.train.seed, int(self.global_step), int(self.global_rank), 5))
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
        # The same draws at every validation (and in a resumed run): val loss curves compare models.
        torch.manual_seed(mix_seed(self.cfg.train.seed, int(batch_idx), int(self.global_rank), 6))
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
        if o.warmup_steps <= 0 and o.decay_steps is None:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(o, s))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def lr_factor(o: OptimConfig, step: int) -> float:
    """Multiplier of ``o.lr`` for optimiser step ``step`` (0-based): linear warm-up, then constant
    or cosine decay to ``o.final_lr_frac`` (see :class:`OptimConfig`)."""
    if o.warmup_steps > 0 and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.decay_steps is None:
        return 1.0
    progress = min(1.0, (step - o.warmup_steps) / o.decay_steps)
    return o.final_lr_frac + (1.0 - o.final_lr_frac) * 0.5 * (1.0 + math.cos(math.pi * progress))


class ExportModelDir(pl.Callback):
    """Write a self-describing model directory (config.yaml + weights, no optimiser state) beside
    every checkpoint: ``<run_dir>/model_last``, plus a snapshot every ``snapshot_every_n_steps``
    under ``<run_dir>/snapshots/step_XXXXXXX`` for learning curves."""

    def __init__(self, run_dir: str, snapshot_every_n_steps: int = 0) -> None:
        self.run_dir = run_dir
        self.snapshot_every = snapshot_every_n_steps

    def _export(self, trainer: pl.Trainer, module: FlowMolModule, name: str) -> None:

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


def _next_log_version(log_root: Path) -> str:
    existing = sorted(p.name for p in log_root.glob("v*") if p.is_dir()) if log_root.exists() else []
    return f"v{len(existing)}"


_STEP_RE = re.compile(r"step(\d+)")


def _ckpt_step(path: Path) -> int:
    m = _STEP_RE.search(path.name)
    return int(m.group(1)) if m else -1


def _read_checkpoint_step(path: Path) -> int:
    """Global step of a checkpoint; raises ``ValueError`` naming the file if it is truncated/corrupt."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)  # our own run's file
    except Exception as err:  # noqa: BLE001 - RuntimeError, EOFError, UnpicklingError ...
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{path}: truncated or corrupt checkpoint ({type(err).__name__}: {first})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        raise ValueError(f"{path}: not a Lightning checkpoint (no state_dict / global_step)")
    return int(ckpt["global_step"])


def find_resume_checkpoint(ckpt_dir: Path) -> tuple[Path, int, list[Path]]:
    """The checkpoint to resume from: ``last.ckpt``, or the newest intact ``step*.ckpt`` when it is
    missing, truncated or corrupt (logged). Returns (path, global step, the corrupt files seen).
    Raises ``FileNotFoundError`` naming the folder when no intact checkpoint is there."""
    ckpt_dir = Path(ckpt_dir)
    last = ckpt_dir / "last.ckpt"
    candidates = ([last] if last.is_file() else []) + sorted(ckpt_dir.glob("step*.ckpt"), key=_ckpt_step,
                                                             reverse=True)
    problems: list[str] = []
    corrupt: list[Path] = []
    for path in candidates:
        try:
            step = _read_checkpoint_step(path)
        except ValueError as err:
            log.warning("%s; trying an older checkpoint", err)
            problems.append(str(err))
            corrupt.append(path)
            continue
        if path != last:
            why = "is truncated or corrupt" if last.is_file() else "is missing"
            log.warning("resuming from %s (step %d) because %s %s", path, step, last, why)
        return path, step, corrupt
    detail = f" ({'; '.join(problems)})" if problems else ""
    raise FileNotFoundError(f"cannot resume: no intact checkpoint (last.ckpt or step*.ckpt) in {ckpt_dir}{detail}")


def _clear_after_resume_point(ckpt_dir: Path, step: int, corrupt: list[Path]) -> None:
    """Before resuming at ``step``: move corrupt checkpoints aside (``*.corrupt``) and remove the
    step/best checkpoints of later steps (the resumed run replays those steps), so Lightning writes
    ``last.ckpt`` and the rest under their own names instead of ``last-v1.ckpt``."""
    for path in corrupt:
        aside = path.with_name(path.name + ".corrupt")
        path.replace(aside)
        log.warning("moved the corrupt checkpoint %s aside to %s", path, aside)
    for path in list(ckpt_dir.glob("step*.ckpt")) + list(ckpt_dir.glob("best-*.ckpt")):
        if _ckpt_step(path) > step:
            path.unlink(missing_ok=True)
            log.info("removed %s: a checkpoint of steps after the resume point (%d)", path, step)


def _trim_replayed_logs(log_root: Path, from_step: int) -> None:
    """Drop rows with ``step >= from_step`` from earlier log versions: a resumed run replays them."""
    import csv
    import io

    from flowmol_ext.io_utils import atomic_write_text

    for metrics in sorted(log_root.glob("v*/metrics.csv")):
        with open(metrics, newline="") as fh:
            rows = list(csv.reader(fh))
        if not rows or "step" not in rows[0]:
            continue
        col = rows[0].index("step")
        keep = [r for r in rows[1:] if not (len(r) > col and r[col].strip() and int(float(r[col])) >= from_step)]
        if len(keep) == len(rows) - 1:
            continue
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([rows[0], *keep])
        atomic_write_text(metrics, buf.getvalue())
        log.info("%s: removed %d row(s) of steps >= %d (replayed by the resumed run)", metrics,
                 len(rows) - 1 - len(keep), from_step)


def _remove_stale_checkpoints(ckpt_dir: Path, keep: set[Path]) -> None:
    """Remove ``best-*.ckpt`` / ``step*.ckpt`` files that are not the current best / latest."""
    keep_resolved = {Path(k).resolve() for k in keep if k}
    for path in list(ckpt_dir.glob("best-*.ckpt")) + list(ckpt_dir.glob("step*.ckpt")):
        if path.resolve() not in keep_resolved:
            path.unlink(missing_ok=True)
            log.info("removed stale checkpoint %s", path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written like every other output: temporary file in the same folder,
    fsync, rename (:func:`flowmol_ext.io_utils.atomic_torch_save`). A full disk raises ``OSError``
    and leaves the previous ``last.ckpt`` intact instead of a truncated one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        from flowmol_ext.io_utils import atomic_torch_save

        atomic_torch_save(checkpoint, Path(path))


class StopOnSignal(pl.Callback):
    """At the batch boundary after SIGTERM/SIGINT (see :func:`flowmol_ext.signals.deferred`): save
    ``last.ckpt`` (atomically) and raise :class:`~flowmol_ext.signals.Interrupted`."""

    def __init__(self, last_ckpt: Path) -> None:
        self.last_ckpt = Path(last_ckpt)

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        from flowmol_ext import signals

        sig = signals.take()
        if sig is None:
            return
        if trainer.is_global_zero:
            from flowmol_ext.io_utils import atomic_torch_save

            ckpt = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            atomic_torch_save(ckpt, self.last_ckpt)
            log.warning("received %s: saved %s at step %d", signals.Interrupted(sig).name, self.last_ckpt,
                        int(trainer.global_step))
        raise signals.Interrupted(sig)


def check_pretrain_config(cfg: PretrainConfig) -> None:
    """Checks that need the machine (not only the file): the accelerator exists, the data is there,
    the run directory can be written. Raises ``ValueError`` naming the key; run before any output."""
    tc = cfg.train
    if tc.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.accelerator: '{tc.accelerator}' requested but no CUDA GPU is available "
                         "(torch.cuda.is_available() is False); use 'cpu' or 'auto'")
    if tc.accelerator == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("train.accelerator: 'mps' requested but Apple MPS is not available; use 'cpu' or 'auto'")
    if tc.max_steps == -1 and tc.max_epochs is None and tc.max_time is None:
        raise ValueError("train.max_steps: -1 (no limit) needs train.max_epochs or train.max_time")
    from flowmol_ext.data.store import load_stats

    try:
        load_stats(cfg.data.data_dir, "train")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"data.data_dir: {err} (run `fdc-mol data qm9 --data-dir {cfg.data.data_dir}`)") \
            from None
    from flowmol_ext.io_utils import check_writable_dir

    check_writable_dir(Path(tc.run_dir), "train.run_dir")


def pretrain(cfg: PretrainConfig, resume: bool = False, snapshot_every_n_steps: int = 0) -> Path:
    """Run (or resume) pretraining into ``cfg.train.run_dir``. Returns the run directory Path.

    SIGTERM / SIGINT stop training at the next batch boundary after saving ``last.ckpt`` and raise
    :class:`~flowmol_ext.signals.Interrupted` (exit 128 + signum from the CLI).
    """
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    from flowmol_ext import signals
    from flowmol_ext.config import dump_config
    from flowmol_ext.data.datamodule import QM9DataModule
    from flowmol_ext.data.store import load_stats

    tc = cfg.train
    run_dir = Path(tc.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    last_ckpt = ckpt_dir / "last.ckpt"
    check_pretrain_config(cfg)
    resume_from: Path | None = None
    if resume:
        resume_from, resume_step, corrupt = find_resume_checkpoint(ckpt_dir)
    elif last_ckpt.is_file() or any(ckpt_dir.glob("step*.ckpt")):
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
        # The loss weights and the train-time distortion shape training only, not the network or its interpolant:
        # a run may change them and still start from these weights (e.g. the distortion ablation).
        training_only = {"loss_weights", "distortion"}
        if init.cfg.model_dump(exclude=training_only) != cfg.model.model_dump(exclude=training_only):
            raise ValueError(f"train.init_from={tc.init_from!r} has a different model config than this run's 'model'")
        module.model.load_state_dict(init.state_dict())
        module.reset_ema()
    dm = QM9DataModule(cfg.data, seed=tc.seed)
    log_root = run_dir / "logs"
    if resume_from is not None:
        _clear_after_resume_point(ckpt_dir, resume_step, corrupt)
        _trim_replayed_logs(log_root, resume_step)
    version = _next_log_version(log_root)
    loggers: list[Any] = [CSVLogger(str(run_dir), name="logs", version=version)]
    if tc.tensorboard:
        loggers.append(TensorBoardLogger(str(run_dir), name="tb", version=version))
    step_ckpt = ModelCheckpoint(dirpath=str(ckpt_dir), filename="step{step:07d}", save_last=True, save_top_k=1,
                                every_n_train_steps=tc.checkpoint_every_n_steps, auto_insert_metric_name=False)
    best_ckpt = ModelCheckpoint(dirpath=str(ckpt_dir), filename="best-step{step:07d}-val{val/loss:.4f}",
                                monitor="val/loss", mode="min", save_top_k=1, auto_insert_metric_name=False)
    exporter = ExportModelDir(str(run_dir), snapshot_every_n_steps)
    callbacks = [StopOnSignal(last_ckpt), step_ckpt, best_ckpt, exporter]
    trainer = pl.Trainer(
        default_root_dir=str(run_dir), max_steps=tc.max_steps, max_epochs=tc.max_epochs, max_time=tc.max_time,
        accelerator=tc.accelerator, devices=tc.devices, strategy=tc.strategy, precision=tc.precision,
        gradient_clip_val=cfg.optim.grad_clip_value, gradient_clip_algorithm="value",
        val_check_interval=tc.val_every_n_steps, check_val_every_n_epoch=None,
        limit_val_batches=tc.limit_val_batches, log_every_n_steps=tc.log_every_n_steps,
        logger=loggers, callbacks=callbacks, num_sanity_val_steps=0, enable_progress_bar=True,
        plugins=[AtomicCheckpointIO()], use_distributed_sampler=False,  # EpochSampler shards over ranks itself
    )
    import warnings

    # Our loader resumes mid-epoch by itself (QM9DataModule.train_dataloader), not by Lightning's protocol.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    try:
        with signals.deferred():
            trainer.fit(module, datamodule=dm, ckpt_path=str(resume_from) if resume_from is not None else None)
    except SystemExit as err:
        if type(err).__name__ == "SIGTERMException":  # Lightning stopped on SIGTERM outside our boundary
            raise signals.Interrupted(15) from None
        raise
    finally:
        if trainer.is_global_zero:
            _remove_stale_checkpoints(ckpt_dir, {step_ckpt.best_model_path, best_ckpt.best_model_path})
    # Final export so the run always ends with a loadable model directory.
    if trainer.is_global_zero:
        exporter._export(trainer, module, "model_last")
    return run_dir
