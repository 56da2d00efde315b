"""Shared test fixtures and markers (``needs_gpu`` skips on CPU-only machines)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

TESTS_DIR = Path(__file__).parent
QM9_SAMPLE_DIR = TESTS_DIR / "data" / "qm9"
FLOWMOL_FIXTURES = TESTS_DIR / "fixtures" / "flowmol_v2"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", help="torch device for device-aware tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_full = pytest.mark.skip(reason="needs the full QM9 download; set FDC_MOL_FULL_DATA=1")
    for item in items:
        if "needs_gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "full_data" in item.keywords and os.environ.get("FDC_MOL_FULL_DATA") != "1":
            item.add_marker(skip_full)


@pytest.fixture
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.config.getoption("--device"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
