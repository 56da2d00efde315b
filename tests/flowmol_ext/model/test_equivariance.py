"""Symmetries of the vector field: SE(3) equivariance of x̂₁, invariance of logits, atom permutations."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flowmol_ext.batch import MolBatch
from flowmol_ext.graph import Graph, build_graph
from flowmol_ext.model.config import ModelConfig
from flowmol_ext.model.flow import EndpointPrediction, FlowMol
from flowmol_ext.model.interpolants import aligned_prior

SIZES = (7, 5)


def _rotation(seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed)))
    if torch.det(q) < 0:  # proper rotation: cross-product features make the net SE(3), not E(3)
        q[:, 0] = -q[:, 0]
    return q


def _state(graph: Graph, n_bond: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random noisy state with some mask tokens; bonds symmetric (dense per molecule)."""
    gen = torch.Generator().manual_seed(seed)
    n = graph.num_nodes
    x = torch.randn(n, 3, generator=gen) * 1.5
    a = torch.randint(0, 6, (n,), generator=gen)
    c = torch.randint(0, 7, (n,), generator=gen)
    dense = []
    for m in graph.n_atoms.tolist():
        up = torch.randint(0, n_bond + 1, (m, m), generator=gen).triu(1)
        dense.append(up + up.T)
    return x, a, c, dense


def _edges_from_dense(graph: Graph, dense: list[torch.Tensor]) -> torch.Tensor:
    off = graph.node_offset[graph.edge_graph]
    out = torch.empty(graph.src.numel(), dtype=torch.long)
    for b, mat in enumerate(dense):
        sel = graph.edge_graph == b
        out[sel] = mat[graph.src[sel] - off[sel], graph.dst[sel] - off[sel]]
    return out


def _dense_upper(graph: Graph, values: torch.Tensor) -> list[torch.Tensor]:
    """Per-molecule (n, n, K) symmetric matrices from per-upper-edge values (E/2, K)."""
    src, dst = graph.src[graph.upper], graph.dst[graph.upper]
    eg = graph.edge_graph[graph.upper]
    off = graph.node_offset[eg]
    mats = []
    for b, m in enumerate(graph.n_atoms.tolist()):
        sel = eg == b
        mat = values.new_zeros(m, m, values.shape[1])
        mat[src[sel] - off[sel], dst[sel] - off[sel]] = values[sel]
        mat[dst[sel] - off[sel], src[sel] - off[sel]] = values[sel]
        mats.append(mat)
    return mats


def _model(device: torch.device) -> FlowMol:
    torch.manual_seed(0)
    return FlowMol(ModelConfig()).to(device).eval()


def _predict(model: FlowMol, graph: Graph, x, a, c, e, t, device) -> EndpointPrediction:  # noqa: ANN001
    with torch.no_grad():
        return model.predict(x.to(device), a.to(device), c.to(device), e.to(device), t.to(device), graph.to(device))


def test_rotation_translation_equivariance(device: torch.device) -> None:
    model = _model(device)
    g = build_graph(list(SIZES))
    x, a, c, dense = _state(g, model.cfg.n_bond_types)
    e = _edges_from_dense(g, dense)
    t = torch.tensor([0.3, 0.8])
    ref = _predict(model, g, x, a, c, e, t, device)
    R, shift = _rotation(1), torch.tensor([3.0, -2.0, 5.0])
    out = _predict(model, g, x @ R.T + shift, a, c, e, t, device)
    torch.testing.assert_close(out.x1, ref.x1 @ R.to(device).T + shift.to(device), atol=1e-4, rtol=1e-4)
    for k in ("a", "c", "e"):
        torch.testing.assert_close(getattr(out, k), getattr(ref, k), atol=1e-4, rtol=1e-4)


def test_cross_products_make_the_field_chiral(device: torch.device) -> None:
    """SE(3)- but not E(3)-equivariant: the node vector features of a mirror image are not mirrored.

    (At init the position updates are tiny, so the check uses the O(1) vector features of the last conv.)
    """
    model = _model(device)
    g = build_graph(list(SIZES))
    x, a, c, dense = _state(g, model.cfg.n_bond_types)
    e = _edges_from_dense(g, dense)
    t = torch.tensor([0.3, 0.8])
    last = f"conv{model.cfg.n_convs - 1}_v"

    def vectors(xx: torch.Tensor) -> torch.Tensor:
        trace: dict[str, torch.Tensor] = {}
        oh = [F.one_hot(v, k).float().to(device) for v, k in ((a, 6), (c, 7), (e, model.cfg.n_bond_types + 1))]
        with torch.no_grad():
            model.vector_field(xx.to(device), *oh, t.to(device), g.to(device), trace=trace)
        return trace[last].cpu()

    ref = vectors(x)
    R = _rotation(2)
    torch.testing.assert_close(vectors(x @ R.T), ref @ R.T, atol=1e-4, rtol=1e-4)
    mirror = torch.diag(torch.tensor([-1.0, 1.0, 1.0]))
    assert (vectors(x @ mirror) - ref @ mirror).abs().max() > 2e-4
    # without cross-product features the same network is E(3)-equivariant (mirror included)
    torch.manual_seed(0)
    model = FlowMol(ModelConfig(n_cp_feats=0)).to(device).eval()
    ref = vectors(x)
    torch.testing.assert_close(vectors(x @ mirror), ref @ mirror, atol=1e-4, rtol=1e-4)


def test_atom_permutation_equivariance(device: torch.device) -> None:
    model = _model(device)
    g = build_graph(list(SIZES))
    x, a, c, dense = _state(g, model.cfg.n_bond_types, seed=3)
    t = torch.tensor([0.5, 0.2])
    ref = _predict(model, g, x, a, c, _edges_from_dense(g, dense), t, device)
    # permute the atoms inside each molecule: new atom i of molecule b is old atom perm_b[i]
    gen = torch.Generator().manual_seed(5)
    perms = [torch.randperm(m, generator=gen) for m in SIZES]
    glob = torch.cat([p + int(o) for p, o in zip(perms, g.node_offset)])
    dense_p = [d[p][:, p] for d, p in zip(dense, perms)]
    out = _predict(model, g, x[glob], a[glob], c[glob], _edges_from_dense(g, dense_p), t, device)
    torch.testing.assert_close(out.x1.cpu(), ref.x1.cpu()[glob], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.a.cpu(), ref.a.cpu()[glob], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.c.cpu(), ref.c.cpu()[glob], atol=1e-5, rtol=1e-5)
    for m_ref, m_out, p in zip(_dense_upper(g, ref.e.cpu()), _dense_upper(g, out.e.cpu()), perms):
        torch.testing.assert_close(m_out, m_ref[p][:, p], atol=1e-5, rtol=1e-5)


def test_molecules_do_not_interact(device: torch.device) -> None:
    model = _model(device)
    g = build_graph(list(SIZES))
    x, a, c, dense = _state(g, model.cfg.n_bond_types, seed=7)
    t = torch.tensor([0.4, 0.9])
    both = _predict(model, g, x, a, c, _edges_from_dense(g, dense), t, device)
    g0 = build_graph([SIZES[0]])
    first = _predict(model, g0, x[: SIZES[0]], a[: SIZES[0]], c[: SIZES[0]], _edges_from_dense(g0, dense[:1]),
                     t[:1], device)
    torch.testing.assert_close(first.x1, both.x1[: SIZES[0]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(first.e, both.e[: first.e.shape[0]], atol=1e-5, rtol=1e-5)


def test_update_after_every_conv_has_no_dead_parameters() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(n_hidden_scalars=16, n_vec_channels=4, n_hidden_edge_feats=8, n_molecule_updates=2, rbf_dim=8,
                      n_cp_feats=2)
    model = FlowMol(cfg)
    g = build_graph([4, 3])
    x, a, c, dense = _state(g, cfg.n_bond_types, seed=1)
    x = x - torch.stack([x[:4].mean(0)] * 4 + [x[4:].mean(0)] * 3)
    batch = MolBatch(x=x, a=a.clamp(max=4), c=c.clamp(max=5), e=_edges_from_dense(g, dense).clamp(max=3), graph=g)
    x0 = aligned_prior(batch, generator=torch.Generator().manual_seed(0))
    terms = model.training_loss(batch, x0, t=torch.tensor([0.2, 0.4]))
    assert math.isfinite(terms.total.item())
    terms.total.backward()
    dead = [k for k, p in model.named_parameters() if p.grad is None]
    assert dead == []
