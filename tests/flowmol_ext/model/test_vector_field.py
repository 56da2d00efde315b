"""The vector field reproduces the official FlowMol v2.0 forward pass (tiny_ctmc_fixture.pt)."""

from __future__ import annotations

import pytest
import torch

from flowmol_ext.model.config import ModelConfig
from flowmol_ext.model.flow import FlowMol
from tests.flowmol_ext.model._fixtures import fixture_graph, tiny, tiny_model

ATOL = 1e-5


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(a.cpu(), b, atol=atol, rtol=1e-5)


def test_forward_and_traces_match_official(device: torch.device) -> None:
    fx = tiny()
    model = tiny_model(fx, device).eval()
    g = fixture_graph(fx, device)
    trace: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        a = fx["a_t"].float().to(device)
        c = fx["c_t"].float().to(device)
        out = model.vector_field(fx["x_t"].to(device), a, c, fx["e_t"].to(device), fx["t"].to(device), g, trace=trace)
    assert set(trace) == {
        "scalar_embedding", "edge_embedding", "conv0_h", "conv0_v", "conv1_h", "conv1_v", "conv2_h", "conv2_v",
        "pos_update1", "edge_update1", "pos_update2", "edge_update2",
    }  # updater 0 never runs in the official layout
    for k, v in trace.items():
        _close(v, fx[f"trace_{k}"])
    _close(out.x, fx["out_x"])
    _close(out.a, fx["out_a_logits"])
    _close(out.c, fx["out_c_logits"])
    _close(out.e, fx["out_e_logits"])


def test_predict_from_class_indices(device: torch.device) -> None:
    fx = tiny()
    model = tiny_model(fx, device).eval()
    g = fixture_graph(fx, device)
    args = [fx["x_t"], fx["a_t"].argmax(-1), fx["c_t"].argmax(-1), fx["e_t"].argmax(-1), fx["t"]]
    args = [x.to(device) for x in args]
    with torch.no_grad():
        raw = model.predict(*args, g)
        sm = model.predict(*args, g, apply_softmax=True, remove_com=True)
    _close(raw.x1, fx["out_x"])
    _close(raw.e, fx["out_e_logits"])
    _close(sm.x1, fx["out_x_com_removed"])
    _close(sm.a, fx["out_a_probs"])
    _close(sm.c, fx["out_c_probs"])
    _close(sm.e, fx["out_e_probs"])


def test_predict_rejects_bad_input() -> None:
    fx = tiny()
    model = tiny_model(fx)
    g = fixture_graph(fx)
    a = fx["a_t"].argmax(-1)
    c, e = fx["c_t"].argmax(-1), fx["e_t"].argmax(-1)
    with pytest.raises(ValueError, match="a_t indices"):
        model.predict(fx["x_t"], a + 6, c, e, fx["t"], g)
    with pytest.raises(ValueError, match="t must have shape"):
        model.predict(fx["x_t"], a, c, e, fx["t"][:2], g)
    with pytest.raises(ValueError, match="e_t must have shape"):
        model.predict(fx["x_t"], a, c, e[g.upper], fx["t"], g)


@pytest.mark.parametrize(
    ("cfg", "n_params"),
    [
        (ModelConfig.paper(), 6_754_432),  # official qm9_ctmc, incl. dead updater 0
        (ModelConfig(n_bond_types=5, update_after_first_conv=False), 982_600),  # README "small", official layout
        (ModelConfig(), 982_471),  # our CPU default: 4 bond types
    ],
)
def test_parameter_counts(cfg: ModelConfig, n_params: int) -> None:
    assert FlowMol(cfg).n_parameters() == n_params
