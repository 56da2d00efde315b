"""A corrupt or foreign energy-cache file gives one error naming the file and what to do."""

from __future__ import annotations

from pathlib import Path

import pytest

from fdc_mol.rewards import make_reward
from fdc_mol.rewards.cache import CacheError, EnergyCache


@pytest.mark.parametrize("content", [b"this is not a database\n" * 100, b"SQLite format 3\x00" + b"\xff" * 3000])
def test_corrupt_cache_file_is_named_with_a_remedy(tmp_path: Path, content: bytes) -> None:
    (tmp_path / EnergyCache.FILENAME).write_bytes(content)
    with pytest.raises(CacheError) as info:
        make_reward("mmff94", executor="serial", cache_dir=tmp_path)
    msg = str(info.value)
    assert str(tmp_path / EnergyCache.FILENAME) in msg and "delete it" in msg and "\n" not in msg
    assert isinstance(info.value, ValueError)  # the CLI prints it as one line, exit 2
