"""Fixtures for the QM9 pipeline tests: the committed sample, processed once per session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import QM9_SAMPLE_DIR

SAMPLE_CSV = QM9_SAMPLE_DIR / "qm9_sample.csv"
SAMPLE_UNC = QM9_SAMPLE_DIR / "uncharacterized.txt"
N_SMALL = 40


@pytest.fixture
def sample_copy(tmp_path: Path) -> Path:
    """A writable copy of the first 40 molecules of the sample with the uncharacterized list (CSV path)."""
    d = tmp_path / "src"
    d.mkdir()
    lines = SAMPLE_CSV.read_text().splitlines(keepends=True)
    (d / "qm9_sample.csv").write_text("".join(lines[: 1 + N_SMALL]))
    shutil.copy(SAMPLE_UNC, d / "uncharacterized.txt")
    return d / "qm9_sample.csv"


@pytest.fixture(scope="session")
def processed_sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The sample processed once (1 worker): (data_dir, report)."""
    from flowmol_ext.data.qm9 import process_qm9

    out = tmp_path_factory.mktemp("qm9_processed")
    report = process_qm9("csv", SAMPLE_CSV, out, workers=1, progress=False)
    return out, report
