"""QM9 sources -> raw records (elements, coordinates in Å, GDB-17 SMILES), with precise errors.

Sources (one record type whichever is used):
- the PyPI wheel ``qm9pack==1.0.3``: CSVs read straight from the zip (its loader is never imported);
- a CSV in the qm9pack part-file format (the committed test sample);
- the figshare archive ``dsgdb9nsd.xyz.tar.bz2`` (extended XYZ files);
- a directory of extended XYZ files in the same layout.

Every parsing error is a :class:`QM9FormatError` (a ``ValueError``) naming the file and the record.
This module needs only the standard library and numpy.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import subprocess
import sys
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowmol_ext import ATOM_TYPES

QM9PACK_VERSION = "1.0.3"
QM9PACK_WHEEL = f"qm9pack-{QM9PACK_VERSION}-py3-none-any.whl"
QM9PACK_SHA256 = "1d88c2988007c6778e717ee3224cf511bd60e10732ebe3b7ed500ea5af05c9f0"
QM9PACK_PARTS: tuple[str, ...] = tuple(f"qm9pack/data/qm9_part{k}.csv" for k in (1, 2, 3))
CSV_COLUMNS: tuple[str, ...] = ("XYZ_file", "Index", "SMILES", "N_atoms", "Elements", "XYZ_Ang")
N_QM9 = 133_885
MAX_ATOMS = 29

csv.field_size_limit(1 << 30)


class QM9FormatError(ValueError):
    """A QM9 input file is malformed; the message names the file and the record."""


class ChecksumError(ValueError):
    """A downloaded or given file does not have the expected sha256."""


@dataclass
class RawRecord:
    """One molecule as read from a source.

    ``elements`` n element symbols; ``coords`` (n, 3) float64 Å exactly as written; ``smiles`` the
    GDB-17 reference SMILES; ``where`` file and record, for messages.
    """

    qm9_index: int
    elements: tuple[str, ...]
    coords: np.ndarray
    smiles: str
    where: str


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: Path, expected: str) -> str:
    """Return the sha256 of ``path``; raise :class:`ChecksumError` if it differs from ``expected``."""
    got = sha256_file(path)
    if got != expected.lower():
        raise ChecksumError(f"{path}: sha256 {got} does not match the expected {expected}; delete it and fetch again")
    return got


_ELEMENTS = frozenset(ATOM_TYPES)


def _check_elements(elements: list[str], where: str) -> tuple[str, ...]:
    for k, el in enumerate(elements):
        if el not in _ELEMENTS:
            raise QM9FormatError(f"{where}: atom {k + 1}: unknown element {el!r} (expected one of {list(ATOM_TYPES)})")
    return tuple(elements)


def _float(text: str, where: str, what: str) -> float:
    t = text.strip().replace("*^", "e")
    try:
        return float(t)
    except ValueError:
        raise QM9FormatError(f"{where}: {what}: malformed number {text.strip()!r}") from None


# ----------------------------------------------------------------------------- CSV (qm9pack format)

_XYZ_FILE_RE = re.compile(r"dsgdb9nsd_(\d{6})\.xyz$")


def parse_csv_row(row: dict[str, str], where: str) -> RawRecord:
    """One row of a qm9pack part file -> :class:`RawRecord`."""
    try:
        index = int(row["Index"])
        n_atoms = int(row["N_atoms"])
    except (TypeError, ValueError):
        raise QM9FormatError(
            f"{where}: malformed Index/N_atoms ({row.get('Index')!r}, {row.get('N_atoms')!r}); truncated file?"
        ) from None
    if not 1 <= index <= N_QM9:
        raise QM9FormatError(f"{where}: QM9 index {index} outside 1..{N_QM9}")
    where = f"{where} (QM9 index {index})"
    m = _XYZ_FILE_RE.search(row["XYZ_file"] or "")
    if m is None or int(m.group(1)) != index:
        raise QM9FormatError(f"{where}: XYZ_file {row['XYZ_file']!r} does not match the index")
    el_text = (row["Elements"] or "").strip()
    if not (el_text.startswith("[") and el_text.endswith("]")):
        raise QM9FormatError(f"{where}: malformed Elements cell {el_text[:60]!r}")
    elements = [e.strip().strip("'\"") for e in el_text[1:-1].split(",")]
    elements = _check_elements(elements, where)
    xyz = (row["XYZ_Ang"] or "").strip()
    if not (xyz.startswith("[[") and xyz.endswith("]]")):
        raise QM9FormatError(f"{where}: malformed XYZ_Ang cell (must be [[x,y,z],...]): {xyz[:60]!r}...")
    triples = xyz[2:-2].split("],[")
    coords = np.empty((len(triples), 3), dtype=np.float64)
    for k, t in enumerate(triples):
        parts = t.split(",")
        if len(parts) != 3:
            raise QM9FormatError(f"{where}: atom {k + 1}: malformed coordinate {t!r} (need 3 numbers)")
        for d in range(3):
            coords[k, d] = _float(parts[d], where, f"atom {k + 1} coordinate")
    if not np.isfinite(coords).all():
        raise QM9FormatError(f"{where}: non-finite coordinate")
    if not (len(elements) == n_atoms == len(coords)):
        raise QM9FormatError(
            f"{where}: N_atoms {n_atoms}, {len(elements)} elements and {len(coords)} coordinates disagree"
        )
    if n_atoms > MAX_ATOMS:
        raise QM9FormatError(f"{where}: {n_atoms} atoms, QM9 has at most {MAX_ATOMS}")
    smiles = (row["SMILES"] or "").strip()
    if not smiles:
        raise QM9FormatError(f"{where}: empty SMILES")
    return RawRecord(index, elements, coords, smiles, where)


def iter_csv(stream: io.TextIOBase, name: str) -> Iterator[RawRecord]:
    """Records of a qm9pack-format CSV stream; ``name`` is used in messages (``file:line``)."""
    reader = csv.reader(stream)
    try:
        header = next(reader)
    except StopIteration:
        raise QM9FormatError(f"{name}: empty file (no header)") from None
    except csv.Error as err:
        raise QM9FormatError(f"{name}: line 1: {err}") from None
    missing = [c for c in CSV_COLUMNS if c not in header]
    if missing:
        raise QM9FormatError(f"{name}: line 1: header lacks columns {missing}; not a qm9pack part file")
    col = {c: header.index(c) for c in CSV_COLUMNS}
    n_cols = len(header)
    record = 0
    while True:
        line = reader.line_num + 1
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise QM9FormatError(f"{name}: line {line}: {err}") from None
        record += 1
        where = f"{name}: line {line} (record {record})"
        if len(values) != n_cols:
            raise QM9FormatError(f"{where}: {len(values)} fields instead of {n_cols}; truncated or corrupt file")
        yield parse_csv_row({c: values[i] for c, i in col.items()}, where)


def _check_ends_with_newline(data_tail: bytes, name: str, n_lines: int) -> None:
    if data_tail and not data_tail.endswith(b"\n"):
        raise QM9FormatError(f"{name}: line {n_lines}: file ends inside a record (no final newline); truncated file?")


def read_csv_file(path: Path) -> list[RawRecord]:
    """All records of a qm9pack-format CSV file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CSV file not found")
    with open(path, "rb") as fh:
        fh.seek(0, 2)
        if fh.tell() > 0:
            fh.seek(-1, 2)
            tail = fh.read(1)
        else:
            tail = b""
    with open(path, newline="", encoding="utf-8") as fh:
        try:
            records = list(iter_csv(fh, str(path)))
        except UnicodeDecodeError as err:
            raise QM9FormatError(f"{path}: not UTF-8 text ({err}); corrupt file?") from None
    _check_ends_with_newline(tail, str(path), len(records) + 1)
    return records


# ----------------------------------------------------------------------------- qm9pack wheel


def fetch_qm9pack(cache_dir: Path, expected_sha256: str = QM9PACK_SHA256) -> Path:
    """Return the cached qm9pack wheel (sha256 verified), downloading it with ``pip download`` if needed."""
    cache_dir = Path(cache_dir)
    wheel = cache_dir / QM9PACK_WHEEL
    if wheel.is_file():
        verify_sha256(wheel, expected_sha256)
        return wheel
    cache_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        f"qm9pack=={QM9PACK_VERSION}", "-d", str(cache_dir),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not wheel.is_file():
        raise FileNotFoundError(
            f"{wheel}: `{' '.join(cmd)}` failed (exit {done.returncode}): {done.stderr.strip()[-800:]}"
        )
    try:
        verify_sha256(wheel, expected_sha256)
    except ChecksumError:
        wheel.unlink(missing_ok=True)
        raise
    return wheel


def read_qm9pack_wheel(wheel: Path, expected_sha256: str | None = QM9PACK_SHA256) -> list[RawRecord]:
    """All records of the qm9pack wheel's part files, read straight from the zip.

    ``expected_sha256=None`` skips the checksum (tests with small home-made wheels).
    """
    wheel = Path(wheel)
    if not wheel.is_file():
        raise FileNotFoundError(f"{wheel}: wheel not found")
    if expected_sha256 is not None:
        verify_sha256(wheel, expected_sha256)
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as err:
        raise QM9FormatError(f"{wheel}: not a readable zip/wheel ({err}); corrupt or truncated download") from None
    records: list[RawRecord] = []
    with zf:
        names = set(zf.namelist())
        for part in QM9PACK_PARTS:
            name = f"{wheel}!{part}"
            if part not in names:
                raise QM9FormatError(f"{name}: member missing from the wheel")
            try:
                with zf.open(part) as raw:
                    data = raw.read()
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as err:
                raise QM9FormatError(f"{name}: corrupt zip member ({err})") from None
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as err:
                raise QM9FormatError(f"{name}: not UTF-8 text ({err})") from None
            part_records = list(iter_csv(io.StringIO(text, newline=""), name))
            _check_ends_with_newline(data[-1:], name, len(part_records) + 1)
            records.extend(part_records)
    return records


# ----------------------------------------------------------------------------- extended XYZ (figshare)


def parse_xyz_text(text: str, name: str) -> RawRecord:
    """One figshare extended-XYZ file -> :class:`RawRecord`.

    Layout: n_atoms; ``gdb <index> <15 properties>``; n lines ``El x y z mulliken`` (numbers may use
    Mathematica ``*^`` exponents); frequencies; ``GDB17-SMILES<TAB>relaxed-SMILES``; InChIs.
    """
    lines = text.splitlines()
    if not lines:
        raise QM9FormatError(f"{name}: empty file")
    try:
        n = int(lines[0].strip())
    except ValueError:
        raise QM9FormatError(f"{name}: line 1: atom count {lines[0].strip()!r} is not an integer") from None
    if not 1 <= n <= MAX_ATOMS:
        raise QM9FormatError(f"{name}: line 1: atom count {n} outside 1..{MAX_ATOMS}")
    if len(lines) < n + 5:
        raise QM9FormatError(f"{name}: {len(lines)} lines, need {n + 5} for {n} atoms; truncated file?")
    head = lines[1].split()
    if len(head) < 2 or head[0] != "gdb":
        raise QM9FormatError(f"{name}: line 2: expected 'gdb <index> ...', got {lines[1][:40]!r}")
    try:
        index = int(head[1])
    except ValueError:
        raise QM9FormatError(f"{name}: line 2: index {head[1]!r} is not an integer") from None
    if not 1 <= index <= N_QM9:
        raise QM9FormatError(f"{name}: line 2: QM9 index {index} outside 1..{N_QM9}")
    where = f"{name} (QM9 index {index})"
    elements: list[str] = []
    coords = np.empty((n, 3), dtype=np.float64)
    for k in range(n):
        fields = lines[2 + k].split()
        if len(fields) < 4:
            raise QM9FormatError(f"{where}: line {3 + k}: malformed atom line {lines[2 + k]!r} (need El x y z)")
        elements.append(fields[0])
        for d in range(3):
            coords[k, d] = _float(fields[1 + d], f"{where}: line {3 + k}", "coordinate")
    _check_elements(elements, where)
    if not np.isfinite(coords).all():
        raise QM9FormatError(f"{where}: non-finite coordinate")
    smiles_fields = lines[n + 3].split()
    if not smiles_fields:
        raise QM9FormatError(f"{where}: line {n + 4}: SMILES line is empty")
    return RawRecord(index, tuple(elements), coords, smiles_fields[0], where)


def read_figshare_tar(path: Path) -> list[RawRecord]:
    """All records of ``dsgdb9nsd.xyz.tar.bz2`` (any tar compression)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: archive not found")
    records: list[RawRecord] = []
    member = "<archive header>"
    try:
        with tarfile.open(path, mode="r:*") as tf:
            for info in tf:
                member = info.name
                if not info.isfile() or not info.name.endswith(".xyz"):
                    continue
                fh = tf.extractfile(info)
                data = fh.read() if fh is not None else b""
                records.append(parse_xyz_text(data.decode("utf-8", errors="strict"), f"{path}!{info.name}"))
    except (tarfile.TarError, zlib.error, EOFError, OSError, UnicodeDecodeError) as err:
        raise QM9FormatError(f"{path}!{member}: corrupt or truncated archive ({type(err).__name__}: {err})") from None
    if not records:
        raise QM9FormatError(f"{path}: no .xyz files in the archive")
    return records


def read_xyz_dir(path: Path) -> list[RawRecord]:
    """All records of a directory of ``*.xyz`` files (figshare layout)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: directory not found")
    files = sorted(path.glob("*.xyz"))
    if not files:
        raise QM9FormatError(f"{path}: no .xyz files")
    out = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise QM9FormatError(f"{f}: not UTF-8 text ({err})") from None
        out.append(parse_xyz_text(text, str(f)))
    return out


def sha256_xyz_dir(path: Path) -> str:
    """One sha256 over the sorted names and contents of a directory's ``*.xyz`` files."""
    h = hashlib.sha256()
    for f in sorted(Path(path).glob("*.xyz")):
        h.update(f.name.encode() + b"\0" + sha256_file(f).encode() + b"\n")
    return h.hexdigest()


# ----------------------------------------------------------------------------- uncharacterized list


def read_uncharacterized(path: Path) -> set[int]:
    """QM9 indices listed in ``uncharacterized.txt`` (every line whose first token is an integer)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: uncharacterized list not found")
    out: set[int] = set()
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        tok = line.split()
        if tok and tok[0].isdigit():
            idx = int(tok[0])
            if not 1 <= idx <= N_QM9:
                raise QM9FormatError(f"{path}: line {lineno}: index {idx} outside 1..{N_QM9}")
            out.add(idx)
    if not out:
        raise QM9FormatError(f"{path}: no indices found; not an uncharacterized.txt file")
    return out
