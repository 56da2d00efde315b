"""Toy settings: landscapes, metrics, and an end-to-end smoke run of ``fdc-mol toy`` with tiny budgets."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from fdc_mol.cli import main
from fdc_mol.toy.settings import ToyConfig, default_config, hist_entropy, landscape, metrics


def test_landscape_gradients_match_finite_differences():
    x = torch.randn(20, 2, dtype=torch.float64)
    for s in ("cvar", "sq", "w1"):
        land = landscape(s)
        _, g = land.oracle(x)
        eps = 1e-6
        for j in range(2):
            e = torch.zeros(2, dtype=torch.float64)
            e[j] = eps
            fd = (land.reward_fn(x + e) - land.reward_fn(x - e)) / (2 * eps)
            assert torch.allclose(g[:, j], fd, atol=1e-5), s


def test_metrics_known_values():
    cfg = default_config("w1")
    x = torch.zeros(200, 2) + torch.tensor([3.0, 3.0])
    y = x + torch.tensor([1.0, 0.5])
    m = metrics("w1", y, landscape("w1"), x, cfg)
    assert m["w1_A"] == pytest.approx((1.0 + 49 * 0.25) ** 0.5, rel=1e-5)
    assert m["delta_pct"] == pytest.approx(200.0)
    u = torch.rand(100000, 2) * 12 - 6  # uniform on the histogram square: entropy log(400) with 20×20 bins
    assert hist_entropy(u, bins=20) == pytest.approx(torch.log(torch.tensor(400.0)).item(), rel=0.01)
    with pytest.raises(ValueError):
        default_config("nope")
    with pytest.raises(ValidationError):
        ToyConfig(setting="cvar", bogus=1)


@pytest.mark.slow
def test_toy_command_quick(tmp_path, capsys):
    rc = main(["toy", "cvar", "--seeds", "2", "--out", str(tmp_path), "--quick"])
    assert rc == 0
    assert (tmp_path / "cvar" / "cvar_samples.png").stat().st_size > 1000
    assert "worst1_cost" in (tmp_path / "toy_table.md").read_text()
    summary = json.loads((tmp_path / "toy_summary.json").read_text())
    assert len(summary["cvar"]["per_seed"]["fdc"]) == 2
    assert (tmp_path / "cvar" / "fdc_seed0" / "stages" / "stage_001" / "stage_done.json").is_file()


@pytest.mark.slow
def test_toy_entropy_quick_with_overrides(tmp_path):
    rc = main(["toy", "entropy", "--seeds", "1", "--out", str(tmp_path), "--quick", "--set", "alpha=0"])
    assert rc == 0
    summary = json.loads((tmp_path / "toy_summary.json").read_text())
    assert summary["entropy"]["config"]["alpha"] == 0.0
    assert summary["entropy"]["per_seed"]["am"] == []  # the entropy default runs no AM baseline
    fdc = summary["entropy"]["per_seed"]["fdc"][0]
    assert {"hist_entropy", "nll_entropy", "kl_pre", "mode0"} <= set(fdc)
    assert sum(fdc[f"mode{i}"] for i in range(8)) == pytest.approx(1.0)
    table = (tmp_path / "toy_table.md").read_text()
    assert "nll_entropy" in table and "| – |" in table
    assert (tmp_path / "entropy" / "entropy_samples_seed0.pt").is_file()
    assert main(["toy", "entropy", "--out", str(tmp_path), "--quick", "--set", "alpha"]) != 0
