"""Validity gate: molecules that fail it never reach an engine; they get NaN and a reason.

Checks, in order: conversion errors and unknown elements, empty molecule, non-finite or exploded
coordinates, minimum interatomic distance (Å), charge/multiplicity consistency (radicals), RDKit
sanitisation (and RDKit-assigned radical electrons), connectivity of the bond graph.
"""

from __future__ import annotations

import numpy as np

from fdc_mol.rewards.base import COVALENT_RADII_A, MolSpec, RewardSettings

__all__ = ["check_gate", "spin_uhf", "spec_to_rdkit"]

_SYMBOL = {1: "H", 6: "C", 7: "N", 8: "O", 9: "F"}


def spin_uhf(spec: MolSpec, settings: RewardSettings) -> tuple[int, str]:
    """Number of unpaired electrons (multiplicity − 1) and a failure reason ("" if consistent)."""
    n_el = int(spec.z.sum()) - spec.charge
    if n_el <= 0:
        return 0, f"no electrons: {int(spec.z.sum())} protons with total charge {spec.charge:+d}"
    if settings.multiplicity is None:
        uhf = n_el % 2
        if uhf and not settings.allow_radicals:
            return uhf, (
                f"radical: odd electron count ({n_el} electrons, charge {spec.charge:+d}); "
                "set allow_radicals=True or a multiplicity to evaluate open shells"
            )
        return uhf, ""
    uhf = settings.multiplicity - 1
    if (n_el - uhf) % 2 or uhf > n_el:
        return uhf, f"multiplicity {settings.multiplicity} is impossible with {n_el} electrons"
    return uhf, ""


def spec_to_rdkit(spec: MolSpec, sanitize: bool):  # noqa: ANN201 - returns Chem.Mol
    """RDKit molecule of a numpy spec: :func:`flowmol_ext.rdkit_build.build_rdkit` (torch-free, for workers)."""
    from flowmol_ext.rdkit_build import build_rdkit

    return build_rdkit(spec.z.tolist(), spec.charges.tolist(), spec.bonds, spec.x, sanitize=sanitize)


def _n_fragments(n: int, bonds: np.ndarray) -> int:
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, order in bonds.tolist():
        if order > 0:
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[ri] = rj
    return len({find(i) for i in range(n)})


def check_gate(spec: MolSpec, settings: RewardSettings) -> str:
    """Return "" if the molecule may be sent to an engine, else the reason it may not."""
    if spec.error:
        return spec.error
    n = spec.n_atoms
    if n == 0:
        return "empty molecule (0 atoms)"
    known = (spec.z == 1) | ((spec.z >= 6) & (spec.z <= 9))
    if not known.all():
        unknown = np.flatnonzero(~known)
        return f"unknown element: atomic number {int(spec.z[unknown[0]])} at atom {int(unknown[0])}"
    if not np.isfinite(spec.x).all():
        finite = np.isfinite(spec.x).all(axis=1)
        return f"non-finite coordinates (NaN/inf) at atom {int(np.flatnonzero(~finite)[0])}"
    big = float(np.abs(spec.x).max())
    if big > settings.max_abs_coordinate_A:
        return f"exploded coordinates: max |x| = {big:.3g} Å > {settings.max_abs_coordinate_A:g} Å"
    if settings.min_distance_scale is not None and n > 1:
        d = np.sqrt(((spec.x[:, None, :] - spec.x[None, :, :]) ** 2).sum(-1))
        rad = np.array([COVALENT_RADII_A.get(int(z), 0.75) for z in spec.z])
        limit = settings.min_distance_scale * (rad[:, None] + rad[None, :])
        ratio = d / limit
        ratio[np.diag_indices(n)] = np.inf
        k = int(np.argmin(ratio))
        i, j = divmod(k, n)
        if ratio[i, j] < 1.0:
            i, j = min(i, j), max(i, j)
            return (
                f"overlapping atoms: {_SYMBOL[int(spec.z[i])]}{i} and {_SYMBOL[int(spec.z[j])]}{j} are "
                f"{d[i, j]:.3f} Å apart (< {settings.min_distance_scale:g} x covalent radii = {limit[i, j]:.3f} Å)"
            )
    elif settings.min_distance_A is not None and n > 1:
        d = np.sqrt(((spec.x[:, None, :] - spec.x[None, :, :]) ** 2).sum(-1))
        d[np.diag_indices(n)] = np.inf
        k = int(np.argmin(d))
        i, j = divmod(k, n)
        if d[i, j] < settings.min_distance_A:
            i, j = min(i, j), max(i, j)
            return (
                f"overlapping atoms: {_SYMBOL[int(spec.z[i])]}{i} and {_SYMBOL[int(spec.z[j])]}{j} are "
                f"{d[i, j]:.3f} Å apart (< min_distance_A = {settings.min_distance_A:g} Å)"
            )
    _, reason = spin_uhf(spec, settings)
    if reason:
        return reason
    if settings.sanitize or settings.method == "mmff94":
        from rdkit import rdBase

        try:
            with rdBase.BlockLogs():  # the reason string carries RDKit's message
                mol = spec_to_rdkit(spec, sanitize=True)
        except Exception as err:  # noqa: BLE001 - RDKit raises several exception types
            msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            return f"RDKit sanitisation failed: {msg}"
        n_rad = sum(a.GetNumRadicalElectrons() for a in mol.GetAtoms())
        if n_rad and not settings.allow_radicals:
            return f"radical: RDKit assigns {n_rad} radical electron(s) (under-bonded atoms)"
    elif spec.bonds.size:
        b = spec.bonds
        if (b[:, :2] < 0).any() or (b[:, :2] >= n).any():
            return f"malformed bonds: atom indices outside 0..{n - 1}"
    if settings.require_connected and n > 1:
        n_frag = _n_fragments(n, spec.bonds)
        if n_frag > 1:
            return f"disconnected: the bond graph has {n_frag} fragments"
    return ""
