"""Sample-based entropy / KL evaluation in fdc_mol.fdc.density against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from fdc_mol.fdc.density import cluster_fractions, histogram_entropy, kde_entropy, kl_from_log_probs, nll_entropy


def _gauss_logpdf(x: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    d = x.shape[1]
    return -0.5 * ((x - mean) / std).pow(2).sum(-1) - d * math.log(std) - 0.5 * d * math.log(2 * math.pi)


def test_histogram_entropy_closed_forms():
    g = torch.Generator().manual_seed(0)
    u = torch.rand(200000, 2, generator=g) * 12 - 6
    assert histogram_entropy(u, bins=20) == pytest.approx(math.log(400), rel=2e-3)
    # smooth Gaussian, fine bins: H_hist ≈ H_diff − 2 log(bin width) = log(2πe s²) − 2 log 0.06
    s = 1.0
    x = s * torch.randn(400000, 2, generator=g)
    expected = math.log(2 * math.pi * math.e * s**2) - 2 * math.log(12 / 200)
    assert histogram_entropy(x) == pytest.approx(expected, abs=0.1)  # finite-sample bias ~ bins/(2n)
    # samples outside the box are dropped, per-dimension ranges accepted
    assert histogram_entropy(torch.tensor([[0.5, 0.5], [10.0, 0.0]]), bins=2, lim=[(0, 1), (0, 1)]) == 0.0
    with pytest.raises(ValueError):
        histogram_entropy(torch.full((3, 2), 100.0))


def test_nll_kde_entropy_and_kl_closed_forms():
    g = torch.Generator().manual_seed(1)
    s, m = 0.7, torch.tensor([0.5, -0.3])
    x = m + s * torch.randn(20000, 2, generator=g)
    h_true = math.log(2 * math.pi * math.e * s**2)
    assert nll_entropy(_gauss_logpdf(x, m, s)) == pytest.approx(h_true, abs=0.03)
    assert kde_entropy(x) == pytest.approx(h_true, abs=0.1)
    # KL(N(m, s²I) ‖ N(0, I)) = ½(2 s² + ‖m‖² − 2 − 4 log s)
    kl_true = 0.5 * (2 * s**2 + float(m.pow(2).sum()) - 2 - 4 * math.log(s))
    kl, se = kl_from_log_probs(_gauss_logpdf(x, m, s), _gauss_logpdf(x, torch.zeros(2), 1.0))
    assert kl == pytest.approx(kl_true, abs=4 * se)
    assert 0 < se < 0.02
    with pytest.raises(ValueError):
        nll_entropy(torch.tensor([0.0, -math.inf]))


def test_cluster_fractions():
    centers = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    x = torch.tensor([[0.1, 0.0], [1.9, 0.2], [2.2, -0.1], [0.0, 1.5]])
    assert torch.allclose(cluster_fractions(x, centers), torch.tensor([0.25, 0.5, 0.25]))
