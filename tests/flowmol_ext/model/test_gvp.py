"""The per-node projection shortcuts equal the concatenate-then-project formulas they replace."""

from __future__ import annotations

import torch

from flowmol_ext.model.gvp import GVP
from flowmol_ext.model.vector_field import EdgeUpdate


def test_gvp_lead_projection_equals_concatenated_input() -> None:
    torch.manual_seed(0)
    gvp = GVP(dim_vectors_in=5, dim_vectors_out=4, dim_feats_in=7 + 3, dim_feats_out=6, n_cp_feats=2)
    lead, rest, vec = torch.randn(9, 7), torch.randn(9, 3), torch.randn(9, 5, 3)
    ref_s, ref_v = gvp(torch.cat((lead, rest), dim=1), vec)
    s, v = gvp(rest, vec, lead_proj=gvp.project_leading_feats(lead))
    torch.testing.assert_close(s, ref_s, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(v, ref_v, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(gvp(torch.cat((rest, lead), dim=1), vec)[0], ref_s)  # the column order matters


def test_edge_update_equals_mlp_on_concatenated_edge_input() -> None:
    torch.manual_seed(1)
    for with_distance in (True, False):
        upd = EdgeUpdate(n_node_scalars=8, n_edge_feats=5, update_edge_w_distance=with_distance, rbf_dim=4)
        h, e, d_rbf = torch.randn(6, 8), torch.randn(12, 5), torch.randn(12, 4)
        src, dst = torch.randint(0, 6, (12,)), torch.randint(0, 6, (12,))
        parts = [h[src], h[dst], e] + ([d_rbf] if with_distance else [])
        ref = upd.edge_norm(e + upd.edge_update_fn(torch.cat(parts, dim=-1)))
        torch.testing.assert_close(upd(h, e, d_rbf, src, dst), ref, atol=1e-6, rtol=1e-6)
