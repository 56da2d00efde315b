"""Conditional path, OT prior and loss reproduce the official training forward (tiny_ctmc_loss_fixture.pt)."""

from __future__ import annotations

import math

import pytest
import torch

from flowmol_ext.model.config import LossWeights
from flowmol_ext.model.interpolants import (
    aligned_prior,
    alpha,
    alpha_prime,
    ot_align_prior,
    ot_permutation,
    sample_conditional_path,
)
from flowmol_ext.model.loss import IGNORE_INDEX, flowmol_loss, masked_ce
from tests.flowmol_ext.model._fixtures import fixture_batch, tiny, tiny_loss, tiny_model

ATOL = 1e-5


def test_loss_terms_from_recorded_predictions() -> None:
    fx = tiny_loss()
    terms = flowmol_loss(
        fx["pred_x"], fx["pred_a_logits"], fx["pred_c_logits"], fx["pred_e_logits"], fx["x_1_true"],
        fx["target_a"], fx["target_c"], fx["target_e_upper"], LossWeights(**fx["loss_weights"]),
    )
    for k in ("x", "a", "c", "e", "total"):
        torch.testing.assert_close(getattr(terms, k), fx[f"loss_{k}"], atol=ATOL, rtol=1e-5)
    assert (terms.n_masked_a, terms.n_masked_c, terms.n_masked_e) == (16, 18, 92)


def test_masked_ce_without_masked_tokens_is_zero_not_nan() -> None:
    logits = torch.randn(4, 5, requires_grad=True)
    loss = masked_ce(logits, torch.full((4,), IGNORE_INDEX))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(logits.grad == 0)


@pytest.mark.parametrize("name", ["tiny", "loss"])
def test_conditional_path_replays_draws(name: str) -> None:
    fx = tiny() if name == "tiny" else tiny_loss()
    keys = ("cond_path_rand_a", "cond_path_rand_c", "cond_path_rand_e_upper") if name == "tiny" else (
        "rand_a", "rand_c", "rand_e_upper")
    batch = fixture_batch(fx)
    model = tiny_model(fx)
    path = sample_conditional_path(
        fx["x_0"], batch, model.schedule.alpha(fx["t"]), model.mask_index, draws=tuple(fx[k] for k in keys)
    )
    torch.testing.assert_close(path.x_t, fx["x_t"], atol=1e-6, rtol=1e-6)
    assert torch.equal(path.a_t, fx["a_t"].argmax(-1))
    assert torch.equal(path.c_t, fx["c_t"].argmax(-1))
    assert torch.equal(path.e_t, fx["e_t"].argmax(-1))


def test_schedule_matches_fixture() -> None:
    fx = tiny()
    model = tiny_model(fx)
    torch.testing.assert_close(model.schedule.alpha(fx["t"]), fx["alpha_t"])
    torch.testing.assert_close(model.schedule.alpha_prime(fx["t"]), fx["alpha_t_prime"])


def test_cosine_schedule_derivative() -> None:
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    for nu in (1.0, 1.5, 2.0):
        a = alpha(t, "cosine", nu)
        h = 1e-6
        fd = (alpha(t + h, "cosine", nu) - alpha(t - h, "cosine", nu)) / (2 * h)
        torch.testing.assert_close(alpha_prime(t, "cosine", nu), fd, atol=1e-6, rtol=1e-6)
        assert a[0] > 0 and a[-1] < 1
    t0 = torch.zeros(1)
    alpha_prime(t0, "cosine", 2.0)
    assert t0.item() == 0.0  # no in-place clamp
    assert math.isclose(float(alpha(torch.tensor(1.0), "cosine", 2.0)), 1.0, abs_tol=1e-7)
    with pytest.raises(ValueError, match="unknown schedule"):
        alpha(t, "sigmoid")


def test_ot_alignment_matches_fixture() -> None:
    fx = tiny_loss()
    start = 0
    for n in fx["n_atoms"].tolist():
        sl = slice(start, start + n)
        perm = ot_permutation(fx["x_1_true"][sl], fx["prior_centered"][sl])
        assert torch.equal(perm, fx["ot_perm"][sl])
        x0 = ot_align_prior(fx["x_1_true"][sl], fx["prior_centered"][sl])
        torch.testing.assert_close(x0, fx["x_0"][sl], atol=1e-6, rtol=0)
        start += n


def test_aligned_prior_replays_dataset_seed() -> None:
    fx = tiny_loss()
    batch = fixture_batch(fx)
    gen = torch.Generator().manual_seed(fx["seed_dataset"])
    x0 = aligned_prior(batch, generator=gen)
    torch.testing.assert_close(x0, fx["x_0"], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="must both be"):
        ot_align_prior(torch.zeros(3, 3), torch.zeros(4, 3))


def test_training_loss_end_to_end_with_gradients(device: torch.device) -> None:
    fx = tiny_loss()
    model = tiny_model(fx, device).train()
    batch = fixture_batch(fx, device)
    if device.type == "cpu":
        torch.manual_seed(fx["seed_forward"])  # replays t, rand_a, rand_c, rand_e on the global RNG
        terms = model.training_loss(batch, fx["x_0"])
    else:
        draws = tuple(fx[k].to(device) for k in ("rand_a", "rand_c", "rand_e_upper"))
        terms = model.training_loss(batch, fx["x_0"].to(device), t=fx["t"].to(device), draws=draws)
    for k in ("x", "a", "c", "e", "total"):
        torch.testing.assert_close(getattr(terms, k).cpu(), fx[f"loss_{k}"], atol=ATOL, rtol=1e-5)
    terms.total.backward()
    grads = fx["grads"]
    got = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(grads)  # the dead updater 0 gets no gradient, as in the official model
    for k, g in grads.items():
        torch.testing.assert_close(got[k].cpu(), g, atol=1e-5, rtol=1e-4, msg=k)


def test_training_loss_samples_t_from_generator() -> None:
    fx = tiny_loss()
    model = tiny_model(fx)
    batch = fixture_batch(fx)
    l1 = model.training_loss(batch, fx["x_0"], generator=torch.Generator().manual_seed(3))
    l2 = model.training_loss(batch, fx["x_0"], generator=torch.Generator().manual_seed(3))
    assert torch.equal(l1.total, l2.total) and torch.isfinite(l1.total)
    with pytest.raises(ValueError, match="x0 shape"):
        model.training_loss(batch, fx["x_0"][:-1])
