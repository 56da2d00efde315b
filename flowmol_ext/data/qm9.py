"""QM9 processing: source -> parsed molecules -> bonds/charges -> FlowMol splits -> shards + stats.

Output in ``data_dir`` (default ``data/qm9``), read back with :mod:`flowmol_ext.data.store`:
``{train,val,test}.pt`` shards, ``stats.pt``, ``train_smiles.txt``, ``splits.json`` (QM9 index lists
of FlowMol's split, before the uncharacterized molecules are removed), ``report.json`` (kept and
excluded molecules, per reason) and ``manifest.json`` (counts, source and its sha256, processor
version, output checksums), written last.

Files are written into a staging folder and moved into place; the old manifest is removed first
and the new one written last, so an interrupted run leaves no manifest and the next run redoes the
work from scratch. A run whose input fingerprint equals the manifest's is a no-op.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing as mp
import os
import secrets
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from flowmol_ext.data import sources as S
from flowmol_ext.data.store import (
    MANIFEST,
    SPLITS,
    STATS_FILE,
    TRAIN_SMILES_FILE,
    MoleculeStore,
    compute_stats,
    shard_path,
)
from flowmol_ext.io_utils import atomic_torch_save, atomic_write_text

log = logging.getLogger(__name__)

PROCESSOR_VERSION = "2"
SOURCES: tuple[str, ...] = ("qm9pack", "figshare", "xyz-dir", "csv")
FLOWMOL_SPLIT_SIZES: dict[str, int] = {"train": 100_000, "val": 20_497, "test": 13_388}
FLOWMOL_SPLIT_SEED = 42
SPLITS_FILE = "splits.json"
REPORT_FILE = "report.json"
OUTPUT_FILES: tuple[str, ...] = (*(f"{s}.pt" for s in SPLITS), STATS_FILE, TRAIN_SMILES_FILE, SPLITS_FILE, REPORT_FILE)
CHUNK = 256


def flowmol_split(n: int = S.N_QM9, seed: int = FLOWMOL_SPLIT_SEED) -> dict[str, np.ndarray]:
    """FlowMol's split as QM9 indices (1-based), each in permutation order.

    The permutation is ``pandas.DataFrame(index=range(n)).sample(frac=1, random_state=seed)``;
    QM9 index = row position + 1; train = first 100,000, val = next 20,497 (for n = 133,885),
    test = the rest (int(0.1 n) = 13,388).
    """
    import pandas as pd

    if n < 1:
        raise ValueError(f"split: need a positive row count, got {n}")
    perm = pd.DataFrame(index=range(n)).sample(frac=1, random_state=seed).index.to_numpy() + 1
    n_test = int(0.1 * n)
    n_train = min(FLOWMOL_SPLIT_SIZES["train"], n - n_test)
    n_val = n - n_train - n_test
    return {
        "train": perm[:n_train].astype(np.int64),
        "val": perm[n_train : n_train + n_val].astype(np.int64),
        "test": perm[n_train + n_val :].astype(np.int64),
    }


@dataclass
class SourceSpec:
    """A resolved input: ``kind`` in SOURCES, ``path`` the file/dir read, ``sha256`` of it, and the
    optional uncharacterized list."""

    kind: str
    path: Path
    sha256: str
    uncharacterized: Path | None = None
    uncharacterized_sha256: str | None = None
    extra: dict = field(default_factory=dict)

    def fingerprint(self, split_seed: int) -> dict:
        return {
            "processor_version": PROCESSOR_VERSION,
            "source": self.kind,
            "sha256": self.sha256,
            "uncharacterized_sha256": self.uncharacterized_sha256,
            "split_seed": split_seed,
        }

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "path": str(self.path),
            "sha256": self.sha256,
            "uncharacterized": str(self.uncharacterized) if self.uncharacterized else None,
            "uncharacterized_sha256": self.uncharacterized_sha256,
            **self.extra,
        }


def _find_uncharacterized(explicit: Path | None, *candidates: Path) -> Path | None:
    if explicit is not None:
        if not Path(explicit).is_file():
            raise FileNotFoundError(f"{explicit}: uncharacterized list not found")
        return Path(explicit)
    for c in candidates:
        if (c / "uncharacterized.txt").is_file():
            return c / "uncharacterized.txt"
    return None


def resolve_source(
    kind: str,
    path: str | Path | None = None,
    cache_dir: str | Path = "data/cache",
    uncharacterized: str | Path | None = None,
    expected_sha256: str = S.QM9PACK_SHA256,
) -> SourceSpec:
    """Locate (and for qm9pack fetch) the input and checksum it.

    ``qm9pack``: ``path`` a wheel file or None (cache, else ``pip download``); ``figshare``: ``path``
    the ``dsgdb9nsd.xyz.tar.bz2`` archive or a folder holding it; ``xyz-dir``: a folder of ``*.xyz``;
    ``csv``: a qm9pack-format CSV. ``uncharacterized.txt`` is looked for next to the input unless given.
    """
    if kind not in SOURCES:
        raise ValueError(f"unknown source {kind!r}; expected one of {list(SOURCES)}")
    unc = Path(uncharacterized) if uncharacterized is not None else None
    if kind == "qm9pack":
        wheel = Path(path) if path else S.fetch_qm9pack(Path(cache_dir), expected_sha256)
        sha = S.verify_sha256(wheel, expected_sha256) if path else expected_sha256
        spec = SourceSpec(kind, wheel, sha, extra={"package": f"qm9pack=={S.QM9PACK_VERSION}"})
        spec.uncharacterized = _find_uncharacterized(unc) if unc else None
    else:
        if path is None:
            raise ValueError(f"--source {kind} needs --path")
        p = Path(path)
        if kind == "figshare" and p.is_dir():
            p = p / "dsgdb9nsd.xyz.tar.bz2"
        if kind == "xyz-dir":
            if not p.is_dir():
                raise FileNotFoundError(f"{p}: directory of .xyz files not found")
            sha = S.sha256_xyz_dir(p)
        else:
            if not p.is_file():
                raise FileNotFoundError(f"{p}: {kind} input not found")
            sha = S.sha256_file(p)
        spec = SourceSpec(kind, p, sha)
        spec.uncharacterized = _find_uncharacterized(unc, p.parent if p.is_file() else p, p.parent)
        if kind in ("figshare", "xyz-dir") and spec.uncharacterized is None:
            raise FileNotFoundError(
                f"{p}: uncharacterized.txt not found next to the input; pass --uncharacterized PATH"
            )
    if spec.uncharacterized is not None:
        spec.uncharacterized_sha256 = S.sha256_file(spec.uncharacterized)
    return spec


def read_source(spec: SourceSpec, expected_sha256: str | None = S.QM9PACK_SHA256) -> list[S.RawRecord]:
    """Parse every record of a resolved source; duplicate QM9 indices are an error."""
    if spec.kind == "qm9pack":
        records = S.read_qm9pack_wheel(spec.path, expected_sha256=None)  # checksum verified when resolved
    elif spec.kind == "csv":
        records = S.read_csv_file(spec.path)
    elif spec.kind == "figshare":
        records = S.read_figshare_tar(spec.path)
    else:
        records = S.read_xyz_dir(spec.path)
    seen: dict[int, str] = {}
    for r in records:
        if r.qm9_index in seen:
            raise S.QM9FormatError(f"{r.where}: duplicate QM9 index {r.qm9_index} (first in {seen[r.qm9_index]})")
        seen[r.qm9_index] = r.where
    return records


def _perceive_all(records: list[S.RawRecord], workers: int, progress: bool) -> list:
    from flowmol_ext.data.perceive import perceive_chunk

    items = [(r.qm9_index, r.elements, r.coords, r.smiles) for r in records]
    chunks = [items[k : k + CHUNK] for k in range(0, len(items), CHUNK)]
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(items), desc="perceiving bonds", unit="mol", mininterval=2.0)
        except ImportError:
            bar = None
    out = []
    if workers <= 1 or len(chunks) <= 1:
        for ch in chunks:
            out.extend(perceive_chunk(ch))
            if bar:
                bar.update(len(ch))
    else:
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        with mp.get_context(method).Pool(workers) as pool:
            for res in pool.imap(perceive_chunk, chunks):
                out.extend(res)
                if bar:
                    bar.update(len(res))
    if bar:
        bar.close()
    return out


def _build_store(
    order: np.ndarray, records: dict[int, S.RawRecord], results: dict[int, object]
) -> MoleculeStore:
    from flowmol_ext.data.perceive import charge_indices, type_indices

    xs, as_, cs, bonds, n_atoms, n_bonds, idx, smiles = [], [], [], [], [], [], [], []
    for q in order.tolist():
        res = results.get(q)
        if res is None or res.status == "excluded":
            continue
        rec = records[q]
        xs.append(rec.coords.astype(np.float32))
        as_.append(type_indices(rec.elements))
        cs.append(charge_indices(res.charges))
        bonds.append(res.bonds)
        n_atoms.append(len(rec.elements))
        n_bonds.append(len(res.bonds))
        idx.append(q)
        smiles.append(res.smiles)

    def cat(parts: list[np.ndarray], shape: tuple[int, ...], dtype: type) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(parts) if parts else np.zeros(shape, dtype=dtype))

    return MoleculeStore(
        x=cat(xs, (0, 3), np.float32),
        a=cat(as_, (0,), np.int8),
        c=cat(cs, (0,), np.int8),
        n_atoms=torch.tensor(n_atoms, dtype=torch.int16),
        bonds=cat(bonds, (0, 3), np.int8),
        n_bonds=torch.tensor(n_bonds, dtype=torch.int16),
        qm9_index=torch.tensor(idx, dtype=torch.int32),
        smiles=smiles,
    )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _file_entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": S.sha256_file(path)}


def is_up_to_date(data_dir: Path, fingerprint: dict) -> dict | None:
    """The manifest if ``data_dir`` holds complete output for ``fingerprint`` (files checked), else None."""
    path = data_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if manifest.get("fingerprint") != fingerprint:
        return None
    for name, entry in manifest.get("files", {}).items():
        f = data_dir / name
        if not f.is_file() or f.stat().st_size != entry.get("bytes") or S.sha256_file(f) != entry.get("sha256"):
            return None
    return manifest


def clean_leftovers(data_dir: Path) -> list[str]:
    """Remove staging folders and temporary files of interrupted runs; return their names."""
    removed = []
    if data_dir.is_dir():
        for p in data_dir.iterdir():
            if p.name.startswith(".staging-") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
            elif p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p.name)
    return removed


def process_qm9(
    source: str = "qm9pack",
    path: str | Path | None = None,
    data_dir: str | Path = "data/qm9",
    cache_dir: str | Path = "data/cache",
    *,
    uncharacterized: str | Path | None = None,
    workers: int | None = None,
    force: bool = False,
    split_seed: int = FLOWMOL_SPLIT_SEED,
    progress: bool = True,
    expected_sha256: str = S.QM9PACK_SHA256,
    _before_commit: Callable[[Path], None] | None = None,
) -> dict:
    """Run the whole pipeline and return the report (``report["noop"]`` is True if nothing was redone).

    ``_before_commit(staging_dir)`` is a test hook called after every output is staged and before
    anything in ``data_dir`` changes.
    """
    data_dir = Path(data_dir)
    spec = resolve_source(source, path, cache_dir, uncharacterized, expected_sha256)
    with data_dir_lock(data_dir):
        return _process_locked(spec, data_dir, workers=workers, force=force, split_seed=split_seed,
                               progress=progress, expected_sha256=expected_sha256, _before_commit=_before_commit)


LOCK_FILE = ".fdc-mol.lock"


@contextlib.contextmanager
def data_dir_lock(data_dir: Path) -> Iterator[Path]:
    """Hold an exclusive ``fcntl`` lock on ``<data_dir>/.fdc-mol.lock`` (created if missing) for the
    whole run. A second run into the same folder fails at once with a ``ValueError`` naming the
    holder (pid, host, start time, command) instead of deleting the first run's staging files. The
    lock dies with its process (no stale locks after a kill)."""
    from flowmol_ext.io_utils import exclusive_dir_lock

    with exclusive_dir_lock(data_dir, LOCK_FILE, lambda holder: (
            f"{data_dir} is being processed by another run ({holder}; lock {data_dir / LOCK_FILE}); wait for it "
            "to finish or use another --data-dir")) as lock_path:
        try:
            yield lock_path
        finally:
            if [p.name for p in data_dir.iterdir()] == [LOCK_FILE]:
                # nothing was produced (bad input, interrupted before the commit): leave no trace
                lock_path.unlink(missing_ok=True)


def _process_locked(
    spec: SourceSpec,
    data_dir: Path,
    *,
    workers: int | None,
    force: bool,
    split_seed: int,
    progress: bool,
    expected_sha256: str,
    _before_commit: Callable[[Path], None] | None,
) -> dict:
    t0 = time.perf_counter()
    fingerprint = spec.fingerprint(split_seed)
    if not force:
        manifest = is_up_to_date(data_dir, fingerprint)
        if manifest is not None:
            report = json.loads((data_dir / REPORT_FILE).read_text())
            report["noop"] = True
            log.info("%s is up to date for this input (manifest %s); nothing to do", data_dir, data_dir / MANIFEST)
            return report
    removed = clean_leftovers(data_dir)
    if removed:
        log.info("removed leftovers of an interrupted run: %s", removed)

    t_parse = time.perf_counter()
    records = read_source(spec, expected_sha256)
    t_parse = time.perf_counter() - t_parse
    if not records:
        raise ValueError(f"{spec.path}: no molecules in the input (empty file or header only); nothing to process")
    unc = S.read_uncharacterized(spec.uncharacterized) if spec.uncharacterized else set()
    by_index = {r.qm9_index: r for r in records}
    removed_unc = sorted(q for q in by_index if q in unc)
    todo = [r for r in records if r.qm9_index not in unc]
    log.info("parsed %d records from %s in %.1f s; %d uncharacterized removed", len(records), spec.path, t_parse,
             len(removed_unc))

    t_perc = time.perf_counter()
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    results = {res.qm9_index: res for res in _perceive_all(todo, workers, progress)}
    t_perc = time.perf_counter() - t_perc

    status = Counter(r.status for r in results.values())
    reasons = Counter(r.reason for r in results.values() if r.status == "excluded")
    excluded_idx: dict[str, list[int]] = {}
    for r in sorted(results.values(), key=lambda r: r.qm9_index):
        if r.status == "excluded":
            excluded_idx.setdefault(r.reason, []).append(r.qm9_index)
    n_in = len(todo)
    n_kept = status["perceived"] + status["repaired"]

    split_lists = flowmol_split(seed=split_seed)
    stores = {s: _build_store(split_lists[s], by_index, results) for s in SPLITS}
    if len(stores["train"]) == 0:
        raise ValueError(f"{spec.path}: none of its {len(records)} molecules ({n_kept} kept) falls in FlowMol's "
                         "training split; pretraining would have no data")
    stats = {s: compute_stats(stores[s]) for s in SPLITS}
    split_counts = {
        s: {
            "listed": int(len(split_lists[s])),
            "in_source": int(sum(1 for q in split_lists[s].tolist() if q in by_index)),
            "uncharacterized_removed": int(sum(1 for q in split_lists[s].tolist() if q in by_index and q in unc)),
            "kept": len(stores[s]),
        }
        for s in SPLITS
    }
    report = {
        "noop": False,
        "source": spec.describe(),
        "processor_version": PROCESSOR_VERSION,
        "n_records": len(records),
        "n_uncharacterized_removed": len(removed_unc),
        "n_absent_from_source": S.N_QM9 - len(records),
        # with an uncharacterized list: how many absent indices it explains (qm9pack: all 3,054)
        "n_absent_uncharacterized": len(unc - by_index.keys()) if unc else None,
        "n_input": n_in,
        "n_kept": n_kept,
        "kept_fraction": n_kept / n_in if n_in else 0.0,
        "n_perceived": status["perceived"],
        "n_repaired": status["repaired"],
        "n_excluded": status["excluded"],
        "excluded": dict(sorted(reasons.items())),
        "excluded_indices": excluded_idx,
        "repaired_indices": sorted(r.qm9_index for r in results.values() if r.status == "repaired"),
        "splits": split_counts,
        "split_seed": split_seed,
        "timings_s": {"parse": round(t_parse, 2), "perceive": round(t_perc, 2)},
        "workers": workers,
        "data_dir": str(data_dir),
    }

    data_dir.mkdir(parents=True, exist_ok=True)
    staging = data_dir / f".staging-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        for s in SPLITS:
            atomic_torch_save(stores[s].to_dict(), shard_path(staging, s))
        atomic_torch_save(
            {
                s: {
                    "n_atoms_hist": st.n_atoms_hist,
                    "p_a": st.p_a,
                    "p_c": st.p_c,
                    "p_e": st.p_e,
                    "n_molecules": st.n_molecules,
                }
                for s, st in stats.items()
            },
            staging / STATS_FILE,
        )
        atomic_write_text(staging / TRAIN_SMILES_FILE, "".join(f"{s}\n" for s in sorted(set(stores["train"].smiles))))
        atomic_write_text(
            staging / SPLITS_FILE,
            json.dumps({"seed": split_seed, **{s: split_lists[s].tolist() for s in SPLITS}}),
        )
        report["timings_s"]["total"] = round(time.perf_counter() - t0, 2)
        atomic_write_text(staging / REPORT_FILE, json.dumps(report, indent=1))
        files = {name: _file_entry(staging / name) for name in OUTPUT_FILES}
        manifest = {
            "processor": "flowmol_ext.data.qm9",
            "processor_version": PROCESSOR_VERSION,
            "fingerprint": fingerprint,
            "source": spec.describe(),
            "counts": {k: report[k] for k in ("n_records", "n_uncharacterized_removed", "n_input", "n_kept",
                                                "n_perceived", "n_repaired", "n_excluded", "excluded")},
            "splits": split_counts,
            "files": files,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if _before_commit is not None:
            _before_commit(staging)
        # Commit: the manifest goes first and comes back last, so a crash leaves "not processed".
        (data_dir / MANIFEST).unlink(missing_ok=True)
        mode = 0o666 & ~_umask()
        for name in OUTPUT_FILES:
            os.chmod(staging / name, mode)  # temp files are created 0600; outputs are ordinary files
            os.replace(staging / name, data_dir / name)
        atomic_write_text(data_dir / MANIFEST, json.dumps(manifest, indent=1))
        os.chmod(data_dir / MANIFEST, mode)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def format_summary(report: dict) -> str:
    """Human-readable summary of a report."""
    if report.get("noop"):
        head = f"QM9 data in {report['data_dir']} is up to date (no-op)."
    else:
        head = f"Processed QM9 from {report['source']['kind']} ({report['source']['path']}) into {report['data_dir']}."
    lines = [
        head,
        f"  records read: {report['n_records']} (QM9 indices absent from the source: {report['n_absent_from_source']});"
        f" uncharacterized removed: {report['n_uncharacterized_removed']}",
        f"  kept: {report['n_kept']} / {report['n_input']} ({100 * report['kept_fraction']:.3f} %)"
        f" = {report['n_perceived']} perceived + {report['n_repaired']} repaired from the reference SMILES",
        f"  excluded: {report['n_excluded']}"
        + "".join(f"\n    {k}: {v}" for k, v in report["excluded"].items()),
        "  splits: " + ", ".join(f"{s} {c['kept']} (of {c['listed']} listed)" for s, c in report["splits"].items()),
        f"  report: {Path(report['data_dir']) / REPORT_FILE}",
    ]
    return "\n".join(lines)
