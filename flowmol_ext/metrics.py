"""Molecule quality metrics: stability, validity, connectivity, uniqueness, novelty.

Every metric works standalone on a :class:`~flowmol_ext.batch.Molecule`, an RDKit ``Chem.Mol`` or
(for the ``torchmetrics`` classes) a :class:`~flowmol_ext.batch.MolBatch`.

Definitions (EDM / MiDi conventions, with the valence-table fixes of :mod:`flowmol_ext.chem`):

- **Preparation.** Each molecule is copied, every atom is marked "no implicit hydrogens" (hydrogens
  count only as atoms; none are invented) and aromatic bonds are kekulized when possible.
- **Atom stability**: fraction of atoms whose Kekulé valence is allowed by
  :data:`~flowmol_ext.chem.ALLOWED_VALENCES` for their element and formal charge.
  **Molecule stability**: fraction of molecules whose atoms are all stable.
- **Validity** (MiDi): RDKit ``SanitizeMol`` succeeds on the **largest fragment** (most atoms).
  **Whole validity**: sanitisation succeeds on the whole molecule. Radicals pass sanitisation
  (so a neutral 3-valent carbon is valid but unstable), as in EDM/MiDi.
- **Connectivity**: fraction of molecules whose bond graph has one component.
- **Uniqueness**: distinct canonical SMILES (of the largest fragment) among *valid* molecules,
  divided by the number of valid molecules. **Novelty**: unique valid SMILES not in the training
  set, divided by the number of unique valid SMILES (EDM convention). SMILES are canonical RDKit
  SMILES without stereochemistry and without hydrogens (``isomericSmiles=False``); training SMILES
  are canonicalised the same way.

A record that could not be parsed (``None`` in the input list) counts as a molecule that is
unstable, invalid and disconnected, with no atoms.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from rdkit import Chem, rdBase
from torch import Tensor
from torchmetrics import Metric

from flowmol_ext.batch import MolBatch, Molecule
from flowmol_ext.chem import atom_is_stable, atom_valences, hydrogens_missing, to_rdkit

MolLike = Molecule | Chem.Mol


# ---------------------------------------------------------------------------------------------------
# Per-molecule functions
# ---------------------------------------------------------------------------------------------------


def prepare(mol: MolLike) -> Chem.Mol:
    """Unsanitized RDKit copy with explicit-only hydrogens and Kekulé bonds where kekulization succeeds."""
    if isinstance(mol, Molecule):
        return to_rdkit(mol)
    if not isinstance(mol, Chem.Mol):
        raise ValueError(f"expected a Molecule or rdkit Chem.Mol, got {type(mol).__name__}")
    m = Chem.Mol(mol)
    for atom in m.GetAtoms():
        atom.SetNoImplicit(True)
        atom.SetNumExplicitHs(0)
    if any(b.GetIsAromatic() or b.GetBondType() == Chem.BondType.AROMATIC for b in m.GetBonds()):
        try:
            trial = Chem.Mol(m)
            trial.UpdatePropertyCache(strict=False)
            Chem.GetSymmSSSR(trial)
            Chem.Kekulize(trial, clearAromaticFlags=True)
            m = trial
        except Exception:  # noqa: BLE001 - unkekulizable aromatic bonds stay 1.5 (-> unstable)
            pass
    m.UpdatePropertyCache(strict=False)
    return m


def atom_stability(mol: MolLike) -> list[bool]:
    """Per-atom stability flags (n,) against :data:`~flowmol_ext.chem.ALLOWED_VALENCES`."""
    m = prepare(mol)
    val = atom_valences(m)
    return [atom_is_stable(a.GetSymbol(), a.GetFormalCharge(), v) for a, v in zip(m.GetAtoms(), val)]


def molecule_stable(mol: MolLike) -> bool:
    """True when every atom is stable (and the molecule has at least one atom)."""
    flags = atom_stability(mol)
    return bool(flags) and all(flags)


def _largest_fragment(m: Chem.Mol) -> Chem.Mol:
    frags = Chem.GetMolFrags(m, asMols=True, sanitizeFrags=False)
    return max(frags, key=lambda f: f.GetNumAtoms()) if frags else m


def _quiet() -> contextlib.AbstractContextManager:
    """Silence RDKit's per-molecule log lines (the reason is returned instead)."""
    block = getattr(rdBase, "BlockLogs", None)
    return block() if block is not None else contextlib.nullcontext()


def _sanitized(m: Chem.Mol) -> tuple[Chem.Mol | None, str | None]:
    """Sanitized copy, or None and RDKit's reason."""
    if m.GetNumAtoms() == 0:
        return None, "no atoms"
    s = Chem.Mol(m)
    try:
        with _quiet():
            Chem.SanitizeMol(s)
    except Exception as err:  # noqa: BLE001 - AtomValenceException, KekulizeException, ...
        return None, str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return s, None


def is_valid(mol: MolLike, largest_fragment: bool = True) -> bool:
    """RDKit sanitisation succeeds on the largest fragment (default, MiDi) or on the whole molecule."""
    m = prepare(mol)
    if largest_fragment:
        m = _largest_fragment(m)
    return _sanitized(m)[0] is not None


def n_fragments(mol: MolLike) -> int:
    """Number of connected components of the bond graph."""
    m = prepare(mol)
    return len(Chem.GetMolFrags(m)) if m.GetNumAtoms() else 0


def is_connected(mol: MolLike) -> bool:
    """True when the bond graph has exactly one component."""
    return n_fragments(mol) == 1


def _remove_hs_params() -> Chem.RemoveHsParameters:
    """RemoveHs settings for stereo-free canonical SMILES: also drop hydrogens that only define
    double-bond stereo or carry a wedge (RDKit keeps those by default, e.g. the imine ``[H]N=CC``,
    which would then never match the training SMILES ``CC=N``)."""
    params = Chem.RemoveHsParameters()
    params.removeDefiningBondStereo = True
    params.removeWithWedgedBond = True
    return params


def _smiles_of_sanitized(s: Chem.Mol) -> str:
    return Chem.MolToSmiles(Chem.RemoveHs(s, _remove_hs_params(), sanitize=False), isomericSmiles=False)


def canonical_smiles(mol: MolLike, largest_fragment: bool = True) -> str | None:
    """Canonical RDKit SMILES (no stereo, hydrogens implicit) of the sanitized (largest fragment of
    the) molecule, or None when it is invalid."""
    m = prepare(mol)
    if largest_fragment:
        m = _largest_fragment(m)
    s, _ = _sanitized(m)
    return None if s is None else _smiles_of_sanitized(s)


def canonicalize_smiles(smiles: str) -> str | None:
    """Canonical form of a SMILES string as :func:`canonical_smiles` writes it, or None if unparsable."""
    m = Chem.MolFromSmiles(smiles.strip())
    if m is None:
        return None
    return Chem.MolToSmiles(Chem.RemoveHs(m, _remove_hs_params(), sanitize=False), isomericSmiles=False)


def smiles_hash(smiles: str) -> int:
    """Signed 64-bit hash of a SMILES string (blake2b), stable across processes and machines."""
    return int.from_bytes(hashlib.blake2b(smiles.encode(), digest_size=8).digest(), "little", signed=True)


@dataclass
class MolAssessment:
    """Everything the metrics need from one molecule, computed once."""

    n_atoms: int
    n_stable_atoms: int
    stable: bool
    valid: bool  # largest fragment sanitizes
    valid_whole: bool  # whole molecule sanitizes
    n_fragments: int
    smiles: str | None  # canonical SMILES of the largest fragment when valid
    missing_h: bool = False
    reason: str | None = None  # why invalid (RDKit's message) or why unparsable
    parsed: bool = True  # False for an unparsable record

    @property
    def connected(self) -> bool:
        return self.n_fragments == 1


def assess(mol: MolLike | None, reason: str | None = None) -> MolAssessment:
    """All per-molecule quantities. ``None`` is an unparsable record (``reason`` says why)."""
    if mol is None:
        return MolAssessment(0, 0, False, False, False, 0, None, reason=reason or "unparsable record", parsed=False)
    missing_h = isinstance(mol, Chem.Mol) and hydrogens_missing(mol)
    m = prepare(mol)
    val = atom_valences(m)
    flags = [atom_is_stable(a.GetSymbol(), a.GetFormalCharge(), v) for a, v in zip(m.GetAtoms(), val)]
    n = m.GetNumAtoms()
    n_frag = len(Chem.GetMolFrags(m)) if n else 0
    whole, why_whole = _sanitized(m)
    if n_frag <= 1:
        frag, why = whole, why_whole
    else:
        frag, why = _sanitized(_largest_fragment(m))
    return MolAssessment(
        n_atoms=n,
        n_stable_atoms=sum(flags),
        stable=bool(flags) and all(flags),
        valid=frag is not None,
        valid_whole=whole is not None,
        n_fragments=n_frag,
        smiles=None if frag is None else _smiles_of_sanitized(frag),
        missing_h=missing_h,
        reason=why if frag is None else (None if whole is not None else f"whole molecule: {why_whole}"),
    )


def _assessments(mols: MolBatch | Iterable[MolLike | MolAssessment | None]) -> list[MolAssessment]:
    if isinstance(mols, MolBatch):
        mols = mols.to_molecules()
    return [m if isinstance(m, MolAssessment) else assess(m) for m in mols]


# ---------------------------------------------------------------------------------------------------
# torchmetrics classes (sum-/cat-reduced states: DDP-safe and mergeable)
# ---------------------------------------------------------------------------------------------------


class _MolMetric(Metric):
    """Base: ``update`` takes a MolBatch, a list of Molecule / Chem.Mol / None, or MolAssessments."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def _count_state(self, *names: str) -> None:
        for name in names:
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, mols: MolBatch | Sequence[MolLike | MolAssessment | None]) -> None:  # type: ignore[override]
        self._update(_assessments(mols))

    def _update(self, recs: list[MolAssessment]) -> None:
        raise NotImplementedError


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num/den as float64; NaN when den is 0 (no molecules: the metric is undefined, not 0)."""
    return num.double() / den.double() if int(den) > 0 else torch.tensor(float("nan"), dtype=torch.float64)


class AtomStability(_MolMetric):
    """Fraction of stable atoms over all atoms."""

    def __init__(self, **kwargs) -> None:  # noqa: ANN003 - torchmetrics kwargs
        super().__init__(**kwargs)
        self._count_state("stable_atoms", "atoms")

    def _update(self, recs: list[MolAssessment]) -> None:
        self.stable_atoms += sum(r.n_stable_atoms for r in recs)
        self.atoms += sum(r.n_atoms for r in recs)

    def compute(self) -> Tensor:
        return _ratio(self.stable_atoms, self.atoms)


class _FractionOfMolecules(_MolMetric):
    _attr = ""

    def __init__(self, **kwargs) -> None:  # noqa: ANN003
        super().__init__(**kwargs)
        self._count_state("hits", "total")

    def _update(self, recs: list[MolAssessment]) -> None:
        self.hits += sum(bool(getattr(r, self._attr)) for r in recs)
        self.total += len(recs)

    def compute(self) -> Tensor:
        return _ratio(self.hits, self.total)


class MoleculeStability(_FractionOfMolecules):
    """Fraction of molecules whose atoms are all stable."""

    _attr = "stable"


class Connectivity(_FractionOfMolecules):
    """Fraction of molecules with one connected component."""

    _attr = "connected"


class Validity(_FractionOfMolecules):
    """Fraction of molecules that sanitize: largest fragment (default, MiDi) or whole molecule."""

    def __init__(self, largest_fragment: bool = True, **kwargs) -> None:  # noqa: ANN003
        super().__init__(**kwargs)
        self._attr = "valid" if largest_fragment else "valid_whole"


class _SmilesHashMetric(_MolMetric):
    """Keeps int64 hashes of the canonical SMILES of valid molecules in a cat-reduced tensor state."""

    def __init__(self, **kwargs) -> None:  # noqa: ANN003
        super().__init__(**kwargs)
        # A tensor (not list) default, so ranks without data still gather an int64 tensor.
        self.add_state("hashes", default=torch.zeros(0, dtype=torch.long), dist_reduce_fx="cat")

    def _update(self, recs: list[MolAssessment]) -> None:
        new = torch.tensor([smiles_hash(r.smiles) for r in recs if r.valid and r.smiles], dtype=torch.long)
        self.hashes = torch.cat([self.hashes, new.to(self.hashes.device)])


class Uniqueness(_SmilesHashMetric):
    """Distinct canonical SMILES among valid molecules / number of valid molecules."""

    def compute(self) -> Tensor:
        h = self.hashes.reshape(-1)
        return _ratio(torch.tensor(torch.unique(h).numel()), torch.tensor(h.numel()))


class Novelty(_SmilesHashMetric):
    """Unique valid SMILES absent from the training set / number of unique valid SMILES.

    ``train_smiles`` are canonicalised (:func:`canonicalize_smiles`) unless ``canonical=True`` says
    they already are; unparsable training SMILES are ignored.
    """

    def __init__(self, train_smiles: Iterable[str], canonical: bool = False, **kwargs) -> None:  # noqa: ANN003
        super().__init__(**kwargs)
        hashes = set()
        for s in train_smiles:
            c = s.strip() if canonical else canonicalize_smiles(s)
            if c:
                hashes.add(smiles_hash(c))
        self.register_buffer("train_hashes", torch.tensor(sorted(hashes), dtype=torch.long), persistent=False)

    def compute(self) -> Tensor:
        u = torch.unique(self.hashes.reshape(-1))
        novel = ~torch.isin(u, self.train_hashes.to(u.device))
        return _ratio(novel.sum(), torch.tensor(u.numel()))


# ---------------------------------------------------------------------------------------------------
# One call for everything
# ---------------------------------------------------------------------------------------------------


def evaluate_molecules(
    mols: MolBatch | Sequence[MolLike | MolAssessment | None],
    train_smiles: Iterable[str] | None = None,
    train_smiles_canonical: bool = False,
) -> dict[str, float]:
    """All metrics of a set of molecules (fractions in [0, 1], NaN when undefined) plus counts.

    Keys: atom_stability, molecule_stability, validity, validity_whole, connectivity,
    valid_and_connected, uniqueness, novelty (only with ``train_smiles``), n_molecules, n_atoms,
    mean_n_atoms, n_valid, n_unique, n_novel (with ``train_smiles``), n_unparsable, n_missing_h.
    ``None`` entries are unparsable records (count as failing every check). Set
    ``train_smiles_canonical`` when the training SMILES are already canonical (as in
    ``train_smiles.txt`` of a processed data directory), which skips re-canonicalising them.
    """
    recs = _assessments(mols)
    metrics: dict[str, _MolMetric] = {
        "atom_stability": AtomStability(),
        "molecule_stability": MoleculeStability(),
        "validity": Validity(largest_fragment=True),
        "validity_whole": Validity(largest_fragment=False),
        "connectivity": Connectivity(),
        "uniqueness": Uniqueness(),
    }
    if train_smiles is not None:
        metrics["novelty"] = Novelty(train_smiles, canonical=train_smiles_canonical)
    out: dict[str, float] = {}
    for name, metric in metrics.items():
        metric.update(recs)
        out[name] = float(metric.compute())
    n = len(recs)
    n_valid = sum(r.valid for r in recs)
    uniq = {r.smiles for r in recs if r.valid and r.smiles}
    out["valid_and_connected"] = sum(r.valid and r.connected for r in recs) / n if n else float("nan")
    out["n_molecules"] = n
    out["n_atoms"] = sum(r.n_atoms for r in recs)
    parsed = [r for r in recs if r.parsed]
    out["mean_n_atoms"] = sum(r.n_atoms for r in parsed) / len(parsed) if parsed else float("nan")
    out["n_stable"] = sum(r.stable for r in recs)
    out["n_valid"] = n_valid
    out["n_connected"] = sum(r.connected for r in recs)
    out["n_unique"] = len(uniq)
    if "novelty" in metrics:
        novel = metrics["novelty"]
        u = torch.unique(novel.hashes)
        out["n_novel"] = int((~torch.isin(u, novel.train_hashes)).sum())
    out["n_unparsable"] = sum(not r.parsed for r in recs)
    out["n_missing_h"] = sum(r.missing_h for r in recs)
    return out
