"""The QM9 pipeline on the committed sample: perception, splits, idempotence, interruption, store."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from rdkit import Chem

from flowmol_ext.data import sources as S
from flowmol_ext.data.perceive import canonical_smiles, perceive
from flowmol_ext.data.qm9 import LOCK_FILE, OUTPUT_FILES, flowmol_split, process_qm9
from flowmol_ext.data.store import (
    MANIFEST,
    DataNotProcessedError,
    compute_stats,
    load_split,
    load_stats,
    load_train_smiles,
)

from .conftest import N_SMALL, SAMPLE_CSV, SAMPLE_UNC


@pytest.fixture(scope="module")
def sample_results() -> dict:
    recs = S.read_csv_file(SAMPLE_CSV)
    return {r.qm9_index: (r, perceive(r.qm9_index, r.elements, r.coords, r.smiles)) for r in recs}


def test_perception_matches_reference_smiles_on_sample(sample_results: dict) -> None:
    status = [p.status for _, p in sample_results.values()]
    n = len(status)
    n_perceived, n_repaired = status.count("perceived"), status.count("repaired")
    # Measured on the 312-molecule sample: 301 directly perceived (96.5 %), 11 repaired, 0 excluded.
    assert n == 312 and n_perceived + n_repaired == 312
    assert n_perceived / n >= 0.95
    for rec, p in sample_results.values():
        ref = Chem.MolToSmiles(Chem.MolFromSmiles(rec.smiles), isomericSmiles=False)
        assert p.smiles == ref, rec.where
        # bonds: i < j, orders 1..3, each H has exactly one bond, valid local indices
        b = p.bonds.astype(int)
        assert (b[:, 0] < b[:, 1]).all() and set(b[:, 2]) <= {1, 2, 3}
        assert b[:, :2].max() < len(rec.elements)
        deg = np.bincount(b[:, :2].ravel(), minlength=len(rec.elements))
        h = np.array([e == "H" for e in rec.elements])
        assert (deg[h] == 1).all(), rec.where


def test_repair_of_strained_cage(sample_results: dict) -> None:
    # 8069 COC1C2CC1(C)O2: DetermineBonds adds a spurious bond across the oxetane-fused ring.
    rec, p = sample_results[8069]
    assert p.status == "repaired" and p.n_spurious >= 1
    assert p.smiles == Chem.MolToSmiles(Chem.MolFromSmiles("COC1C2CC1(C)O2"), isomericSmiles=False)
    # every bond of the repaired graph is a real covalent contact (< 1.7 Å)
    d = np.linalg.norm(rec.coords[p.bonds[:, 0]] - rec.coords[p.bonds[:, 1]], axis=1)
    assert d.max() < 1.7


def test_charges_perceived_for_zwitterion() -> None:
    # glycine zwitterion [NH3+]CC([O-])=O is QM9 80 (uncharacterized); build a clean geometry with RDKit.
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles("[NH3+]CC([O-])=O"))
    AllChem.EmbedMolecule(mol, randomSeed=7)
    els = tuple(a.GetSymbol() for a in mol.GetAtoms())
    p = perceive(80, els, mol.GetConformer().GetPositions(), "[NH3+]CC([O-])=O")
    assert p.status in ("perceived", "repaired")
    assert sorted(p.charges.tolist()) == sorted([1, -1] + [0] * (len(els) - 2))
    assert p.smiles == "[NH3+]CC(=O)[O-]"


def test_composition_mismatch_is_excluded() -> None:
    rec = S.read_csv_file(SAMPLE_CSV)[0]
    p = perceive(1, rec.elements, rec.coords, "N")
    assert p.status == "excluded" and p.reason == "composition_mismatch"


def test_flowmol_split_sizes_and_reproducibility() -> None:
    s = flowmol_split()
    assert {k: len(v) for k, v in s.items()} == {"train": 100_000, "val": 20_497, "test": 13_388}
    allidx = np.concatenate(list(s.values()))
    assert np.array_equal(np.sort(allidx), np.arange(1, 133_886))
    assert s["train"][:5].tolist() == [3116, 117880, 23434, 61956, 98812]
    assert s["test"][-2:].tolist() == [131933, 121959]
    # pandas sample(frac=1, random_state=42) is numpy RandomState(42).permutation
    assert np.array_equal(allidx, np.random.RandomState(42).permutation(133_885) + 1)
    again = flowmol_split()
    assert all(np.array_equal(s[k], again[k]) for k in s)
    # FlowMol's published counts after dropping the uncharacterized molecules: 97,734 / 20,042 / 13,055
    unc = S.read_uncharacterized(SAMPLE_UNC)
    kept = {k: int(sum(1 for q in v.tolist() if q not in unc)) for k, v in s.items()}
    assert kept == {"train": 97_734, "val": 20_042, "test": 13_055}


def test_processed_sample_outputs(processed_sample: tuple[Path, dict]) -> None:
    out, report = processed_sample
    assert report["n_kept"] == 312 and report["n_excluded"] == 0 and report["excluded"] == {}
    assert report["n_perceived"] == 301 and report["n_repaired"] == 11
    assert {s: c["kept"] for s, c in report["splits"].items()} == {"train": 226, "val": 54, "test": 32}
    assert report["n_absent_from_source"] == 133_885 - 312 and report["n_absent_uncharacterized"] == 3054
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["source"]["sha256"] == "75253c5774a782f69f8f3eea25f1357076de5fac51649e93400011f6e6f8df02"
    assert manifest["processor_version"] and set(manifest["files"]) == set(OUTPUT_FILES)
    splits = json.loads((out / "splits.json").read_text())
    assert splits["train"][:5] == [3116, 117880, 23434, 61956, 98812] and len(splits["val"]) == 20_497
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != LOCK_FILE]


def test_store_round_trip(processed_sample: tuple[Path, dict], sample_results: dict) -> None:
    from flowmol_ext.chem import to_rdkit

    out, _ = processed_sample
    seen = set()
    for split in ("train", "val", "test"):
        store = load_split(out, split)
        assert store.x.dtype == torch.float32 and store.a.dtype == torch.int8 and store.bonds.dtype == torch.int16
        for i in range(len(store)):
            m = store[i]
            rec, p = sample_results[m.props["qm9_index"]]
            seen.add(rec.qm9_index)
            assert torch.equal(m.x, torch.from_numpy(rec.coords.astype(np.float32)))
            assert [("C", "H", "N", "O", "F")[k] for k in m.a.tolist()] == list(rec.elements)
            assert (m.c - 2).tolist() == p.charges.tolist()
            assert m.bonds.tolist() == p.bonds.astype(int).tolist()
            assert m.props["smiles"] == p.smiles
            assert canonical_smiles(to_rdkit(m, sanitize=True)) == p.smiles
    assert len(seen) == 312


def test_stats_and_train_smiles(processed_sample: tuple[Path, dict]) -> None:
    out, _ = processed_sample
    train = load_split(out, "train")
    st = load_stats(out, "train")
    assert st.n_molecules == 226 == int(st.n_atoms_hist.sum())
    assert int((st.n_atoms_hist * torch.arange(len(st.n_atoms_hist))).sum()) == train.x.shape[0]
    # brute force over molecules with the Molecule.e_upper view
    e = torch.cat([train[i].e_upper() for i in range(len(train))])
    assert torch.allclose(st.p_e, torch.bincount(e, minlength=4).double() / e.numel())
    assert torch.allclose(st.p_a, torch.bincount(train.a.long(), minlength=5).double() / train.a.numel())
    assert st.p_c.shape == (6,) and float(st.p_c.sum()) == pytest.approx(1.0)
    assert torch.equal(compute_stats(train).n_atoms_hist, st.n_atoms_hist)
    assert load_train_smiles(out) == set(train.smiles)


def test_second_run_is_noop_and_force_redoes(tmp_path: Path, sample_copy: Path) -> None:
    out = tmp_path / "out"
    r1 = process_qm9("csv", sample_copy, out, workers=1, progress=False)
    assert not r1["noop"]
    mtimes = {f: (out / f).stat().st_mtime_ns for f in (*OUTPUT_FILES, MANIFEST)}
    r2 = process_qm9("csv", sample_copy, out, workers=1, progress=False)
    assert r2["noop"] and r2["n_kept"] == r1["n_kept"]
    assert mtimes == {f: (out / f).stat().st_mtime_ns for f in mtimes}
    # a changed input is not a no-op
    sample_copy.write_text(sample_copy.read_text().replace("\n", "\n", 1))  # same bytes -> still no-op
    assert process_qm9("csv", sample_copy, out, workers=1, progress=False)["noop"]
    lines = sample_copy.read_text().splitlines(keepends=True)
    sample_copy.write_text("".join(lines[:-1]))
    r3 = process_qm9("csv", sample_copy, out, workers=2, progress=False)
    assert not r3["noop"] and r3["n_kept"] == N_SMALL - 1
    assert not process_qm9("csv", sample_copy, out, workers=1, progress=False, force=True)["noop"]


def test_interrupted_run_leaves_nothing_half_written(tmp_path: Path, sample_copy: Path) -> None:
    out = tmp_path / "out"

    def crash(staging: Path) -> None:
        assert (staging / "train.pt").is_file()  # everything was staged
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        process_qm9("csv", sample_copy, out, workers=1, progress=False, _before_commit=crash)
    assert list(out.iterdir()) == []  # staging removed, nothing moved in
    with pytest.raises(DataNotProcessedError, match="run `fdc-mol data qm9"):
        load_split(out, "train")

    # a complete run, then a crash while committing a newer one: no manifest -> "not processed"
    process_qm9("csv", sample_copy, out, workers=1, progress=False)
    (out / MANIFEST).unlink()
    (out / ".staging-123-dead").mkdir()
    (out / ".staging-123-dead" / "train.pt").write_bytes(b"partial")
    (out / ".val.pt.abc.tmp").write_bytes(b"partial")
    with pytest.raises(DataNotProcessedError, match="manifest missing"):
        load_split(out, "val")
    with pytest.raises(DataNotProcessedError):
        load_stats(out)
    rerun = process_qm9("csv", sample_copy, out, workers=1, progress=False)
    assert not rerun["noop"] and rerun["n_kept"] == N_SMALL
    assert sorted(p.name for p in out.iterdir()) == sorted([*OUTPUT_FILES, MANIFEST, LOCK_FILE])
    assert sum(len(load_split(out, s)) for s in ("train", "val", "test")) == N_SMALL


def test_corrupted_output_is_redone(tmp_path: Path, sample_copy: Path) -> None:
    out = tmp_path / "out"
    process_qm9("csv", sample_copy, out, workers=1, progress=False)
    with open(out / "test.pt", "ab") as fh:
        fh.write(b"x")
    assert not process_qm9("csv", sample_copy, out, workers=1, progress=False)["noop"]


def test_cli(tmp_path: Path, sample_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fdc_mol.cli import main

    out = tmp_path / "cli"
    argv = ["data", "qm9", "--source", "csv", "--path", str(sample_copy), "--data-dir", str(out), "--workers", "1",
            "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert f"kept: {N_SMALL} / {N_SMALL} (100.000 %)" in text and "train " in text and str(out) in text
    assert main(argv) == 0
    assert "up to date (no-op)" in capsys.readouterr().out
    assert main(["data", "qm9", "--source", "csv", "--path", str(tmp_path / "missing.csv"), "--data-dir",
                 str(out)]) == 2
    assert "missing.csv" in capsys.readouterr().err


@pytest.mark.full_data
def test_full_qm9_processed() -> None:
    """Opt-in: the full qm9pack data set processed into data/qm9 (or $FDC_MOL_QM9_DIR)."""
    data_dir = Path(os.environ.get("FDC_MOL_QM9_DIR", "data/qm9"))
    report = process_qm9("qm9pack", None, data_dir, os.environ.get("FDC_MOL_CACHE_DIR", "data/cache"),
                         progress=False)
    assert report["n_records"] == 130_831 and report["n_input"] == 130_831
    assert report["kept_fraction"] >= 0.99
    assert report["n_excluded"] == sum(report["excluded"].values())
    n = {s: len(load_split(data_dir, s)) for s in ("train", "val", "test")}
    assert sum(n.values()) == report["n_kept"]
    assert n["train"] <= 97_734 and n["val"] <= 20_042 and n["test"] <= 13_055
    st = load_stats(data_dir, "train")
    assert st.n_molecules == n["train"] and len(st.n_atoms_hist) == 30
    total = sum((data_dir / f).stat().st_size for f in OUTPUT_FILES)
    assert total < 45e6


def test_store_packing_round_trip_and_old_format(processed_sample: tuple[Path, dict]) -> None:
    from flowmol_ext.data.store import MoleculeStore

    out, _ = processed_sample
    train = load_split(out, "train")
    packed = train.to_dict()
    assert packed["format"] == 2 and packed["bonds_packed"].dtype == torch.int16 and packed["ac"].dtype == torch.int8
    again = MoleculeStore.from_dict(packed)
    v1 = {"format": 1, "x": train.x, "a": train.a, "c": train.c, "n_atoms": train.n_atoms,
          "bonds": train.bonds.to(torch.int8), "n_bonds": train.n_bonds, "qm9_index": train.qm9_index,
          "smiles": train.smiles}
    for other in (again, MoleculeStore.from_dict(v1)):
        for k in ("x", "a", "c", "n_atoms", "bonds", "n_bonds", "qm9_index"):
            assert torch.equal(getattr(other, k), getattr(train, k)), k
        assert other.smiles == train.smiles
    with pytest.raises(ValueError, match="not a processed QM9 shard"):
        MoleculeStore.from_dict({"format": 2, "x": train.x}, source="s.pt")


def _xyz_text(rec: S.RawRecord, index: int | None = None) -> str:
    """A figshare-style extended XYZ file for a record (coordinates with *^ exponents where small)."""

    def num(v: float) -> str:
        return f"{v * 1e6:.4f}*^-6" if 0 < abs(v) < 1e-3 else f"{v:.10f}"

    q = rec.qm9_index if index is None else index
    atoms = "".join(f"{el}\t{num(x)}\t{num(y)}\t{num(z)}\t0.0\n" for el, (x, y, z) in zip(rec.elements, rec.coords))
    tail = f"100.0\t200.0\n{rec.smiles}\t{rec.smiles}\nInChI=x\tInChI=x\n"
    return f"{len(rec.elements)}\ngdb {q}\t1.0\t2.0\n{atoms}{tail}"


def test_figshare_and_xyz_dir_sources_give_the_csv_result(tmp_path: Path) -> None:
    import shutil
    import tarfile

    recs = S.read_csv_file(SAMPLE_CSV)[:12]
    csv_path = tmp_path / "small.csv"
    lines = SAMPLE_CSV.read_text().splitlines(keepends=True)
    csv_path.write_text("".join(lines[:13]))
    shutil.copy(SAMPLE_UNC, tmp_path / "uncharacterized.txt")
    xyz_dir = tmp_path / "xyz"
    xyz_dir.mkdir()
    for r in recs:
        (xyz_dir / f"dsgdb9nsd_{r.qm9_index:06d}.xyz").write_text(_xyz_text(r))
    # an uncharacterized molecule (index 58) is present in figshare but must be removed
    (xyz_dir / "dsgdb9nsd_000058.xyz").write_text(_xyz_text(recs[0], index=58))
    shutil.copy(SAMPLE_UNC, xyz_dir / "uncharacterized.txt")
    tar_path = tmp_path / "dsgdb9nsd.xyz.tar.bz2"
    with tarfile.open(tar_path, "w:bz2") as tf:
        for f in sorted(xyz_dir.glob("*.xyz")):
            tf.add(f, arcname=f.name)

    ref = process_qm9("csv", csv_path, tmp_path / "o_csv", workers=1, progress=False)
    fig = process_qm9("figshare", tmp_path, tmp_path / "o_fig", workers=1, progress=False)
    xyz = process_qm9("xyz-dir", xyz_dir, tmp_path / "o_xyz", workers=1, progress=False)
    assert ref["n_uncharacterized_removed"] == 0 and ref["n_kept"] == 12
    for rep in (fig, xyz):
        assert rep["n_records"] == 13 and rep["n_uncharacterized_removed"] == 1 and rep["n_kept"] == 12
    for split in ("train", "val", "test"):
        a = load_split(tmp_path / "o_csv", split)
        for other in ("o_fig", "o_xyz"):
            b = load_split(tmp_path / other, split)
            for k in ("x", "a", "c", "n_atoms", "bonds", "qm9_index"):
                assert torch.equal(getattr(a, k), getattr(b, k)), (other, split, k)
            assert a.smiles == b.smiles
    with pytest.raises(FileNotFoundError, match="uncharacterized.txt not found"):
        (xyz_dir / "uncharacterized.txt").unlink()  # looked for in the folder and its parent
        (tmp_path / "uncharacterized.txt").unlink()
        process_qm9("xyz-dir", xyz_dir, tmp_path / "o_x2", workers=1, progress=False)


def test_unexpected_error_is_an_exclusion_with_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    from flowmol_ext.data import perceive as P

    rec = S.read_csv_file(SAMPLE_CSV)[1]

    def boom(*args: object) -> None:
        raise RuntimeError("rdkit exploded")

    monkeypatch.setattr(P, "perceive", boom)
    (res,) = P.perceive_chunk([(rec.qm9_index, rec.elements, rec.coords, rec.smiles)])
    assert res.status == "excluded" and res.reason == "perception_error:RuntimeError" and res.qm9_index == 2
