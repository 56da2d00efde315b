"""Helpers shared by the FlowMol model tests: load the official fixtures into our model."""

from __future__ import annotations

from functools import lru_cache

import torch

from flowmol_ext.batch import MolBatch
from flowmol_ext.graph import Graph, build_graph
from flowmol_ext.model.config import ModelConfig
from flowmol_ext.model.flow import FlowMol
from tests.conftest import FLOWMOL_FIXTURES


@lru_cache(maxsize=2)
def load_fixture(name: str) -> dict:
    return torch.load(FLOWMOL_FIXTURES / name, weights_only=True)


def tiny() -> dict:
    return load_fixture("tiny_ctmc_fixture.pt")


def tiny_loss() -> dict:
    return load_fixture("tiny_ctmc_loss_fixture.pt")


def tiny_model(fx: dict, device: torch.device | str = "cpu") -> FlowMol:
    """Our FlowMol built from the fixture's official config with the fixture's official weights."""
    model = FlowMol(ModelConfig.from_official(fx["config"]))
    sd = {k: v for k, v in fx["state_dict"].items() if not k.endswith("dummy_param")}
    model.load_state_dict(sd, strict=True)
    return model.to(device)


def fixture_graph(fx: dict, device: torch.device | str = "cpu") -> Graph:
    g = build_graph(fx["n_atoms"])
    assert torch.equal(g.src, fx["src"]) and torch.equal(g.dst, fx["dst"])
    assert torch.equal(g.upper, fx["upper_edge_mask"]) and torch.equal(g.node_graph, fx["node_batch_idx"])
    return g.to(device)


def fixture_batch(fx: dict, device: torch.device | str = "cpu") -> MolBatch:
    """The ground-truth x₁ of a fixture as a MolBatch of class indices (5 bond classes)."""
    g = fixture_graph(fx, device)
    return MolBatch(
        x=fx["x_1_true"].to(device), a=fx["a_1_true"].argmax(-1).to(device), c=fx["c_1_true"].argmax(-1).to(device),
        e=fx["e_1_true"].argmax(-1).to(device), graph=g,
    )
