"""Lightning DataModule over the processed QM9 shards, with the OT-aligned position prior.

Each item is a COM-free molecule plus its prior x₀: a COM-free N(0, 1) draw per atom, permuted by
a Hungarian assignment onto the molecule and rotated onto it by Kabsch (FlowMol's ``align: true``).
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from flowmol_ext.batch import MolBatch, Molecule
from flowmol_ext.config import StrictModel
from flowmol_ext.data.store import MoleculeStore, load_split
from flowmol_ext.model.interpolants import ot_align_prior


class DataConfig(StrictModel):
    """Where the processed data lives and how batches are made."""

    data_dir: str = "data/qm9"
    batch_size: int = 128
    num_workers: int = 0
    ot_align: bool = True
    max_train_molecules: int | None = None  # subsample for smoke runs / overfit tests
    max_val_molecules: int | None = 1000


class AlignedPriorDataset(Dataset):
    """Molecules from a :class:`MoleculeStore`, centred, each with an (optionally) OT-aligned prior."""

    def __init__(self, store: MoleculeStore, ot_align: bool = True, limit: int | None = None) -> None:
        self.store = store
        self.ot_align = ot_align
        self.length = len(store) if limit is None else min(limit, len(store))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[Molecule, Tensor]:
        mol = self.store[i]
        x1 = mol.x.float() - mol.x.float().mean(0, keepdim=True)
        x0 = torch.randn_like(x1)
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

    def __init__(self, cfg: DataConfig) -> None:
        super().__init__()
        self.cfg = cfg
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

    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            ds, batch_size=self.cfg.batch_size, shuffle=shuffle, num_workers=self.cfg.num_workers,
            collate_fn=collate_with_prior, persistent_workers=self.cfg.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        # FlowMol v2.0 validated on the *train* set by mistake; we use the val split.
        return self._loader(self.val_set, shuffle=False)
