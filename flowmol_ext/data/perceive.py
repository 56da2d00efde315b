"""Bonds and formal charges of one QM9 molecule from its 3D structure, checked against its SMILES.

1. ``rdDetermineBonds.DetermineBonds(charge=0)`` on the XYZ geometry (covalent factor 1.3).
   If the resulting graph (heavy atoms + H, charges) has the same canonical SMILES as the reference
   (GDB-17) SMILES, it is kept: status ``perceived``.
2. Otherwise the molecule is *repaired*: the distance-based connectivity is computed with covalent
   factors 1.3, 1.45, 1.6 and the reference heavy-atom graph (each heavy atom labelled by its
   hydrogen count) is matched onto it as a subgraph; spurious long contacts (strained cages) are
   thereby ignored. Bond orders and charges are taken from the kekulized reference and, among
   equivalent matches, the one placing higher bond orders on shorter distances is chosen. The
   result is checked against the reference again: status ``repaired``.
3. If neither works the molecule is excluded with a reason (never silently).

Bond orders are kekulized (1, 2, 3); atom order is the source's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rdkit import Chem, RDLogger
from rdkit.Chem import rdDetermineBonds

from flowmol_ext import ATOM_TYPES, CHARGE_OFFSET, CHARGES

RDLogger.DisableLog("rdApp.*")

REPAIR_COV_FACTORS: tuple[float, ...] = (1.3, 1.45, 1.6)
_ORDER = {Chem.BondType.SINGLE: 1, Chem.BondType.DOUBLE: 2, Chem.BondType.TRIPLE: 3}
_BT = {1: Chem.BondType.SINGLE, 2: Chem.BondType.DOUBLE, 3: Chem.BondType.TRIPLE}
_TYPE_INDEX = {el: k for k, el in enumerate(ATOM_TYPES)}

# Exclusion reasons (keys of the report).
R_BAD_SMILES = "reference_smiles_unparseable"
R_COMPOSITION = "composition_mismatch"
R_NO_MATCH = "graph_mismatch_unrepairable"
R_CHARGE = "charge_out_of_range"
R_BOND = "unsupported_bond"
R_FRAGMENTS = "fragmented"


@dataclass
class Perceived:
    """Result for one molecule: ``status`` perceived/repaired/excluded; ``reason`` for exclusions;
    ``charges`` (n,) int8 formal charges; ``bonds`` (k, 3) int8 [i, j, order], i < j; ``smiles`` the
    canonical SMILES (RDKit, heavy atoms, charges, no stereo)."""

    qm9_index: int
    status: str
    reason: str = ""
    charges: np.ndarray | None = None
    bonds: np.ndarray | None = None
    smiles: str = ""
    n_spurious: int = 0


def canonical_smiles(mol: Chem.Mol) -> str:
    """Canonical SMILES of a sanitized molecule: heavy atoms, charges, no stereo."""
    return Chem.MolToSmiles(Chem.RemoveHs(mol), isomericSmiles=False)


def xyz_block(elements: tuple[str, ...] | list[str], coords: np.ndarray) -> str:
    """An XYZ block with fixed-point coordinates (RDKit's reader rejects exponent forms)."""
    lines = [str(len(elements)), ""]
    lines += [f"{el} {x:.10f} {y:.10f} {z:.10f}" for el, (x, y, z) in zip(elements, coords.tolist())]
    return "\n".join(lines) + "\n"


def graph_mol(elements: tuple[str, ...] | list[str], charges: list[int], bonds: list[tuple[int, int, int]]) -> Chem.Mol:
    """Sanitized RDKit molecule (explicit H, no conformer) from a kekulized graph."""
    rw = Chem.RWMol()
    for el, q in zip(elements, charges):
        atom = Chem.Atom(el)
        atom.SetFormalCharge(int(q))
        atom.SetNoImplicit(True)
        rw.AddAtom(atom)
    for i, j, o in bonds:
        rw.AddBond(int(i), int(j), _BT[int(o)])
    mol = rw.GetMol()
    Chem.SanitizeMol(mol)
    return mol


def _graph_from_mol(mol: Chem.Mol) -> tuple[list[int], list[tuple[int, int, int]]] | None:
    """Charges and kekulized bonds [i, j, order] (i < j) of an RDKit molecule; None if unsupported."""
    m = Chem.Mol(mol)
    Chem.Kekulize(m, clearAromaticFlags=True)
    bonds = []
    for b in m.GetBonds():
        o = _ORDER.get(b.GetBondType())
        if o is None:
            return None
        i, j = sorted((b.GetBeginAtomIdx(), b.GetEndAtomIdx()))
        bonds.append((i, j, o))
    bonds.sort()
    return [a.GetFormalCharge() for a in m.GetAtoms()], bonds


def _try_determine_bonds(xyz: str) -> tuple[list[int], list[tuple[int, int, int]]] | None:
    mol = Chem.MolFromXYZBlock(xyz)
    if mol is None:
        return None
    try:
        rdDetermineBonds.DetermineBonds(mol, charge=0)
        Chem.SanitizeMol(mol)
    except Exception:  # noqa: BLE001 - RDKit raises several types; failure means "try the repair"
        return None
    return _graph_from_mol(mol)


def _connectivity(xyz: str, factor: float) -> Chem.Mol | None:
    mol = Chem.MolFromXYZBlock(xyz)
    if mol is None:
        return None
    try:
        rdDetermineBonds.DetermineConnectivity(mol, useHueckel=False, covFactor=factor)
    except Exception:  # noqa: BLE001
        return None
    return mol


def _repair(
    elements: tuple[str, ...], coords: np.ndarray, xyz: str, ref_kek: Chem.Mol
) -> tuple[list[int], list[tuple[int, int, int]], int] | None:
    """Map the kekulized reference (heavy atoms, implicit H) onto the 3D connectivity."""
    ref_heavy = [a.GetIdx() for a in ref_kek.GetAtoms()]
    query = Chem.RWMol(ref_kek)
    for a in query.GetAtoms():
        a.SetIsotope(a.GetTotalNumHs() + 1)  # label: number of H (+1 so 0 H is still checked)
        a.SetFormalCharge(0)
        a.SetNoImplicit(True)
        a.SetNumExplicitHs(0)
        a.SetIsAromatic(False)
    for b in query.GetBonds():
        b.SetBondType(Chem.BondType.SINGLE)
        b.SetIsAromatic(False)
    query = query.GetMol()
    query.UpdatePropertyCache(strict=False)
    heavy_src = [k for k, el in enumerate(elements) if el != "H"]
    for factor in REPAIR_COV_FACTORS:
        conn = _connectivity(xyz, factor)
        if conn is None:
            continue
        h_parent: dict[int, int] = {}
        ok = True
        for k, el in enumerate(elements):
            if el == "H":
                nbrs = [n.GetIdx() for n in conn.GetAtomWithIdx(k).GetNeighbors()]
                heavy_nbrs = [n for n in nbrs if elements[n] != "H"]
                if len(heavy_nbrs) != 1 or len(nbrs) != 1:
                    ok = False
                    break
                h_parent[k] = heavy_nbrs[0]
        if not ok:
            continue
        # Heavy-atom target labelled by hydrogen count.
        tgt = Chem.RWMol()
        pos = {src: t for t, src in enumerate(heavy_src)}
        n_h = {src: 0 for src in heavy_src}
        for parent in h_parent.values():
            n_h[parent] += 1
        for src in heavy_src:
            atom = Chem.Atom(elements[src])
            atom.SetIsotope(n_h[src] + 1)
            atom.SetNoImplicit(True)
            tgt.AddAtom(atom)
        n_tgt_bonds = 0
        for b in conn.GetBonds():
            i, j = b.GetBeginAtomIdx(), b.GetEndAtomIdx()
            if elements[i] != "H" and elements[j] != "H":
                tgt.AddBond(pos[i], pos[j], Chem.BondType.SINGLE)
                n_tgt_bonds += 1
        tgt = tgt.GetMol()
        tgt.UpdatePropertyCache(strict=False)
        matches = tgt.GetSubstructMatches(query, uniquify=False, useChirality=False, maxMatches=2000)
        if not matches:
            continue
        best, best_score = matches[0], None
        for match in matches:
            score = 0.0
            for b in ref_kek.GetBonds():
                i = heavy_src[match[b.GetBeginAtomIdx()]]
                j = heavy_src[match[b.GetEndAtomIdx()]]
                score += _ORDER[b.GetBondType()] * float(np.linalg.norm(coords[i] - coords[j]))
            if best_score is None or score < best_score - 1e-9:
                best, best_score = match, score
        charges = [0] * len(elements)
        bonds = []
        for q in ref_heavy:
            charges[heavy_src[best[q]]] = ref_kek.GetAtomWithIdx(q).GetFormalCharge()
        for b in ref_kek.GetBonds():
            i = heavy_src[best[b.GetBeginAtomIdx()]]
            j = heavy_src[best[b.GetEndAtomIdx()]]
            bonds.append((min(i, j), max(i, j), _ORDER[b.GetBondType()]))
        for h, parent in h_parent.items():
            bonds.append((min(h, parent), max(h, parent), 1))
        bonds.sort()
        return charges, bonds, n_tgt_bonds - ref_kek.GetNumBonds()
    return None


def perceive(qm9_index: int, elements: tuple[str, ...], coords: np.ndarray, ref_smiles: str) -> Perceived:
    """Bonds and charges of one molecule, checked against ``ref_smiles`` (see module docstring)."""
    ref = Chem.MolFromSmiles(ref_smiles)
    if ref is None:
        return Perceived(qm9_index, "excluded", R_BAD_SMILES)
    ref_key = Chem.MolToSmiles(ref, isomericSmiles=False)
    if "." in ref_key:
        return Perceived(qm9_index, "excluded", R_FRAGMENTS)
    comp_ref: dict[str, int] = {}
    for a in ref.GetAtoms():
        comp_ref[a.GetSymbol()] = comp_ref.get(a.GetSymbol(), 0) + 1
        if a.GetTotalNumHs():
            comp_ref["H"] = comp_ref.get("H", 0) + a.GetTotalNumHs()
    comp_src: dict[str, int] = {}
    for el in elements:
        comp_src[el] = comp_src.get(el, 0) + 1
    if comp_ref != comp_src:
        return Perceived(qm9_index, "excluded", R_COMPOSITION)

    xyz = xyz_block(elements, coords)
    status, n_spurious = "perceived", 0
    graph = _try_determine_bonds(xyz)
    result = None
    if graph is not None:
        try:
            smiles = canonical_smiles(graph_mol(elements, *graph))
            if smiles == ref_key:
                result = (graph[0], graph[1], smiles)
        except Exception:  # noqa: BLE001
            result = None
    if result is None:
        status = "repaired"
        ref_kek = Chem.Mol(ref)
        try:
            Chem.Kekulize(ref_kek, clearAromaticFlags=True)
        except Exception:  # noqa: BLE001
            return Perceived(qm9_index, "excluded", R_BAD_SMILES)
        rep = _repair(elements, coords, xyz, ref_kek)
        if rep is None:
            return Perceived(qm9_index, "excluded", R_NO_MATCH)
        charges, bonds, n_spurious = rep
        try:
            mol = graph_mol(elements, charges, bonds)
        except Exception:  # noqa: BLE001
            return Perceived(qm9_index, "excluded", R_NO_MATCH)
        smiles = canonical_smiles(mol)
        if smiles != ref_key:
            return Perceived(qm9_index, "excluded", R_NO_MATCH)
        result = (charges, bonds, smiles)
    charges, bonds, smiles = result
    if any(q not in CHARGES for q in charges):
        return Perceived(qm9_index, "excluded", R_CHARGE)
    if any(o not in (1, 2, 3) for _, _, o in bonds):
        return Perceived(qm9_index, "excluded", R_BOND)
    return Perceived(
        qm9_index,
        status,
        charges=np.asarray(charges, dtype=np.int8),
        bonds=np.asarray(bonds, dtype=np.int8).reshape(-1, 3),
        smiles=smiles,
        n_spurious=n_spurious,
    )


def perceive_chunk(chunk: list[tuple[int, tuple[str, ...], np.ndarray, str]]) -> list[Perceived]:
    """Process-pool task: :func:`perceive` over a list of (index, elements, coords, smiles).

    An unexpected RDKit error on one molecule excludes that molecule with reason
    ``perception_error:<type>`` (counted in the report) instead of aborting the whole run.
    """
    out = []
    for item in chunk:
        try:
            out.append(perceive(*item))
        except Exception as err:  # noqa: BLE001 - reported per molecule, never silent
            out.append(Perceived(item[0], "excluded", f"perception_error:{type(err).__name__}"))
    return out


def type_indices(elements: tuple[str, ...]) -> np.ndarray:
    """Atom-type indices over [C, H, N, O, F], (n,) int8."""
    return np.asarray([_TYPE_INDEX[el] for el in elements], dtype=np.int8)


def charge_indices(charges: np.ndarray) -> np.ndarray:
    """Charge indices = formal charge + 2, (n,) int8."""
    return (np.asarray(charges, dtype=np.int16) + CHARGE_OFFSET).astype(np.int8)
