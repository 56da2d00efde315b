"""The wheel (a non-editable install) carries what users need: the configs, the shipped model, the element
reference energies; and nothing of the top-level examples is a copy of them."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_ships_configs_model_and_references(tmp_path: Path) -> None:
    had_build = (ROOT / "build").exists()
    try:
        subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path)], check=True, cwd=tmp_path)
    finally:
        if not had_build:  # the in-tree build leaves build/ behind
            shutil.rmtree(ROOT / "build", ignore_errors=True)
    (wheel,) = tmp_path.glob("fdc_mol-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for cfg in sorted((ROOT / "fdc_mol" / "configs").glob("*.yaml")):
        assert f"fdc_mol/configs/{cfg.name}" in names
    assert "fdc_mol/rewards/element_references.json" in names
    assert "flowmol_ext/pretrained_models/qm9_small_10000/model.pt" in names
    assert "fdc_mol/molecular/job.py" in names and "fdc_mol/fdc/loop.py" in names
