"""torch.compile (opt-in: ``FlowMol.set_compile``) gives the eager network's outputs and parameter gradients on the
official tiny fixture, up to float rounding. Marked slow: the first run on a machine compiles (inductor caches on
disk afterwards)."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.flowmol_ext.model._fixtures import fixture_graph, tiny, tiny_model


@pytest.mark.slow
def test_compiled_network_matches_eager_outputs_and_gradients() -> None:
    fx = tiny()
    eager = tiny_model(fx)
    compiled = copy.deepcopy(eager)
    compiled.set_compile(True)
    assert compiled.vector_field.compiled and not eager.vector_field.compiled
    g = fixture_graph(fx)
    args = (fx["x_t"], fx["a_t"].float(), fx["c_t"].float(), fx["e_t"], fx["t"], g)
    outs = []
    for model in (eager, compiled):
        out = model.vector_field(*args)
        loss = out.x.square().sum() + out.a.logsumexp(-1).sum() + out.e.logsumexp(-1).sum()
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
        outs.append((out, grads))
    (oe, ge), (oc, gc) = outs
    torch.testing.assert_close(oc.x, oe.x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(oc.a, oe.a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(oc.e, oe.e, atol=1e-5, rtol=1e-5)
    assert oe.x.abs().max() > 0
    n = 0
    for a, b in zip(ge, gc):
        if a is None:
            assert b is None
            continue
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
        n += 1
    assert n > 10
