"""Molecule files: SDF writing (atomic, with SD properties) and tolerant SDF reading.

``write_sdf`` takes :class:`~flowmol_ext.batch.Molecule` objects or RDKit molecules and writes
explicit-H, Kekulé, charged 3D records. The default is V3000, whose atom lines keep 6 decimals of
each coordinate (Å; rounding error <= 5e-7 Å, so an xTB energy recomputed from the file agrees with
the stored one to ~1e-7 Eh, well under 1e-6 Eh). ``v3000=False`` writes V2000 (4 decimals, 5e-5 Å,
i.e. up to ~1e-4 Eh off) for tools that cannot read V3000.

The text is made in memory and written with Python file I/O (write, flush, fsync, then rename), so
a full disk or any other write error raises ``OSError`` and leaves no file: RDKit's ``SDWriter``
writing to a path ignores write errors.

``read_sdf`` reads any SDF (ours or another tool's, optionally gzipped) without sanitising and
without removing hydrogens, and keeps going past bad records.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rdkit import Chem, rdBase

from flowmol_ext.batch import Molecule
from flowmol_ext.chem import to_rdkit
from flowmol_ext.io_utils import atomic_write


def format_sd_value(value: Any) -> str:
    """Text of an SD property value: floats with ``repr`` precision, NaN as ``nan``, None as ``""``,
    bools as 0/1, lists/dicts as JSON, anything else with ``str`` (newlines replaced by spaces:
    an SD data field ends at its first blank line)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) or type(value).__name__ in {"float32", "float64", "float16"}:
        v = float(value)
        return "nan" if math.isnan(v) else repr(v)
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        return format_sd_value(value.item())
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=float)
    return " ".join(str(value).splitlines())


def _writable(mol: Molecule | Chem.Mol, index: int) -> Chem.Mol:
    if isinstance(mol, Molecule):
        try:
            m = to_rdkit(mol)
        except ValueError as err:
            raise ValueError(f"molecule {index}: {err}") from err
        for key, value in mol.props.items():
            m.SetProp(str(key), format_sd_value(value))
    elif isinstance(mol, Chem.Mol):
        m = Chem.Mol(mol)
        if any(b.GetIsAromatic() for b in m.GetBonds()):
            try:
                trial = Chem.Mol(m)
                trial.UpdatePropertyCache(strict=False)
                Chem.Kekulize(trial, clearAromaticFlags=True)
                m = trial
            except Exception:  # noqa: BLE001 - written as aromatic (bond type 4) then
                pass
    else:
        raise ValueError(f"molecule {index}: expected a Molecule or rdkit Chem.Mol, got {type(mol).__name__}")
    if m.GetNumConformers() == 0:
        raise ValueError(f"molecule {index}: no conformer (3D coordinates) to write")
    m.UpdatePropertyCache(strict=False)  # unsanitized molecules need valences before writing
    return m


def write_sdf(
    path: str | Path,
    molecules: Sequence[Molecule | Chem.Mol],
    properties: Sequence[dict[str, Any]] | None = None,
    v3000: bool = True,
) -> Path:
    """Write ``molecules`` to one SDF file, atomically (temporary name, then rename).

    Raises ``OSError`` (naming the file) when the file cannot be written completely, e.g. on a full
    disk; nothing is left at ``path`` then (an earlier file of that name stays untouched).

    ``properties[i]`` adds SD data fields to record i (overriding ``Molecule.props`` of the same
    name); e.g. ``{"energy_hartree": -40.5, "reason": "scf not converged"}``. A ``name`` entry becomes
    the record title. NaN is written as ``nan``. Returns the path.
    """
    path = Path(path)
    if properties is not None and len(properties) != len(molecules):
        raise ValueError(f"{path}: {len(properties)} property dicts for {len(molecules)} molecules")
    prepared = []
    for i, mol in enumerate(molecules):
        m = _writable(mol, i)
        for key, value in (properties[i] if properties is not None else {}).items():
            if "\n" in str(key) or not str(key).strip():
                raise ValueError(f"molecule {i}: SD property name {key!r} is empty or has a newline")
            m.SetProp(str(key), format_sd_value(value))
        if m.HasProp("name"):
            m.SetProp("_Name", m.GetProp("name"))
        prepared.append(m)

    text = sdf_text(prepared, v3000=v3000)

    def _write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())

    try:
        atomic_write(path, _write)
    except OSError as err:
        raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}") from err
    return path


def sdf_text(molecules: Sequence[Chem.Mol], v3000: bool = True) -> str:
    """The SDF text of prepared RDKit molecules (SD properties included), made in memory."""
    buf = io.StringIO()
    writer = Chem.SDWriter(buf)
    writer.SetForceV3000(v3000)
    writer.SetKekulize(False)
    try:
        for m in molecules:
            writer.write(m)
    finally:
        writer.close()
    text = buf.getvalue()
    n_records = text.count("$$$$\n")
    if n_records != len(molecules):
        raise ValueError(f"RDKit wrote {n_records} SDF records for {len(molecules)} molecules")
    return text


_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    """The SDF text of ``path`` as bytes, decompressed when its first bytes are the gzip magic
    (whatever its name says). Raises ``ValueError`` naming the file for truncated/corrupt gzip."""
    import zlib

    with open(path, "rb") as fh:
        data = fh.read()
    if data[:2] != _GZIP_MAGIC:
        return data
    try:
        return gzip.decompress(data)
    except (EOFError, OSError, zlib.error) as err:
        raise ValueError(f"{path}: truncated or corrupt gzip data ({err}); re-copy or re-compress the file") from None


def rdkit_reason(messages: str) -> str:
    """RDKit's captured log as one short line: the message of each entry, without C++ stack traces,
    file/line of the violated invariant, banners, or 'moving to the next molecule'."""
    out: list[str] = []
    in_trace = False
    for raw in messages.splitlines():
        ln = raw.split("] ", 1)[-1].strip() if raw.startswith("[") else raw.strip()
        if ln.startswith("ERROR: "):
            ln = ln[len("ERROR: "):]
        if not ln:
            continue
        if ln == "Stacktrace:":
            in_trace = True
            continue
        if ln.startswith("****"):
            in_trace = False
            continue
        if in_trace or ln.startswith("----") or ln.startswith("Violation occurred on line"):
            continue
        if "moving to the beginning of the next molecule" in ln or ln in out:
            continue
        out.append(ln)
    text = "; ".join(out)
    return text if len(text) <= 500 else text[:497] + "..."


def read_sdf(path: str | Path) -> list[tuple[Chem.Mol | None, str | None]]:
    """Read every record of an SDF (plain or gzip, told apart by the magic bytes, not the name):
    ``(mol, None)`` or ``(None, reason)``.

    Molecules are read with ``sanitize=False, removeHs=False`` (sanitise separately, e.g. for
    validity) and carry their SD properties. A bad record does not stop reading; its reason names
    the file, the 1-based record number and RDKit's message (one line, no C++ stack trace).
    Truncated or corrupt gzip data and files that are not text raise ``ValueError`` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such SDF file")
    data = _read_bytes(path)
    if b"\x00" in data[:65536]:
        raise ValueError(f"{path}: binary data, not an SDF text file (nor gzip-compressed SDF)")
    out: list[tuple[Chem.Mol | None, str | None]] = []
    capture = getattr(rdBase, "CaptureErrorLog", None)
    supplier = Chem.ForwardSDMolSupplier(io.BytesIO(data), sanitize=False, removeHs=False)
    while True:
        messages = ""
        try:
            if capture is not None:
                with capture() as cap:
                    mol = next(supplier)
                messages = cap.messages
            else:
                mol = next(supplier)
        except StopIteration:
            break
        record = len(out) + 1
        if mol is None:
            why = rdkit_reason(messages) or "RDKit could not parse the record"
            out.append((None, f"{path}: record {record}: {why}"))
        elif mol.GetNumAtoms() == 0:
            out.append((None, f"{path}: record {record}: molecule has no atoms"))
        else:
            out.append((mol, None))
    if not out:
        raise ValueError(f"{path}: no SDF records found")
    return out


# ---------------------------------------------------------------------------------------------------
# Snapshot-sample files (learning curves): molecules sampled from the snapshots of a pretraining run
# ---------------------------------------------------------------------------------------------------
#
# Format "fdc-mol/snapshot-samples/1": a torch file (``torch.save``, loadable with weights_only=True) holding
#   {"format": str, "n": int, "steps": int (integration steps), "device": str,
#    "records": [{"snapshot": str (step_XXXXXXX | model_last), "global_step": int | None,
#                 "wall_time_s": float | None (training time of the snapshot), "sample_seconds": float,
#                 "seed": int, "molecules": [{"x": float32 (n, 3) Å, "a": int8 (n,) atom type over
#                 [C, H, N, O, F], "c": int8 (n,) charge index (= charge + 2), "bonds": int16 (k, 3)
#                 rows [i, j, order]}]}]}
# Files of the same run sampled in several processes (other seeds) are pooled per snapshot on reading.

SNAPSHOT_FORMAT = "fdc-mol/snapshot-samples/1"


def encode_molecule(m: Molecule) -> dict[str, Any]:
    """One molecule as compact tensors of the snapshot-sample format."""
    import torch

    return {"x": m.x, "a": m.a.to(torch.int8), "c": m.c.to(torch.int8), "bonds": m.bonds.to(torch.int16)}


def decode_molecules(record: dict[str, Any]) -> list[Molecule]:
    """The molecules of one record of a snapshot-sample file."""
    return [Molecule(x=m["x"], a=m["a"].long(), c=m["c"].long(), bonds=m["bonds"].long()) for m in record["molecules"]]


def save_snapshot_samples(path: str | Path, records: list[dict[str, Any]], *, n: int, steps: int,
                          device: str) -> None:
    """Write a snapshot-sample file atomically (records as documented above, molecules already encoded)."""
    from flowmol_ext.io_utils import atomic_torch_save

    atomic_torch_save({"format": SNAPSHOT_FORMAT, "n": n, "steps": steps, "device": device, "records": records},
                      Path(path))


def load_snapshot_samples(files: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Records of one or more snapshot-sample files, pooled per snapshot and sorted by training step.

    Raises ValueError naming the file when two files disagree on a snapshot's step or a file is not one."""
    import torch

    merged: dict[str, dict[str, Any]] = {}
    for f in files:
        try:
            blob = torch.load(f, weights_only=True)
        except Exception as err:  # noqa: BLE001 - one line naming the file
            raise ValueError(f"{f}: not a snapshot-sample file ({type(err).__name__}: {err})") from err
        if not isinstance(blob, dict) or "records" not in blob:
            raise ValueError(f"{f}: not a snapshot-sample file (no 'records')")
        for rec in blob["records"]:
            rec = {**rec, "steps": blob["steps"], "device": blob["device"]}
            key = rec["snapshot"]
            if key not in merged:
                merged[key] = rec
                continue
            if merged[key]["global_step"] != rec["global_step"]:
                raise ValueError(f"{f}: snapshot {key} is step {rec['global_step']}, another file has step "
                                 f"{merged[key]['global_step']}")
            merged[key]["molecules"] = merged[key]["molecules"] + rec["molecules"]
    return sorted(merged.values(), key=lambda r: r["global_step"] or 0)
