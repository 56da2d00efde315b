"""Read processed QM9 splits: flat tensors per split, statistics and the training SMILES.

This module imports only torch, the standard library and :mod:`flowmol_ext.batch`, so it runs on
machines without RDKit (the GPU trainer). The files are written by :mod:`flowmol_ext.data.qm9`
(``fdc-mol data qm9``):

- ``manifest.json``: written last; its presence means the directory is complete.
- ``{split}.pt``: a dict of plain tensors/lists (``weights_only`` loadable), see :class:`MoleculeStore`.
  On disk atom types/charges and bonds are packed to keep the data small (see ``to_dict``).
- ``stats.pt``: per-split statistics (:class:`DatasetStats`).
- ``train_smiles.txt``: canonical SMILES of the training molecules, one per line (novelty).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from flowmol_ext.batch import Molecule

SPLITS: tuple[str, ...] = ("train", "val", "test")
MANIFEST = "manifest.json"
STATS_FILE = "stats.pt"
TRAIN_SMILES_FILE = "train_smiles.txt"
STORE_FORMAT = 2


class DataNotProcessedError(FileNotFoundError):
    """The data directory holds no complete processed data set."""


def _manifest(data_dir: Path) -> dict:
    path = data_dir / MANIFEST
    if not path.is_file():
        raise DataNotProcessedError(
            f"{path}: no processed QM9 data in {data_dir} (manifest missing); run `fdc-mol data qm9 "
            f"--data-dir {data_dir}` first"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: corrupt manifest ({err}); rerun `fdc-mol data qm9 --force`") from err


def shard_path(data_dir: str | Path, split: str) -> Path:
    """Path of one split's shard file."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    return Path(data_dir) / f"{split}.pt"


class MoleculeStore:
    """One split as flat tensors (memory-friendly).

    ``x`` (N_total, 3) float32 Å as in the source (not centred); ``a`` (N_total,) int8 atom type over
    [C, H, N, O, F]; ``c`` (N_total,) int8 charge index = formal charge + 2; ``n_atoms`` (M,) int16;
    ``bonds`` (K_total, 3) int16 rows [i_local, j_local, order], i < j, order 1..3; ``n_bonds`` (M,)
    int16; ``qm9_index`` (M,) int32 (1-based); ``smiles`` M canonical SMILES (RDKit, heavy atoms,
    charges, no stereo).
    """

    def __init__(
        self,
        x: Tensor,
        a: Tensor,
        c: Tensor,
        n_atoms: Tensor,
        bonds: Tensor,
        n_bonds: Tensor,
        qm9_index: Tensor,
        smiles: list[str],
        source: str = "<memory>",
    ) -> None:
        m = int(n_atoms.numel())
        checks = {
            "x rows = sum(n_atoms)": x.shape == (int(n_atoms.sum()), 3),
            "a length": a.numel() == x.shape[0],
            "c length": c.numel() == x.shape[0],
            "bonds rows = sum(n_bonds)": bonds.shape == (int(n_bonds.sum()), 3),
            "n_bonds length": n_bonds.numel() == m,
            "qm9_index length": qm9_index.numel() == m,
            "smiles length": len(smiles) == m,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"{source}: inconsistent shard ({', '.join(bad)} failed)")
        self.x = x.to(torch.float32)
        self.a = a.to(torch.int8)
        self.c = c.to(torch.int8)
        self.n_atoms = n_atoms.to(torch.int16)
        self.bonds = bonds.to(torch.int16)
        self.n_bonds = n_bonds.to(torch.int16)
        self.qm9_index = qm9_index.to(torch.int32)
        self.smiles = list(smiles)
        zero = torch.zeros(1, dtype=torch.long)
        self.atom_offset = torch.cat([zero, self.n_atoms.long().cumsum(0)])
        self.bond_offset = torch.cat([zero, self.n_bonds.long().cumsum(0)])

    def __len__(self) -> int:
        return int(self.n_atoms.numel())

    def __getitem__(self, i: int) -> Molecule:
        """Molecule ``i``: x float32 Å (n, 3), a/c long (n,), bonds long (k, 3), props qm9_index/smiles."""
        m = len(self)
        if not -m <= i < m:
            raise IndexError(f"molecule {i} out of range for a split of {m}")
        i = i % m
        a0, a1 = int(self.atom_offset[i]), int(self.atom_offset[i + 1])
        b0, b1 = int(self.bond_offset[i]), int(self.bond_offset[i + 1])
        return Molecule(
            x=self.x[a0:a1].clone(),
            a=self.a[a0:a1].long(),
            c=self.c[a0:a1].long(),
            bonds=self.bonds[b0:b1].long(),
            props={"qm9_index": int(self.qm9_index[i]), "smiles": self.smiles[i]},
        )

    def to_dict(self) -> dict:
        """Plain dict for ``torch.save``, packed to keep the files small (format 2).

        ``ac`` int8 = 8 a + c; ``bonds_packed`` int16 = i << 7 | j << 2 | order when every molecule has
        fewer than 32 atoms (else ``bonds`` int16); ``smiles`` one newline-joined string.
        """
        if any("\n" in s for s in self.smiles):
            raise ValueError("a SMILES string contains a newline; cannot store it")
        d = {
            "format": STORE_FORMAT,
            "x": self.x,
            "ac": (self.a.to(torch.int16) * 8 + self.c.to(torch.int16)).to(torch.int8),
            "n_atoms": self.n_atoms,
            "n_bonds": self.n_bonds,
            "qm9_index": self.qm9_index,
            "smiles": "\n".join(self.smiles),
        }
        if len(self) == 0 or int(self.n_atoms.max()) < 32:
            b = self.bonds.to(torch.int16)
            d["bonds_packed"] = (b[:, 0] << 7) | (b[:, 1] << 2) | b[:, 2]
        else:
            d["bonds"] = self.bonds
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "<memory>") -> MoleculeStore:
        """Inverse of :meth:`to_dict` (also reads the unpacked format 1)."""
        fmt = d.get("format")
        if fmt == 1:
            keys = ("x", "a", "c", "n_atoms", "bonds", "n_bonds", "qm9_index", "smiles")
        elif fmt == STORE_FORMAT:
            keys = ("x", "ac", "n_atoms", "n_bonds", "qm9_index", "smiles")
        else:
            keys = ()
        missing = [k for k in keys if k not in d]
        if fmt == STORE_FORMAT and "bonds" not in d and "bonds_packed" not in d:
            missing.append("bonds_packed")
        if not keys or missing:
            raise ValueError(
                f"{source}: not a processed QM9 shard of format 1 or {STORE_FORMAT} (missing {missing}, "
                f"format {fmt!r}); rerun `fdc-mol data qm9 --force`"
            )
        if fmt == 1:
            return cls(*(d[k] for k in keys), source=source)
        ac = d["ac"].to(torch.int16)
        if "bonds_packed" in d:
            p = d["bonds_packed"].to(torch.int16)
            bonds = torch.stack([(p >> 7) & 31, (p >> 2) & 31, p & 3], dim=1)
        else:
            bonds = d["bonds"]
        smiles = d["smiles"].split("\n") if d["smiles"] else []
        return cls(d["x"], ac // 8, ac % 8, d["n_atoms"], bonds, d["n_bonds"], d["qm9_index"], smiles, source=source)


def load_split(data_dir: str | Path, split: str) -> MoleculeStore:
    """Load one processed split (``train``, ``val`` or ``test``) from ``data_dir``."""
    data_dir = Path(data_dir)
    path = shard_path(data_dir, split)
    manifest = _manifest(data_dir)
    if path.name not in manifest.get("files", {}):
        raise DataNotProcessedError(f"{path}: not listed in {data_dir / MANIFEST}; rerun `fdc-mol data qm9 --force`")
    if not path.is_file():
        raise DataNotProcessedError(
            f"{path}: missing although listed in the manifest; rerun `fdc-mol data qm9 --force`"
        )
    return MoleculeStore.from_dict(torch.load(path, weights_only=True, map_location="cpu"), source=str(path))


@dataclass
class DatasetStats:
    """Statistics of one split.

    ``n_atoms_hist`` (max_atoms + 1,) long counts indexed by atom count; ``p_a`` (5,) over
    [C, H, N, O, F]; ``p_c`` (6,) over charges −2..+3; ``p_e`` (4,) over upper-triangle atom pairs
    [none, single, double, triple]; ``n_molecules`` the number of molecules.
    """

    n_atoms_hist: Tensor
    p_a: Tensor
    p_c: Tensor
    p_e: Tensor
    n_molecules: int


def compute_stats(store: MoleculeStore) -> DatasetStats:
    """Statistics of a split (float64 marginals)."""
    n = store.n_atoms.long()
    hist = torch.bincount(n, minlength=int(n.max()) + 1 if n.numel() else 1)
    p_a = torch.bincount(store.a.long(), minlength=5).double()
    p_c = torch.bincount(store.c.long(), minlength=6).double()
    e = torch.bincount(store.bonds[:, 2].long(), minlength=4).double() if store.bonds.numel() else torch.zeros(4)
    e = e.double()
    e[0] = float((n * (n - 1) // 2).sum()) - float(e[1:].sum())
    return DatasetStats(
        n_atoms_hist=hist,
        p_a=p_a / p_a.sum().clamp_min(1),
        p_c=p_c / p_c.sum().clamp_min(1),
        p_e=e / e.sum().clamp_min(1),
        n_molecules=len(store),
    )


def load_stats(data_dir: str | Path, split: str = "train") -> DatasetStats:
    """Statistics of one processed split."""
    data_dir = Path(data_dir)
    _manifest(data_dir)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    path = data_dir / STATS_FILE
    if not path.is_file():
        raise DataNotProcessedError(f"{path}: missing; rerun `fdc-mol data qm9 --force`")
    all_stats = torch.load(path, weights_only=True, map_location="cpu")
    if split not in all_stats:
        raise ValueError(f"{path}: no statistics for split {split!r}")
    s = all_stats[split]
    return DatasetStats(
        n_atoms_hist=s["n_atoms_hist"], p_a=s["p_a"], p_c=s["p_c"], p_e=s["p_e"], n_molecules=int(s["n_molecules"])
    )


def load_train_smiles(data_dir: str | Path) -> set[str]:
    """Canonical SMILES of the training molecules (for novelty)."""
    data_dir = Path(data_dir)
    _manifest(data_dir)
    path = data_dir / TRAIN_SMILES_FILE
    if not path.is_file():
        raise DataNotProcessedError(f"{path}: missing; rerun `fdc-mol data qm9 --force`")
    return {line for line in path.read_text().splitlines() if line}
