"""Parsing of every QM9 source, and a precise error for each kind of bad input."""

from __future__ import annotations

import bz2
import csv
import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from flowmol_ext.data import sources as S
from flowmol_ext.data.qm9 import process_qm9

from .conftest import SAMPLE_CSV, SAMPLE_UNC

csv.field_size_limit(1 << 30)

# QM9 molecule 1 (CH4), as in dsgdb9nsd_000001.xyz, with one coordinate in Mathematica exponent form.
_PROPS = "157.7118\t157.70997\t157.70699\t0.\t13.21\t-0.3877\t0.1171\t0.5048\t35.3641\t0.044749\t-40.47893\t"
XYZ_CH4 = f"""5
gdb 1\t{_PROPS}-40.476062\t-40.475117\t-40.498597\t6.469\t
C\t-0.0126981359\t 1.0858041578\t 0.0080009958\t-0.535689
H\t 0.002150416\t-0.0060313176\t 0.0019761204\t 0.133921
H\t 1.0117308433\t 1.4637511618\t 0.0002765748\t 0.133922
H\t-0.540815069\t 1.4475266138\t-0.8766437152\t 0.133923
H\t-0.5238136345\t 1.4379326443\t 9.063972942*^-1\t 0.133923
1341.307\t1341.3284\t1341.365\t1562.6731\t1562.7453\t3038.3205\t3151.6034\t3151.6788\t3151.7078
C\tC\t
InChI=1S/CH4/h1H4\tInChI=1S/CH4/h1H4
"""


def _sample_lines() -> list[str]:
    return SAMPLE_CSV.read_text().splitlines(keepends=True)


def _rows() -> tuple[list[str], list[list[str]]]:
    rows = list(csv.reader(io.StringIO(SAMPLE_CSV.read_text())))
    return rows[0], rows[1:]


def _write_rows(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return path


def test_sample_csv_parses_all_rows_exactly() -> None:
    recs = S.read_csv_file(SAMPLE_CSV)
    assert len(recs) == 312
    assert [r.qm9_index for r in recs[:3]] == [1, 2, 3]
    ch4 = recs[0]
    assert ch4.elements == ("C", "H", "H", "H", "H") and ch4.smiles == "C"
    assert ch4.coords[0].tolist() == [-0.0126981359, 1.0858041578, 0.0080009958]
    assert ch4.coords[1].tolist() == [0.002150416, -0.0060313176, 0.0019761204]
    # element totals over the sample agree with the per-row N_atoms column
    header, rows = _rows()
    assert sum(len(r.elements) for r in recs) == sum(int(row[header.index("N_atoms")]) for row in rows)
    assert max(len(r.elements) for r in recs) == 29


def test_exponent_and_bare_point_numbers(tmp_path: Path) -> None:
    header, rows = _rows()
    row = list(rows[0])
    k = header.index("XYZ_Ang")
    row[k] = "[[-0.0126981359,1.0858041578,7.4083E-6],[0.,-0.0060313176,1.],[1.0117308433,1.4637511618,-2.5e-05]," \
             "[-0.540815069,1.4475266138,-0.8766437152],[-0.5238136345,1.4379326443,0.9063972942]]"
    rec = S.read_csv_file(_write_rows(tmp_path / "exp.csv", header, [row]))[0]
    assert rec.coords[0, 2] == 7.4083e-6
    assert rec.coords[1, 0] == 0.0 and rec.coords[1, 2] == 1.0
    assert rec.coords[2, 2] == -2.5e-5


def test_figshare_xyz_with_mathematica_exponent() -> None:
    rec = S.parse_xyz_text(XYZ_CH4, "dsgdb9nsd_000001.xyz")
    assert rec.qm9_index == 1 and rec.smiles == "C" and rec.elements == ("C", "H", "H", "H", "H")
    assert rec.coords[4, 2] == pytest.approx(0.9063972942, abs=1e-15)
    assert rec.coords[0].tolist() == [-0.0126981359, 1.0858041578, 0.0080009958]
    # same molecule from the CSV sample, same numbers
    csv_rec = S.read_csv_file(SAMPLE_CSV)[0]
    np.testing.assert_allclose(rec.coords, csv_rec.coords, rtol=0, atol=1e-15)


def test_figshare_tar_and_xyz_dir(tmp_path: Path) -> None:
    xyz2 = XYZ_CH4.replace("gdb 1\t", "gdb 2\t", 1)
    d = tmp_path / "xyz"
    d.mkdir()
    (d / "dsgdb9nsd_000001.xyz").write_text(XYZ_CH4)
    (d / "dsgdb9nsd_000002.xyz").write_text(xyz2)
    recs = S.read_xyz_dir(d)
    assert [r.qm9_index for r in recs] == [1, 2]
    tar_path = tmp_path / "dsgdb9nsd.xyz.tar.bz2"
    with tarfile.open(tar_path, "w:bz2") as tf:
        for f in sorted(d.iterdir()):
            tf.add(f, arcname=f.name)
    recs_tar = S.read_figshare_tar(tar_path)
    assert [r.qm9_index for r in recs_tar] == [1, 2]
    np.testing.assert_array_equal(recs_tar[0].coords, recs[0].coords)


def test_uncharacterized_list() -> None:
    unc = S.read_uncharacterized(SAMPLE_UNC)
    assert len(unc) == 3054
    assert {58, 61, 80, 185, 133864, 133865, 133866} <= unc
    assert not unc & {r.qm9_index for r in S.read_csv_file(SAMPLE_CSV)}


# ------------------------------------------------------------------ bad input


def test_truncated_csv_names_file_and_line(tmp_path: Path) -> None:
    text = SAMPLE_CSV.read_text()
    cut = text[: text.index('"dsgdb9nsd_000010.xyz"') + 300]  # inside record 10 (line 11)
    bad = tmp_path / "trunc.csv"
    bad.write_text(cut)
    with pytest.raises(S.QM9FormatError) as err:
        S.read_csv_file(bad)
    msg = str(err.value)
    assert str(bad) in msg and "line 11" in msg


def test_csv_missing_last_newline_is_truncation(tmp_path: Path) -> None:
    bad = tmp_path / "nonl.csv"
    bad.write_text(SAMPLE_CSV.read_text().rstrip("\n"))
    with pytest.raises(S.QM9FormatError, match="no final newline"):
        S.read_csv_file(bad)


@pytest.mark.parametrize(
    ("column", "value", "expected"),
    [
        ("Elements", "['C','Xx','H','H','H']", r"line 2 \(record 1\) \(QM9 index 1\): atom 2: unknown element 'Xx'"),
        ("XYZ_Ang", "[[-0.01,1.08,0.008],[0.0021,-0.006,0.0019],[1.01,1.46,0.0002],[-0.54,1.4.4,-0.87],[-0.5,1.4,0.9]]",
         r"line 2 \(record 1\) \(QM9 index 1\): atom 4 coordinate: malformed number '1.4.4'"),
        ("XYZ_Ang", "[[-0.01,1.08,0.008],[0.0021,-0.006],[1.01,1.46,0.0002],[-0.54,1.4,-0.87],[-0.5,1.4,0.9]]",
         r"QM9 index 1\): atom 2: malformed coordinate"),
        ("N_atoms", "6", r"QM9 index 1\): N_atoms 6, 5 elements and 5 coordinates disagree"),
    ],
)
def test_bad_record_names_file_and_record(tmp_path: Path, column: str, value: str, expected: str) -> None:
    header, rows = _rows()
    rows[0][header.index(column)] = value
    bad = _write_rows(tmp_path / "bad.csv", header, rows[:3])
    with pytest.raises(S.QM9FormatError, match=expected) as err:
        S.read_csv_file(bad)
    assert str(bad) in str(err.value)


def test_xyz_malformed_coordinate_line() -> None:
    bad = XYZ_CH4.replace("H\t 1.0117308433\t 1.4637511618\t 0.0002765748", "H\t 1.0117308433\tnan1\t0.1")
    with pytest.raises(S.QM9FormatError, match=r"x.xyz \(QM9 index 1\): line 5: coordinate: malformed number 'nan1'"):
        S.parse_xyz_text(bad, "x.xyz")
    short = XYZ_CH4.replace("H\t 1.0117308433\t 1.4637511618\t 0.0002765748\t 0.133922", "H 1.0")
    with pytest.raises(S.QM9FormatError, match=r"line 5: malformed atom line"):
        S.parse_xyz_text(short, "x.xyz")
    with pytest.raises(S.QM9FormatError, match=r"unknown element 'Si'"):
        S.parse_xyz_text(XYZ_CH4.replace("C\t-0.0126981359", "Si\t-0.0126981359"), "x.xyz")


def _fake_wheel(path: Path) -> Path:
    """A small wheel with the qm9pack layout: the sample split over the three part files."""
    lines = _sample_lines()
    header, body = lines[0], lines[1:]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for k, part in enumerate(S.QM9PACK_PARTS):
            zf.writestr(part, header + "".join(body[k * 104 : (k + 1) * 104]))
    return path


def test_wheel_reading_and_checksum(tmp_path: Path) -> None:
    wheel = _fake_wheel(tmp_path / S.QM9PACK_WHEEL)
    sha = S.sha256_file(wheel)
    recs = S.read_qm9pack_wheel(wheel, expected_sha256=sha)
    assert len(recs) == 312 and recs[0].qm9_index == 1
    assert "qm9_part2.csv" in recs[104].where and "line 2 (record 1)" in recs[104].where
    with pytest.raises(S.ChecksumError, match=f"{wheel}: sha256 {sha} does not match the expected {'0' * 64}"):
        S.read_qm9pack_wheel(wheel, expected_sha256="0" * 64)
    # fetch_qm9pack uses a cached wheel only if its checksum matches (no download attempted here)
    with pytest.raises(S.ChecksumError, match="does not match"):
        S.fetch_qm9pack(tmp_path, expected_sha256="1" * 64)
    assert S.fetch_qm9pack(tmp_path, expected_sha256=sha) == wheel


def test_corrupt_and_truncated_wheel(tmp_path: Path) -> None:
    wheel = _fake_wheel(tmp_path / "good.whl")
    data = wheel.read_bytes()
    trunc = tmp_path / "trunc.whl"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(S.QM9FormatError, match=f"{trunc}: not a readable zip/wheel"):
        S.read_qm9pack_wheel(trunc, expected_sha256=None)
    # flip bytes inside the compressed data of part 2: the CRC/deflate check names the member
    with zipfile.ZipFile(wheel) as zf:
        info = zf.getinfo(S.QM9PACK_PARTS[1])
    corrupt = bytearray(data)
    start = info.header_offset + 30 + len(info.filename) + 200
    corrupt[start : start + 64] = bytes(64)
    bad = tmp_path / "corrupt.whl"
    bad.write_bytes(bytes(corrupt))
    with pytest.raises(S.QM9FormatError, match=rf"{bad}!qm9pack/data/qm9_part2.csv: corrupt"):
        S.read_qm9pack_wheel(bad, expected_sha256=None)


def test_corrupt_tar(tmp_path: Path) -> None:
    tar_path = tmp_path / "dsgdb9nsd.xyz.tar.bz2"
    with tarfile.open(tar_path, "w:bz2") as tf:
        for k in range(1, 40):
            data = XYZ_CH4.replace("gdb 1\t", f"gdb {k}\t", 1).encode()
            info = tarfile.TarInfo(f"dsgdb9nsd_{k:06d}.xyz")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    raw = tar_path.read_bytes()
    trunc = tmp_path / "trunc.tar.bz2"
    trunc.write_bytes(raw[: len(raw) * 2 // 3])
    with pytest.raises(S.QM9FormatError, match=rf"{trunc}!.*corrupt or truncated archive"):
        S.read_figshare_tar(trunc)
    garbage = tmp_path / "garbage.tar.bz2"
    garbage.write_bytes(bz2.compress(b"not a tar file at all" * 50)[:-10])
    with pytest.raises(S.QM9FormatError, match=rf"{garbage}!.*corrupt or truncated archive"):
        S.read_figshare_tar(garbage)


def test_bad_input_leaves_nothing_behind(tmp_path: Path) -> None:
    header, rows = _rows()
    rows[5][header.index("Elements")] = rows[5][header.index("Elements")].replace("'C'", "'Cl'", 1)
    bad = _write_rows(tmp_path / "bad.csv", header, rows)
    out = tmp_path / "out"
    with pytest.raises(S.QM9FormatError, match=r"line 7 \(record 6\) \(QM9 index 6\): atom 1: unknown element 'Cl'"):
        process_qm9("csv", bad, out, workers=1, progress=False)
    assert not out.exists() or not any(out.iterdir())


def test_duplicate_index_is_an_error(tmp_path: Path) -> None:
    header, rows = _rows()
    bad = _write_rows(tmp_path / "dup.csv", header, rows[:4] + rows[2:3])
    with pytest.raises(S.QM9FormatError, match=r"line 6 \(record 5\) \(QM9 index 3\): duplicate QM9 index 3"):
        process_qm9("csv", bad, tmp_path / "out", workers=1, progress=False)


def test_fetch_downloads_with_pip_and_verifies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    src = _fake_wheel(tmp_path / "src.whl")
    sha = S.sha256_file(src)
    calls = []

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / S.QM9PACK_WHEEL).write_bytes(src.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    cache = tmp_path / "cache"
    wheel = S.fetch_qm9pack(cache, expected_sha256=sha)
    assert wheel == cache / S.QM9PACK_WHEEL and S.sha256_file(wheel) == sha
    assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"] and "qm9pack==1.0.3" in calls[0]
    # a download with the wrong checksum is deleted, not kept in the cache
    cache2 = tmp_path / "cache2"
    with pytest.raises(S.ChecksumError, match="does not match"):
        S.fetch_qm9pack(cache2, expected_sha256="f" * 64)
    assert not (cache2 / S.QM9PACK_WHEEL).exists()
