"""Reward protocol types: :class:`RewardResult`, :class:`RewardSettings`, :class:`MolSpec`, unit constants.

Everything here is torch-free so that worker processes (local pool, Dask) import only numpy, RDKit
and the xTB engines. Positions are in Å everywhere; the xTB adapters convert to Bohr internally.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from flowmol_ext import ATOM_TYPES, CHARGE_OFFSET
from flowmol_ext.config import StrictModel

__all__ = [
    "ANGSTROM_PER_BOHR",
    "COVALENT_RADII_A",
    "ATOMIC_NUMBERS",
    "HARTREE_PER_KCAL_MOL",
    "HARTREE_PER_KELVIN",
    "MolSpec",
    "RewardResult",
    "RewardSettings",
    "spec_from_molecule",
]

ANGSTROM_PER_BOHR = 0.529177210903  # CODATA 2018
HARTREE_PER_KCAL_MOL = 1.0 / 627.5094740631  # CODATA 2018
HARTREE_PER_KELVIN = 3.166808578545117e-6  # Boltzmann constant in Eh/K (tblite's factor)
ATOMIC_NUMBERS: dict[str, int] = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
# Single-bond covalent radii in Å (Cordero et al., Dalton Trans. 2008; C sp3), by atomic number.
COVALENT_RADII_A: dict[int, float] = {1: 0.31, 6: 0.76, 7: 0.71, 8: 0.66, 9: 0.57}
_Z_OF_TYPE = np.array([ATOMIC_NUMBERS[s] for s in ATOM_TYPES], dtype=np.int64)

METHOD_LABEL = {"gfn1": "gfn1-xtb", "gfn2": "gfn2-xtb", "mmff94": "mmff94"}
DEFAULT_ENGINE = {"gfn1": "tblite", "gfn2": "tblite", "mmff94": "rdkit"}


@dataclass
class RewardResult:
    """Rewards of B molecules, in input order.

    ``value`` (B,) float64 reward in Hartree (``sign * energy``, = −E by default), NaN on failure;
    ``energy`` (B,) float64 Hartree, NaN on failure; ``grad`` per molecule (n_i, 3) float64
    d(value)/dx in Hartree/Å (None on failure), or None if not requested; ``ok`` (B,) bool;
    ``reason`` failure reasons ("" when ok); ``method`` e.g. ``"gfn1-xtb/tblite"``. ``extras`` holds
    optional (B,) float64 columns in Hartree: ``relaxed_energy`` and ``strain`` (= E − E_relaxed)
    when a relaxation is configured, and ``cached`` (1.0 for cache hits).
    """

    value: np.ndarray
    energy: np.ndarray
    grad: list[np.ndarray | None] | None
    ok: np.ndarray
    reason: list[str]
    method: str
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.value.shape[0])

    @property
    def failure_rate(self) -> float:
        """Fraction of molecules that failed (0 for an empty batch)."""
        return float(1.0 - self.ok.mean()) if len(self) else 0.0

    def sdf_props(self, i: int) -> dict[str, str]:
        """SD properties for molecule ``i``: energy (Eh), method and failure reason."""
        props = {"energy_Eh": repr(float(self.energy[i])), "energy_method": self.method}
        for k, col in self.extras.items():
            if k != "cached":
                props[f"{k}_Eh"] = repr(float(col[i]))
        if not self.ok[i]:
            props["energy_failure"] = self.reason[i]
        return props


class RewardSettings(StrictModel):
    """Settings of an energy reward. Energies in Hartree, distances in Å, temperature in K, time in s."""

    method: Literal["gfn1", "gfn2", "mmff94"] = "gfn1"
    engine: Literal["tblite", "xtb", "rdkit"] = "tblite"
    accuracy: float = Field(1.0, gt=0.0, le=1000.0, description="xTB SCF accuracy (smaller = tighter)")
    max_iterations: int = Field(250, ge=1, le=10000, description="maximum SCF iterations")
    electronic_temperature: float = Field(300.0, ge=0.0, le=50000.0, description="Fermi smearing temperature, K")
    timeout_s: float = Field(60.0, gt=0.0, le=86400.0, description="per-molecule wall-clock limit, s")
    multiplicity: int | None = Field(None, ge=1, le=10, description="None = 1 or 2 from the electron count")
    # validity gate
    sanitize: bool = True
    min_distance_A: float | None = Field(0.9, ge=0.0, le=5.0)
    min_distance_scale: float | None = Field(
        None, gt=0.0, lt=1.5, description="bond-aware clash gate: reject pairs closer than this fraction of the "
        "sum of their covalent radii (COVALENT_RADII_A); replaces min_distance_A when set")
    require_connected: bool = True
    allow_radicals: bool = False
    max_abs_coordinate_A: float = Field(1000.0, gt=0.0)
    # relaxation
    relax: Literal["xtb", "mmff"] | None = None
    relax_max_steps: int = Field(200, ge=1, le=100000)
    relax_gtol: float = Field(5e-4, gt=0.0, description="relaxation gradient tolerance, Eh/Å (max component)")
    # evaluation
    sign: Literal[-1, 1] = -1
    cache_dir: str | None = None
    chunk_size: int | None = Field(None, ge=1, le=10000, description="molecules per task; None = automatic")
    watchdog: bool = Field(True, description="run engines in a forked, killable child (hard timeouts)")

    @model_validator(mode="after")
    def _check_engine(self) -> RewardSettings:
        ok = {"gfn1": {"tblite", "xtb"}, "gfn2": {"tblite", "xtb"}, "mmff94": {"rdkit"}}[self.method]
        if self.engine not in ok:
            raise ValueError(f"engine '{self.engine}' cannot run method '{self.method}'; use one of {sorted(ok)}")
        return self

    @property
    def label(self) -> str:
        """Method label, e.g. ``"gfn1-xtb/tblite"``."""
        return f"{METHOD_LABEL[self.method]}/{self.engine}"

    def key_fields(self) -> dict[str, Any]:
        """Settings that change an energy (the cache key's settings part)."""
        skip = {"timeout_s", "sign", "cache_dir", "chunk_size", "watchdog"}
        return {k: v for k, v in self.model_dump().items() if k not in skip}


@dataclass
class MolSpec:
    """Plain-numpy molecule sent to workers (no torch).

    ``z`` (n,) int64 atomic numbers (0 = unknown type); ``x`` (n, 3) float64 Å; ``charges`` (n,) int64
    formal charges; ``bonds`` (k, 3) int64 rows [i, j, order]; ``error`` a conversion problem ("" = none).
    """

    z: np.ndarray
    x: np.ndarray
    charges: np.ndarray
    bonds: np.ndarray
    error: str = ""

    @property
    def n_atoms(self) -> int:
        return int(self.z.shape[0])

    @property
    def charge(self) -> int:
        """Total charge (sum of formal charges), e."""
        return int(self.charges.sum())

    def cache_key(self, settings_json: str) -> str:
        """Content hash: elements, coordinates rounded to 1e-6 Å, charges, bonds and settings."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.z, dtype=np.int64).tobytes())
        with np.errstate(invalid="ignore", over="ignore"):
            xr = np.round(self.x * 1e6)
        h.update(np.ascontiguousarray(xr, dtype=np.float64).tobytes())
        h.update(np.ascontiguousarray(self.charges, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(self.bonds, dtype=np.int64).tobytes())
        h.update(settings_json.encode())
        return h.hexdigest()


def settings_key_json(settings: RewardSettings) -> str:
    """Canonical JSON of the result-relevant settings."""
    return json.dumps(settings.key_fields(), sort_keys=True)


def spec_from_molecule(mol: Any) -> MolSpec:
    """Convert a :class:`~flowmol_ext.batch.Molecule` (torch tensors) to a :class:`MolSpec`.

    Never raises: malformed input gives a spec with ``error`` set (empty arrays where unusable).
    """
    empty = MolSpec(np.zeros(0, np.int64), np.zeros((0, 3)), np.zeros(0, np.int64), np.zeros((0, 3), np.int64))
    try:
        a = _as_numpy(mol.a).astype(np.int64).reshape(-1)
        x = _as_numpy(mol.x).astype(np.float64)
        c = _as_numpy(mol.c).astype(np.int64).reshape(-1)
        bonds = _as_numpy(mol.bonds).astype(np.int64)
    except Exception as err:  # noqa: BLE001 - garbage in, reason out
        empty.error = f"malformed molecule: {type(err).__name__}: {err}"
        return empty
    n = a.shape[0]
    if x.shape != (n, 3):
        empty.error = f"malformed molecule: positions have shape {tuple(x.shape)}, expected ({n}, 3)"
        return empty
    if c.shape != (n,):
        empty.error = f"malformed molecule: charges have shape {tuple(c.shape)}, expected ({n},)"
        return empty
    if bonds.size == 0:
        bonds = np.zeros((0, 3), np.int64)
    if bonds.ndim != 2 or bonds.shape[1] != 3:
        empty.error = f"malformed molecule: bonds have shape {tuple(bonds.shape)}, expected (k, 3)"
        return empty
    bad = np.flatnonzero((a < 0) | (a >= len(ATOM_TYPES)))
    z = np.zeros(n, np.int64)
    good = (a >= 0) & (a < len(ATOM_TYPES))
    z[good] = _Z_OF_TYPE[a[good]]
    spec = MolSpec(z=z, x=x, charges=c - CHARGE_OFFSET, bonds=bonds)
    if bad.size:
        spec.error = (
            f"unknown element: atom {int(bad[0])} has atom-type index {int(a[bad[0]])}, "
            f"not one of {list(ATOM_TYPES)} (mask token?)"
        )
    return spec


def _as_numpy(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):
        t = t.detach().cpu().numpy()
    return np.asarray(t)
