"""FlowMol3's train-time geometry distortion: the displacement law, its off state, and the config schema."""

from __future__ import annotations

import math

import pytest
import torch

from flowmol_ext.config import ConfigError, validate_config
from flowmol_ext.model.config import GeometryDistortion, ModelConfig
from flowmol_ext.model.flow import distort_positions

from ._fixtures import fixture_batch, tiny_loss, tiny_model


def test_displacement_follows_the_configured_law() -> None:
    """p = 0.3, std = 0.5 Å, t_min = 0.5: atoms of molecules with t > 0.5 move with probability 0.3 by
    N(0, 0.25) per coordinate; atoms of molecules with t <= 0.5 never move."""
    n_mols, per = 400, 50
    node_graph = torch.arange(n_mols).repeat_interleave(per)
    t = torch.where(torch.arange(n_mols) % 2 == 0, torch.tensor(0.9), torch.tensor(0.3))
    x = torch.randn(n_mols * per, 3, generator=torch.Generator().manual_seed(0))
    cfg = GeometryDistortion(p=0.3, t_min=0.5, std=0.5)
    out = distort_positions(x, t, node_graph, cfg, torch.Generator().manual_seed(1))
    moved = (out != x).any(-1)
    late = t[node_graph] > 0.5
    assert not moved[~late].any()
    n_late = int(late.sum())
    frac = float(moved[late].float().mean())
    assert abs(frac - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n_late)  # binomial, 4 sigma
    d = (out - x)[moved]
    k = d.numel()
    assert abs(float(d.var()) - 0.25) < 4 * 0.25 * math.sqrt(2 / k)  # variance of a normal sample, 4 sigma
    assert abs(float(d.mean())) < 4 * 0.5 / math.sqrt(k)


def test_off_draws_nothing_and_changes_nothing() -> None:
    fx = tiny_loss()
    model = tiny_model(fx)
    batch = fixture_batch(fx)
    g = torch.Generator().manual_seed(3)
    l_off = model.training_loss(batch, fx["x_0"], generator=g)
    after_off = torch.rand(1, generator=g)
    assert model.cfg.distortion.p == 0.0
    model.cfg.distortion = GeometryDistortion(p=1.0, t_min=0.0, std=0.5)
    g = torch.Generator().manual_seed(3)
    l_on = model.training_loss(batch, fx["x_0"], generator=g)
    after_on = torch.rand(1, generator=g)
    assert not torch.equal(l_on.total, l_off.total)  # every atom displaced: the network sees other inputs
    assert not torch.equal(after_on, after_off)  # the option's draws come after the usual ones
    model.cfg.distortion = GeometryDistortion(p=1.0, t_min=1.0, std=0.5)  # t <= 1 always: nothing moves
    g = torch.Generator().manual_seed(3)
    l_never = model.training_loss(batch, fx["x_0"], generator=g)
    torch.testing.assert_close(l_never.total, l_off.total, rtol=0, atol=0)


def test_schema_names_the_bad_key() -> None:
    with pytest.raises(ConfigError, match="distortion.p"):
        validate_config(ModelConfig, {"distortion": {"p": 1.5}})
    with pytest.raises(ConfigError, match="distortion.std"):
        validate_config(ModelConfig, {"distortion": {"std": 0}})
    assert validate_config(ModelConfig, {}).distortion == GeometryDistortion()  # old model configs load unchanged
