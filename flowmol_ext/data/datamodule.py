"""Lightning DataModule over the processed QM9 shards, with the OT-aligned position prior.

Each item is a COM-free molecule plus its prior x₀: a COM-free N(0, 1) draw per atom, permuted by
a Hungarian assignment onto the molecule and rotated onto it by Kabsch (FlowMol's ``align: true``).

Reproducible and resumable: the training order of epoch e is a permutation drawn from a generator
seeded with (seed, e), and the prior of each item from a generator seeded with (seed, e, position
in the epoch); validation priors depend on the molecule index only. Nothing depends on the global
torch RNG or on the number of loader workers, so a run resumed mid-epoch (the sampler skips the
batches already trained, see :meth:`EpochSampler.resume_at`) sees exactly the batches an
uninterrupted run sees.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytorch_lightning as pl
import torch
from pydantic import Field
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from flowmol_ext.batch import MolBatch, Molecule
from flowmol_ext.config import StrictModel
from flowmol_ext.data.store import MoleculeStore, load_split
from flowmol_ext.model.interpolants import ot_align_prior

log = logging.getLogger(__name__)


class DataConfig(StrictModel):
    """Where the processed data lives and how batches are made."""

    data_dir: str = "data/qm9"
    batch_size: int = Field(default=128, ge=1)
    num_workers: int = Field(default=0, ge=0)
    ot_align: bool = True
    max_train_molecules: int | None = Field(default=None, ge=1)  # subsample for smoke runs / overfit tests
    max_val_molecules: int | None = Field(default=1000, ge=1)


_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: distinct (seed, epoch, position) give distinct seeds


def mix_seed(*parts: int) -> int:
    """A 63-bit generator seed from integers (deterministic across processes and runs)."""
    h = 0x1234567
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * _MIX + 0x632BE5AB) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF


class EpochSampler(Sampler):
    """Yields ``(index, noise_seed)`` items: a shuffled (or sequential) order per epoch, sharded over
    ``world`` ranks (this rank takes positions ``rank, rank + world, ...`` of the epoch's order,
    padded by wrapping around to equal lengths, as ``DistributedSampler`` does).

    ``set_epoch`` (called by Lightning each epoch) picks the epoch; :meth:`resume_at` makes the next
    iteration skip the first ``n_items`` items of this rank's share of that epoch (a resumed run).
    The noise seed depends on (seed, epoch, position in the epoch's order), not on the rank count's
    sharding, and padded duplicates get their own noise.
    """

    def __init__(self, n: int, seed: int, shuffle: bool, rank: int = 0, world: int = 1) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside 0..{world - 1}")
        self.n, self.seed, self.shuffle = int(n), int(seed), bool(shuffle)
        self.rank, self.world = int(rank), int(world)
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resume_at(self, n_items: int) -> None:
        """Skip the first ``n_items`` items of the current epoch once (mid-epoch resume)."""
        self._skip = max(0, int(n_items))

    def __len__(self) -> int:
        return -(-self.n // self.world) if self.n else 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if not self.n:
            return
        if self.shuffle:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, 1))
            order = torch.randperm(self.n, generator=gen).tolist()
        else:
            order = list(range(self.n))
        positions = range(self.rank, len(self) * self.world, self.world)
        skip, self._skip = self._skip, 0
        for pos in positions[skip:]:
            i = order[pos % self.n]
            yield i, (mix_seed(self.seed, self.epoch, pos, 2) if self.shuffle else mix_seed(self.seed, pos, 3))


def _loader_worker_init(worker_id: int) -> None:
    """DataLoader workers leave SIGINT/SIGTERM to the main process (which stops at a batch boundary
    and shuts them down); a signal sent to the whole process group (Ctrl-C, SLURM) must not kill a
    worker first and turn a clean stop into a 'worker exited unexpectedly' error. Workers still exit
    with a dead main process (PyTorch's parent watchdog)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class ResumableLoader(DataLoader):
    """A DataLoader over an :class:`EpochSampler`; ``resume_at(batches)`` skips trained batches."""

    def resume_at(self, n_batches: int) -> None:
        self.sampler.resume_at(n_batches * int(self.batch_size))


class AlignedPriorDataset(Dataset):
    """Molecules from a :class:`MoleculeStore`, centred, each with an (optionally) OT-aligned prior."""

    def __init__(self, store: MoleculeStore, ot_align: bool = True, limit: int | None = None) -> None:
        self.store = store
        self.ot_align = ot_align
        self.length = len(store) if limit is None else min(limit, len(store))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[Molecule, Tensor]:
        """Molecule ``i`` and its prior; ``item`` is ``i`` (global RNG) or ``(i, noise_seed)``."""
        i, noise_seed = item if isinstance(item, tuple) else (item, None)
        mol = self.store[i]
        x1 = mol.x.float() - mol.x.float().mean(0, keepdim=True)
        if noise_seed is None:
            x0 = torch.randn_like(x1)
        else:
            x0 = torch.randn(x1.shape, generator=torch.Generator().manual_seed(noise_seed), dtype=x1.dtype)
        x0 = x0 - x0.mean(0, keepdim=True)
        if self.ot_align and len(x1) > 1:
            x0 = ot_align_prior(x1, x0)
        return Molecule(x=x1, a=mol.a, c=mol.c, bonds=mol.bonds, props=mol.props), x0


def collate_with_prior(items: list[tuple[Molecule, Tensor]]) -> tuple[MolBatch, Tensor]:
    """Collate (molecule, prior) pairs into (MolBatch, x0 (N,3))."""
    mols, priors = zip(*items)
    return MolBatch.from_molecules(list(mols)), torch.cat(priors)


class QM9DataModule(pl.LightningDataModule):
    """Train/val loaders over ``data_dir`` (the output of ``fdc-mol data qm9``)."""

    def __init__(self, cfg: DataConfig, seed: int = 0) -> None:
        """``seed`` fixes the data order and the prior noise (pretraining passes ``train.seed``)."""
        super().__init__()
        self.cfg = cfg
        self.seed = int(seed)
        self.train_set: AlignedPriorDataset | None = None
        self.val_set: AlignedPriorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        root = Path(self.cfg.data_dir)
        if self.train_set is None:
            self.train_set = AlignedPriorDataset(load_split(root, "train"), self.cfg.ot_align,
                                                 self.cfg.max_train_molecules)
        if self.val_set is None:
            self.val_set = AlignedPriorDataset(load_split(root, "val"), self.cfg.ot_align,
                                               self.cfg.max_val_molecules)

    def _loader(self, ds: Dataset, shuffle: bool) -> ResumableLoader:
        # Sharded over ranks here (the Trainer runs with use_distributed_sampler=False).
        trainer = getattr(self, "trainer", None)
        rank, world = (int(trainer.global_rank), int(trainer.world_size)) if trainer is not None else (0, 1)
        return ResumableLoader(
            ds, batch_size=self.cfg.batch_size, sampler=EpochSampler(len(ds), self.seed, shuffle, rank, world),
            num_workers=self.cfg.num_workers, collate_fn=collate_with_prior,
            persistent_workers=self.cfg.num_workers > 0, worker_init_fn=_loader_worker_init,
        )

    def train_dataloader(self) -> ResumableLoader:
        loader = self._loader(self.train_set, shuffle=True)
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            # Lightning creates (and, with worker processes, starts) the iterator before any epoch hook:
            # the epoch, and on a resumed run the batches of it already trained, are set here.
            # Every epoch has len(loader) batches (one optimizer step each), so global step s lies in
            # epoch s // n after s % n of its batches (a checkpoint at an epoch's last batch resumes
            # at the start of the next epoch, as Lightning does).
            step, n_batches = int(trainer.global_step), len(loader)
            epoch, done = divmod(step, n_batches) if n_batches else (0, 0)
            loader.sampler.set_epoch(epoch)
            if done:
                loader.resume_at(done)
                log.info("resuming epoch %d after its first %d batches", epoch, done)
        return loader

    def val_dataloader(self) -> ResumableLoader:
        # FlowMol v2.0 validated on the *train* set by mistake; we use the val split.
        return self._loader(self.val_set, shuffle=False)
