"""Tests for fdc_mol.molecular.descriptors: invariances, gradients, known values, and the molecule KDE."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from fdc_mol.molecular.descriptors import (
    DEFAULT_PAIRS,
    ConformerDescriptor,
    MoleculeKDE,
    default_centers,
    pair_distance_histogram,
)

C, H, N, O, F = range(5)
K = 24
D = len(DEFAULT_PAIRS) * K


def _random_rotation(g: torch.Generator, dtype: torch.dtype) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))[None]
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q.to(dtype)


def _spread_positions(n: int, g: torch.Generator, dtype: torch.dtype, min_dist: float = 0.9) -> Tensor:
    """n random points in a ball of ~molecular size with all pairwise distances >= min_dist (Å)."""
    pts: list[Tensor] = []
    while len(pts) < n:
        p = torch.randn(3, generator=g, dtype=torch.float64) * 1.6
        if all(float((p - q).norm()) >= min_dist for q in pts):
            pts.append(p)
    return torch.stack(pts).to(dtype)


def _batch(sizes: list[int], seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([_spread_positions(n, g, dtype) for n in sizes])
    a = torch.randint(0, 5, (sum(sizes),), generator=g)
    a[0] = C  # make sure some heavy atoms are present in the first molecule
    group = torch.arange(len(sizes)).repeat_interleave(torch.tensor(sizes))
    return x, a, group


# A fixed "molecule": methanol-like heavy atoms plus hydrogens (coordinates in Å).
_MOL_A = torch.tensor([C, O, N, C, H, H, H, H, H])
_MOL_X = torch.tensor(
    [
        [0.00, 0.00, 0.00],
        [1.43, 0.00, 0.00],
        [-0.50, 1.38, 0.00],
        [-0.60, -1.30, 0.30],
        [1.75, 0.90, 0.10],
        [-0.35, -0.50, -0.90],
        [-1.50, 1.45, 0.10],
        [-1.65, -1.25, 0.50],
        [-0.10, -1.90, 1.05],
    ]
)


def _copies(x: Tensor, a: Tensor, m: int, noise: float, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """m randomly rotated/translated copies of one conformer with Gaussian noise (Å)."""
    g = torch.Generator().manual_seed(seed)
    xs = []
    for _ in range(m):
        R = _random_rotation(g, x.dtype)
        xs.append((x + noise * torch.randn(x.shape, generator=g, dtype=x.dtype)) @ R.T + torch.randn(3, generator=g))
    n = a.numel()
    return torch.cat(xs), a.repeat(m), torch.arange(m).repeat_interleave(n)


def test_shape_and_defaults() -> None:
    x, a, group = _batch([5, 7, 1, 4])
    f = pair_distance_histogram(x, a, group, 4)
    assert f.shape == (4, D)
    assert torch.equal(default_centers(), torch.linspace(0.8, 4.5, 24))
    assert torch.all(f[2] == 0)  # a one-atom molecule has no pairs
    assert torch.all(f >= 0) and torch.isfinite(f).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_invariance_rotation_translation_permutation(dtype: torch.dtype) -> None:
    sizes = [6, 9, 4, 12]
    x, a, group = _batch(sizes, seed=1, dtype=dtype)
    f0 = pair_distance_histogram(x, a, group, len(sizes))
    assert f0.abs().sum() > 0
    g = torch.Generator().manual_seed(2)
    # independent rotation + translation per molecule
    x_rt = x.clone()
    for b in range(len(sizes)):
        m = group == b
        R = _random_rotation(g, dtype)
        x_rt[m] = x[m] @ R.T + 5.0 * torch.randn(3, generator=g, dtype=torch.float64).to(dtype)
    torch.testing.assert_close(pair_distance_histogram(x_rt, a, group, len(sizes)), f0, atol=1e-5, rtol=0)
    # permutation of atoms within each molecule (rows stay in their molecule's block)
    perm = torch.cat(
        [torch.nonzero(group == b).squeeze(1)[torch.randperm(n, generator=g)] for b, n in enumerate(sizes)]
    )
    torch.testing.assert_close(pair_distance_histogram(x[perm], a[perm], group, len(sizes)), f0, atol=1e-5, rtol=0)
    # arbitrary global shuffle of rows (molecules no longer contiguous)
    shuf = torch.randperm(x.shape[0], generator=g)
    torch.testing.assert_close(
        pair_distance_histogram(x_rt[shuf], a[shuf], group[shuf], len(sizes)), f0, atol=1e-5, rtol=0
    )


def test_gradient_matches_central_finite_differences() -> None:
    sizes = [5, 7]
    x, a, group = _batch(sizes, seed=3, dtype=torch.float64)
    desc = ConformerDescriptor(a, group, len(sizes), width=0.3)
    w = torch.randn(len(sizes), desc.dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def scalar(xx: Tensor) -> Tensor:
        return (desc(xx) * w).sum()

    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(scalar(xr), xr)
    eps = 1e-6
    fd = torch.zeros_like(x)
    for r in range(x.shape[0]):
        for c in range(3):
            e = torch.zeros_like(x)
            e[r, c] = eps
            fd[r, c] = (scalar(x + e) - scalar(x - e)) / (2 * eps)
    assert grad.abs().max() > 1e-2
    torch.testing.assert_close(grad, fd, atol=1e-6, rtol=1e-5)
    assert torch.autograd.gradcheck(desc, (x.clone().requires_grad_(True),))


def test_h2_not_in_pairs_is_zero() -> None:
    x = torch.tensor([[0.0, 0.0, 0.0], [0.74, 0.0, 0.0]])
    f = pair_distance_histogram(x, torch.tensor([H, H]), torch.tensor([0, 0]), 1)
    assert f.shape == (1, D)
    assert torch.all(f == 0)


def test_cc_pair_at_centre_gives_bump_one_over_n_atoms() -> None:
    centers = default_centers()
    k = 4
    mu = float(centers[k])
    step = float(centers[1] - centers[0])
    # molecule 0: C–C at exactly centre k plus a distant H (n = 3); molecule 1: H2 placed right next to
    # molecule 0's carbons — cross-molecule pairs must not be counted.
    x = torch.tensor([[0.0, 0.0, 0.0], [mu, 0.0, 0.0], [0.0, 0.0, 60.0], [0.0, 1.0, 0.0], [0.0, 1.74, 0.0]])
    a = torch.tensor([C, C, H, H, H])
    group = torch.tensor([0, 0, 0, 1, 1])
    f = pair_distance_histogram(x, a, group, 2).view(2, len(DEFAULT_PAIRS), K)
    cc = DEFAULT_PAIRS.index(("C", "C"))
    assert f[0, cc, k].item() == pytest.approx(1.0 / 3, abs=1e-6)
    assert f[0, cc, k + 1].item() == pytest.approx(math.exp(-0.5 * (step / 0.15) ** 2) / 3, abs=1e-6)
    others = torch.ones(len(DEFAULT_PAIRS), dtype=torch.bool)
    others[cc] = False
    assert f[0, others].abs().max() < 1e-30  # C–H at ~60 Å underflows to 0
    assert torch.all(f[1] == 0)


def test_custom_centers_width_pairs() -> None:
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    centers = torch.tensor([1.0, 1.2])
    f = pair_distance_histogram(
        x, torch.tensor([H, N]), torch.tensor([0, 0]), 1, centers=centers, width=0.1, pairs=[(1, "N")]
    )
    torch.testing.assert_close(f, torch.tensor([[0.5, 0.5 * math.exp(-2.0)]]))
    with pytest.raises(ValueError):
        pair_distance_histogram(x, torch.tensor([H, N]), torch.tensor([0, 0]), 1, pairs=[("C", "Cl")])


def _fitted_kde() -> MoleculeKDE:
    x_ref, a_ref, g_ref = _copies(_MOL_X, _MOL_A, 48, noise=0.03, seed=10)
    return MoleculeKDE().fit(x_ref, a_ref, g_ref, 48)


def _query() -> tuple[Tensor, Tensor, Tensor, int]:
    """Batch: [reference conformer, stretched ×1.25, a foreign random molecule with F]."""
    centred = _MOL_X - _MOL_X.mean(0)
    x_foreign, a_foreign, _ = _batch([7], seed=11)
    a_foreign[1] = F
    x = torch.cat([_MOL_X, centred * 1.25, x_foreign])
    a = torch.cat([_MOL_A, _MOL_A, a_foreign])
    group = torch.tensor([0] * 9 + [1] * 9 + [2] * 7)
    return x, a, group, 3


def test_kde_log_prob_identical_above_stretched_and_finite() -> None:
    kde = _fitted_kde()
    assert kde.bandwidth.shape == (D,) and torch.all(kde.bandwidth >= 1e-2)
    x, a, group, n = _query()
    lp = kde.log_prob(x, a, group, n)
    assert lp.shape == (n,)
    assert torch.isfinite(lp).all() and torch.isfinite(-lp).all()
    assert lp[0] > lp[1] + 10.0  # identical conformer is far more likely than the stretched one
    assert lp[0] > lp[2]
    g = kde.grad_log_prob(x, a, group, n)
    assert g.shape == x.shape and torch.isfinite(g).all()
    # leave-one-out on the reference set itself is finite too
    x_ref, a_ref, g_ref = _copies(_MOL_X, _MOL_A, 48, noise=0.03, seed=10)
    assert torch.isfinite(kde.log_prob(x_ref, a_ref, g_ref, 48, exclude_self=True)).all()


def test_grad_log_prob_points_toward_density() -> None:
    kde = _fitted_kde()
    centred = _MOL_X - _MOL_X.mean(0)
    g0 = torch.Generator().manual_seed(12)
    # two perturbed conformers: mildly stretched, and noisy
    x = torch.cat([centred * 1.08, _MOL_X + 0.08 * torch.randn(_MOL_X.shape, generator=g0)])
    a = _MOL_A.repeat(2)
    group = torch.arange(2).repeat_interleave(9)
    lp0 = kde.log_prob(x, a, group, 2)
    grad = kde.grad_log_prob(x, a, group, 2)
    # first order: d/dε log p̂(x + ε g) at 0 = |g_b|² per molecule
    sq = torch.zeros(2).index_add_(0, group, grad.pow(2).sum(-1))
    assert torch.all(sq > 0)
    eps = 1e-3 / sq.sqrt().max()  # step of at most 1e-3 Å per molecule's gradient norm
    lp1 = kde.log_prob(x + eps * grad, a, group, 2)
    assert torch.all(lp1 > lp0)
    torch.testing.assert_close((lp1 - lp0) / eps, sq, rtol=0.05, atol=0.0)
    # and a real step (0.02 Å along the unit gradient per molecule) raises log p̂ too
    unit = grad / sq.sqrt()[group][:, None]
    assert torch.all(kde.log_prob(x + 0.02 * unit, a, group, 2) > lp0)


def test_molecule_kde_matches_plain_kde_on_fixed_batch() -> None:
    from fdc_mol.fdc.density import KDE

    x_ref, a_ref, g_ref = _copies(_MOL_X, _MOL_A, 16, noise=0.05, seed=13)
    mk = MoleculeKDE(min_bandwidth=0.0).fit(x_ref, a_ref, g_ref, 16)
    plain = KDE(feature_map=ConformerDescriptor(a_ref, g_ref, 16)).fit(x_ref)
    torch.testing.assert_close(mk.log_prob(x_ref, a_ref, g_ref, 16), plain.log_prob(x_ref))
    torch.testing.assert_close(mk.grad_log_prob(x_ref, a_ref, g_ref, 16), plain.grad_log_prob(x_ref))


def test_pca_whitened_kde_matches_numpy_projection_and_whitens_the_references() -> None:
    import numpy as np

    from fdc_mol.fdc.density import KDE

    x_ref, a_ref, g_ref = _copies(_MOL_X, _MOL_A, 32, noise=0.05, seed=14)
    mk = MoleculeKDE(n_components=3).fit(x_ref, a_ref, g_ref, 32)
    f = ConformerDescriptor(a_ref, g_ref, 32)(x_ref).double().numpy()
    # numpy reference: eigenvectors of the sample covariance, largest first, scaled by 1/sqrt(eigenvalue)
    lam, vec = np.linalg.eigh(np.cov(f, rowvar=False))
    order = np.argsort(lam)[::-1][:3]
    z_np = (f - f.mean(0)) @ (vec[:, order] / np.sqrt(lam[order]))
    z = mk.features(x_ref, a_ref, g_ref, 32).double().numpy()
    np.testing.assert_allclose(np.cov(z, rowvar=False), np.eye(3), atol=1e-4)  # whitened
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.abs(z), np.abs(z_np), rtol=1e-3, atol=1e-3)  # same axes up to sign
    plain = KDE(bandwidth="scott").fit(torch.as_tensor(z_np, dtype=torch.float32))
    torch.testing.assert_close(mk.log_prob(x_ref, a_ref, g_ref, 32, exclude_self=True),
                               plain.log_prob(torch.as_tensor(z_np, dtype=torch.float32), exclude_self=True),
                               rtol=1e-4, atol=1e-3)
    # Scott's bandwidth on unit-variance components: m^(-1/(k+4)) in every component
    torch.testing.assert_close(mk.bandwidth, torch.full((3,), 32 ** (-1 / 7)), rtol=1e-4, atol=1e-5)
    # at most m - 1 components carry variance
    few = MoleculeKDE(n_components=10).fit(*_copies(_MOL_X, _MOL_A, 4, noise=0.05, seed=15), 4)
    assert few.projection.shape == (D, 3)
    with pytest.raises(ValueError, match="n_components"):
        MoleculeKDE(n_components=0)


def test_pca_kde_gradient_is_the_directional_derivative() -> None:
    x_ref, a_ref, g_ref = _copies(_MOL_X, _MOL_A, 48, noise=0.05, seed=16)
    kde = MoleculeKDE(n_components=4).fit(x_ref, a_ref, g_ref, 48)
    centred = _MOL_X - _MOL_X.mean(0)
    noise = torch.randn(_MOL_X.shape, generator=torch.Generator().manual_seed(3))
    x = torch.cat([centred * 1.04, _MOL_X + 0.05 * noise])
    a, group = _MOL_A.repeat(2), torch.arange(2).repeat_interleave(9)
    x64 = x.double()
    kde.kde.ref, kde.kde.h = kde.kde.ref.double(), kde.kde.h.double()
    kde.mean, kde.projection = kde.mean.double(), kde.projection.double()
    grad = kde.grad_log_prob(x64, a, group, 2)
    d = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    eps = 1e-5
    fd = (kde.log_prob(x64 + eps * d, a, group, 2) - kde.log_prob(x64 - eps * d, a, group, 2)) / (2 * eps)
    analytic = torch.zeros(2, dtype=torch.float64).index_add_(0, group, (grad * d).sum(-1))
    torch.testing.assert_close(fd, analytic, rtol=1e-5, atol=1e-7)
