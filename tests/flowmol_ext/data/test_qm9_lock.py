"""Two runs into one data folder (a lock that names its holder) and inputs without molecules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flowmol_ext.data.qm9 import process_qm9
from tests.conftest import QM9_SAMPLE_DIR

CSV = QM9_SAMPLE_DIR / "qm9_sample.csv"


def test_second_run_into_the_same_folder_fails_naming_the_holder(tmp_path: Path) -> None:
    data = tmp_path / "qm9"
    seen: dict[str, object] = {}

    def second_run(staging: Path) -> None:  # runs while the first run holds the lock
        with pytest.raises(ValueError, match=f"being processed by another run \\(pid {os.getpid()} on ") as info:
            process_qm9(source="csv", path=CSV, data_dir=data, cache_dir=tmp_path / "c", workers=1, progress=False)
        seen["msg"] = str(info.value)
        seen["staging_alive"] = staging.is_dir() and any(staging.iterdir())

    report = process_qm9(source="csv", path=CSV, data_dir=data, cache_dir=tmp_path / "c", workers=1, progress=False,
                         _before_commit=second_run)
    assert seen["staging_alive"], "the second run deleted the first run's staging folder"
    assert "lock" in seen["msg"]
    assert report["n_kept"] > 0 and (data / "train.pt").is_file()
    # the lock is released with the run: a later run proceeds (here: finds the output up to date)
    assert process_qm9(source="csv", path=CSV, data_dir=data, cache_dir=tmp_path / "c", workers=1,
                       progress=False)["noop"]


def test_header_only_csv_fails_clearly(tmp_path: Path) -> None:
    header = CSV.read_text().splitlines()[0]
    (tmp_path / "empty.csv").write_text(header + "\n")
    with pytest.raises(ValueError, match="empty.csv: no molecules in the input"):
        process_qm9(source="csv", path=tmp_path / "empty.csv", data_dir=tmp_path / "out", cache_dir=tmp_path / "c",
                    workers=1, progress=False)
    assert not (tmp_path / "out" / "train.pt").exists()
