"""write_sdf under write errors (full disk via RLIMIT_FSIZE), full-precision coordinates, and the
``fdc-mol sample`` exit code when its output cannot be written."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

from fdc_mol.io import read_sdf, write_sdf
from flowmol_ext.chem import from_rdkit
from tests.flowmol_ext.test_chem import qm9_sample

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _limit_file_size(limit_bytes: int):  # noqa: ANN202 - preexec_fn
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return apply


def test_write_sdf_raises_on_a_full_disk_and_leaves_no_file(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        from fdc_mol.io import write_sdf
        from flowmol_ext.chem import from_rdkit
        from tests.flowmol_ext.test_chem import qm9_sample
        mols = [from_rdkit(m) for m, _ in qm9_sample()[:30]]
        try:
            write_sdf({str(tmp_path / 'out.sdf')!r}, mols)
        except OSError as err:
            print("OSError:", err)
            raise SystemExit(3)
        print("no error")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          preexec_fn=_limit_file_size(4000), timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "out.sdf" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # neither a truncated file nor a temporary one


def test_sample_cli_fails_nonzero_without_claiming_success_on_a_full_disk(tmp_path: Path) -> None:
    out = tmp_path / "mols.sdf"
    proc = subprocess.run([sys.executable, "-m", "fdc_mol.cli", "sample", "-n", "20", "--steps", "2", "--device",
                           "cpu", "-o", str(out)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          preexec_fn=_limit_file_size(3000), timeout=300)
    assert proc.returncode != 0
    assert "wrote" not in proc.stdout
    assert "Traceback" not in proc.stderr
    assert str(out) in proc.stderr.strip().splitlines()[-1]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_default_sdf_keeps_coordinates_for_energies_to_1e_6_hartree(tmp_path: Path) -> None:
    from tblite.interface import Calculator

    bohr_per_angstrom = 1.0 / 0.52917721067
    gen = torch.Generator().manual_seed(0)
    mols = []
    for rd, _ in qm9_sample()[:6]:
        m = from_rdkit(rd)
        # float32 coordinates with all their digits, as sampled molecules have
        m.x = (m.x.double() + 0.01 * torch.randn(m.x.shape, generator=gen, dtype=torch.float64)).float()
        mols.append(m)
    write_sdf(tmp_path / "it.sdf", mols)  # the default FDC iteration SDFs use
    worst = 0.0
    for mol, (rd, why) in zip(mols, read_sdf(tmp_path / "it.sdf")):
        assert why is None
        z = np.array([a.GetAtomicNum() for a in rd.GetAtoms()])
        energies = []
        for x in (mol.x.double().numpy(), rd.GetConformer().GetPositions()):
            calc = Calculator("GFN2-xTB", z, x * bohr_per_angstrom)
            calc.set("verbosity", 0)
            energies.append(calc.singlepoint().get("energy"))
        worst = max(worst, abs(energies[0] - energies[1]))
    assert worst < 1e-6, worst


def test_atomic_write_keeps_the_umask_mode(tmp_path: Path) -> None:
    from flowmol_ext.io_utils import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        os.umask(0o027)
        write_sdf(tmp_path / "b.sdf", [from_rdkit(qm9_sample()[0][0])])
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.sdf").stat().st_mode & 0o777 == 0o640
