"""Geometry quality of 3D molecules, as the field now reports it (``fdc-mol evaluate --geometry``).

* **GFN2-xTB relaxation** (tblite energies and gradients, scipy L-BFGS-B): for each valid molecule,
  the relaxation energy E(start) − E(relaxed) in kcal/mol and the heavy-atom RMSD (Å, after Kabsch
  superposition, atom order kept) between the start and the relaxed geometry. Convergence: the
  largest gradient component below ``gtol`` (default 5e-4 Eh/Å) or the relative energy change below
  1e-12, within ``max_steps`` (default 500) L-BFGS iterations; molecules that hit the step limit
  keep their numbers and are counted in ``geometry_n_not_converged``. A molecule whose relaxation
  fails (SCF, timeout, crash) gets NaN and its reason. Relaxations run on any executor (a local
  process pool by default, one OpenMP thread per worker).
* **PoseBusters** molecule-only checks (``posebusters`` package, optional extra ``geometry``): the
  pass rate of each check over the valid molecules.
* **Internal diversity**: 1 − mean pairwise Tanimoto similarity of Morgan fingerprints (radius 2,
  2048 bits) over the valid molecules.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from fdc_mol.rewards.base import MolSpec, RewardSettings

log = logging.getLogger(__name__)

__all__ = ["HARTREE_TO_KCAL", "RelaxResult", "geometry_metrics", "heavy_atom_rmsd", "internal_diversity",
           "posebusters_pass_rates", "posebusters_table", "relax_chunk", "relax_molecules"]

HARTREE_TO_KCAL = 627.509474  # kcal/mol per Hartree (CODATA 2018)
STEP_A = 0.05  # length of L-BFGS's first step, Å (variables are scaled by it)


class RelaxResult(NamedTuple):
    """One relaxation: energies in Eh, relaxed positions (n,3) Å, L-BFGS iterations, convergence."""

    energy_start: float
    energy_relaxed: float
    x_relaxed: np.ndarray | None
    n_steps: int
    converged: bool
    reason: str = ""


def _failed(reason: str) -> RelaxResult:
    return RelaxResult(float("nan"), float("nan"), None, 0, False, reason)


def relax_one(spec: MolSpec, s: RewardSettings, max_steps: int, gtol: float) -> RelaxResult:
    """Relax one molecule with GFN-xTB (``s.method``) from its coordinates; never raises.

    ``gtol``: gradient tolerance, Eh/Å (largest component); ``max_steps``: L-BFGS iterations.
    """
    from scipy.optimize import minimize

    from fdc_mol.rewards.gate import spin_uhf
    from fdc_mol.rewards.worker import EngineTimeout, _with_deadline
    from fdc_mol.rewards.xtb import EngineError, make_xtb_function

    try:
        uhf, why = spin_uhf(spec, s)
        if why:
            return _failed(why)
        deadline = time.monotonic() + s.timeout_s
        fn = _with_deadline(make_xtb_function(spec.z, spec.x, spec.charge, uhf, s), deadline, s.timeout_s)
        e0, _ = fn(spec.x)
        shape = spec.x.shape
        x0 = np.asarray(spec.x, np.float64)
        # L-BFGS-B's first step has length 1 in its variables: optimise y = (x - x0) / STEP_A so that it
        # is STEP_A Å (a 1 Å first step can break bonds and stall the SCF); gradient tolerance scales too.

        def f(y: np.ndarray) -> tuple[float, np.ndarray]:
            e, g = fn(x0 + STEP_A * y.reshape(shape))
            return e, STEP_A * np.asarray(g, np.float64).reshape(-1)

        out = minimize(f, np.zeros(x0.size), jac=True, method="L-BFGS-B",
                       options={"maxiter": max_steps, "gtol": STEP_A * gtol, "ftol": 1e-12})
        x_rel = x0 + STEP_A * out.x.reshape(shape)
        e_rel, g_rel = fn(x_rel)
        if not (np.isfinite(e0) and np.isfinite(e_rel)):
            return _failed(f"{s.method} returned a non-finite energy")
        converged = bool(np.abs(g_rel).max() <= gtol) or bool(out.success)
        return RelaxResult(float(e0), float(e_rel), x_rel, int(out.nit), converged)
    except EngineTimeout as err:
        return _failed(str(err))
    except EngineError as err:
        return _failed(str(err))
    except Exception as err:  # noqa: BLE001 - one molecule never takes the batch down
        return _failed(f"unexpected error: {type(err).__name__}: {err}")


def relax_chunk(specs: list[MolSpec], s: RewardSettings, max_steps: int, gtol: float) -> list[RelaxResult]:
    """The executor task: relax molecules in order."""
    from fdc_mol.rewards.worker import _preload

    _preload(s)
    return [relax_one(sp, s, max_steps, gtol) for sp in specs]


def heavy_atom_rmsd(z: np.ndarray, x_a: np.ndarray, x_b: np.ndarray) -> float:
    """RMSD (Å) over the heavy atoms (Z > 1) of two geometries of one molecule after optimal
    superposition (Kabsch; atom order kept, no symmetry matching). NaN with no heavy atom."""
    heavy = np.asarray(z) > 1
    if not heavy.any():
        return float("nan")
    a = np.asarray(x_a, np.float64)[heavy]
    b = np.asarray(x_b, np.float64)[heavy]
    a = a - a.mean(0)
    b = b - b.mean(0)
    u, _, vt = np.linalg.svd(a.T @ b)
    d = np.sign(np.linalg.det(u @ vt))
    rot = u @ np.diag([1.0, 1.0, d]) @ vt
    return float(np.sqrt(((a @ rot - b) ** 2).sum(1).mean()))


def relax_molecules(
    molecules: Sequence[Any],
    *,
    method: str = "gfn2",
    workers: int = 1,
    max_steps: int = 500,
    gtol: float = 5e-4,
    timeout_s: float = 300.0,
    chunk_size: int = 4,
) -> list[RelaxResult]:
    """Relax :class:`~flowmol_ext.batch.Molecule` objects (parallel over ``workers`` processes).

    ``gtol`` Eh/Å, ``timeout_s`` s per molecule. Returns one :class:`RelaxResult` per molecule, in
    order; failures (including crashed workers) are NaN with a reason.
    """
    from fdc_mol.rewards.base import spec_from_molecule
    from fdc_mol.rewards.parallel import LocalPool, SerialExecutor, shutdown_executor

    s = RewardSettings(method=method, engine="tblite", timeout_s=timeout_s)
    specs = [spec_from_molecule(m) for m in molecules]
    results: list[RelaxResult | None] = [None] * len(specs)
    todo = []
    for i, sp in enumerate(specs):
        if sp.error:
            results[i] = _failed(sp.error)
        else:
            todo.append(i)
    chunks = [todo[k:k + chunk_size] for k in range(0, len(todo), chunk_size)]
    executor = SerialExecutor() if workers <= 1 else LocalPool(workers)
    try:
        futures = [executor.submit(relax_chunk, [specs[i] for i in ch], s, max_steps, gtol) for ch in chunks]
        for ch, fut in zip(chunks, futures):
            try:
                for i, r in zip(ch, fut.result()):
                    results[i] = r
            except Exception as err:  # noqa: BLE001 - a crashed worker: its molecules fail, the rest go on
                for i in ch:
                    results[i] = _failed(f"worker failed: {type(err).__name__}: {err}")
    finally:
        shutdown_executor(executor)
    return [r if r is not None else _failed("internal error: no result") for r in results]


def posebusters_table(mol_blocks: Sequence[bytes]) -> Any:
    """PoseBusters molecule-only checks (``config="mol"``) of RDKit molecules given as ``Chem.Mol.ToBinary``
    blocks (picklable, conformer kept): a pandas DataFrame, one row per molecule, one column per check.
    Runs in the worker processes of :func:`posebusters_pass_rates`."""
    from posebusters import PoseBusters
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    try:
        return PoseBusters(config="mol").bust([Chem.Mol(b) for b in mol_blocks], None, None, full_report=False)
    finally:
        RDLogger.EnableLog("rdApp.*")


def posebusters_pass_rates(rdkit_mols: Sequence[Any], workers: int = 1,
                           chunk_size: int = 25) -> dict[str, float] | None:
    """Pass rate (0..1) of each PoseBusters molecule-only check (``config="mol"``) and, under
    ``"all_checks"``, the fraction of molecules passing every check; None when the ``posebusters``
    package is not installed (``pip install 'fdc-mol[geometry]'``).

    The checks run in ``workers`` (at least one) fresh worker processes, in chunks of ``chunk_size`` molecules:
    the checks are per molecule, so the rates do not depend on the split, and a fresh process is needed for
    right answers (measured in the test process after other tests: ``inchi_convertible`` came out 0 and
    ``internal_energy`` NaN for molecules that pass both). The energy-ratio check, which embeds a conformer
    ensemble per molecule, dominates the cost. Molecules of a chunk whose worker fails are left out of the rates
    and counted under ``n_failed``; ``n_checked`` is the number the rates are over."""
    try:
        import posebusters  # noqa: F401
    except ImportError:
        return None
    if not rdkit_mols:
        return {}
    import pandas as pd

    from fdc_mol.rewards.parallel import LocalPool, shutdown_executor

    blocks = [m.ToBinary() for m in rdkit_mols]
    chunks = [blocks[k:k + chunk_size] for k in range(0, len(blocks), chunk_size)]
    executor = LocalPool(max(1, workers))
    parts, n_failed = [], 0
    try:
        futures = [executor.submit(posebusters_table, ch) for ch in chunks]
        for ch, fut in zip(chunks, futures):
            try:
                parts.append(fut.result())
            except Exception as err:  # noqa: BLE001 - a crashed worker: its molecules are not counted
                log.warning("PoseBusters worker failed (%s: %s); %d molecules left out of the pass rates",
                            type(err).__name__, err, len(ch))
                n_failed += len(ch)
    finally:
        shutdown_executor(executor)
    if not parts:
        return {"n_checked": 0.0, "n_failed": float(n_failed)}
    table = pd.concat(parts, ignore_index=True)
    rates = {str(col): float(table[col].astype(float).mean()) for col in table.columns}
    rates["all_checks"] = float(table.astype(bool).all(axis=1).astype(float).mean())
    rates["n_checked"], rates["n_failed"] = float(len(table)), float(n_failed)
    return rates


def internal_diversity(rdkit_mols: Sequence[Any]) -> float:
    """1 − mean pairwise Tanimoto similarity (Morgan radius 2, 2048 bits) over all pairs; NaN with
    fewer than two molecules."""
    from rdkit import DataStructs
    from rdkit.Chem import rdFingerprintGenerator

    if len(rdkit_mols) < 2:
        return float("nan")
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    fps = [gen.GetFingerprint(m) for m in rdkit_mols]
    total, pairs = 0.0, 0
    for i in range(1, len(fps)):
        sims = DataStructs.BulkTanimotoSimilarity(fps[i], fps[:i])
        total += float(sum(sims))
        pairs += len(sims)
    return 1.0 - total / pairs


def geometry_metrics(rdkit_mols: Sequence[Any | None], *, workers: int = 1, max_steps: int = 500,
                     gtol: float = 5e-4, timeout_s: float = 300.0) -> dict[str, Any]:
    """The ``--geometry`` block of ``fdc-mol evaluate`` over the valid (sanitisable) molecules."""
    from rdkit import Chem

    from flowmol_ext.chem import from_rdkit

    valid_rd, valid_mols = [], []
    for m in rdkit_mols:
        if m is None:
            continue
        trial = Chem.Mol(m)
        try:
            Chem.SanitizeMol(trial)
            mol = from_rdkit(m)
        except Exception:  # noqa: BLE001 - invalid molecules are not relaxed
            continue
        valid_rd.append(trial)
        valid_mols.append(mol)
    t0 = time.perf_counter()
    relaxed = relax_molecules(valid_mols, workers=workers, max_steps=max_steps, gtol=gtol, timeout_s=timeout_s)
    wall = time.perf_counter() - t0
    e_relax = np.array([(r.energy_start - r.energy_relaxed) * HARTREE_TO_KCAL for r in relaxed])
    rmsd = np.array([heavy_atom_rmsd(_z(m), m.x.double().numpy(), r.x_relaxed) if r.x_relaxed is not None
                     else np.nan for m, r in zip(valid_mols, relaxed)])
    ok = np.isfinite(e_relax)
    out: dict[str, Any] = {
        "geometry_n_valid": len(valid_mols),
        "geometry_n_relaxed": int(ok.sum()),
        "geometry_n_not_converged": int(sum(1 for r in relaxed if np.isfinite(r.energy_relaxed) and not r.converged)),
        "relax_energy_median_kcal_mol": float(np.median(e_relax[ok])) if ok.any() else float("nan"),
        "relax_energy_mean_kcal_mol": float(np.mean(e_relax[ok])) if ok.any() else float("nan"),
        "heavy_atom_rmsd_median_A": float(np.median(rmsd[ok])) if ok.any() else float("nan"),
        "relax_wall_time_s": round(wall, 2),
        "relax_failure_reasons": dict(Counter(r.reason for r in relaxed if r.reason).most_common()),
        "internal_diversity": internal_diversity(valid_rd),
    }
    t1 = time.perf_counter()
    rates = posebusters_pass_rates(valid_rd, workers=workers)
    out["posebusters_wall_time_s"] = round(time.perf_counter() - t1, 2)
    out["posebusters"] = rates if rates is not None else "not installed (pip install 'fdc-mol[geometry]')"
    return out


def _z(mol: Any) -> np.ndarray:
    """Atomic numbers (n,) of a :class:`~flowmol_ext.batch.Molecule` (types [C,H,N,O,F])."""
    from flowmol_ext import ATOM_TYPES

    numbers = {"C": 6, "H": 1, "N": 7, "O": 8, "F": 9}
    return np.array([numbers[ATOM_TYPES[int(a)]] for a in mol.a])
