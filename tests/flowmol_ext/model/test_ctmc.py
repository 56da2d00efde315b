"""CTMC jump step and Euler position step reproduce the official ``CTMCVectorField.step`` (tiny fixture)."""

from __future__ import annotations

import pytest
import torch

from flowmol_ext.graph import lower_from_upper
from flowmol_ext.model.ctmc import CTMCDraws, ctmc_step, euler_position_step, purity_unmask_prob, temper
from flowmol_ext.model.flow import velocity_from_endpoint
from tests.flowmol_ext.model._fixtures import fixture_graph, tiny, tiny_model


def test_euler_step_matches_fixture() -> None:
    fx = tiny()
    g = fixture_graph(fx)
    a_node = fx["alpha_t"][g.node_graph, 0]
    ap_node = fx["alpha_t_prime"][g.node_graph, 0]
    v = velocity_from_endpoint(fx["x_t"], fx["out_x_com_removed"], a_node, ap_node)
    torch.testing.assert_close(v, fx["euler_v_x"], atol=1e-5, rtol=1e-5)
    x_next = euler_position_step(fx["x_t"], fx["out_x_com_removed"], fx["t"][g.node_graph], fx["dt"])
    torch.testing.assert_close(x_next, fx["euler_x_next"], atol=1e-5, rtol=1e-5)
    model = tiny_model(fx)
    torch.testing.assert_close(
        model.velocity_from_endpoint(fx["x_t"], fx["out_x_com_removed"], fx["t"][g.node_graph]), fx["euler_v_x"]
    )


def test_full_step_replays_official_step() -> None:
    fx = tiny()
    g = fixture_graph(fx)
    model = tiny_model(fx).eval()
    t = float(fx["step_t"])
    dt = float(torch.tensor(fx["step_s"], dtype=torch.float32) - torch.tensor(t, dtype=torch.float32))
    state = {k: fx[f"step_in_{k}_t"].argmax(-1) for k in "ace"}
    with torch.no_grad():
        pred = model.predict(fx["step_in_x_t"], state["a"], state["c"], state["e"], t, g,
                             apply_softmax=True, remove_com=True)
    torch.testing.assert_close(pred.x1, fx["step_pred_x"], atol=1e-5, rtol=1e-5)
    x_new = euler_position_step(fx["step_in_x_t"], pred.x1, t, dt)
    torch.testing.assert_close(x_new, fx["step_out_x_t"], atol=1e-5, rtol=1e-5)

    mask_index = dict(zip("ace", model.mask_index))
    n_changed = {}
    for k in "ace":
        probs = getattr(pred, k)
        torch.testing.assert_close(probs, fx[f"step_pred_{k}_probs"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(temper(probs, fx["step_temperature"]), fx[f"step_p1_{k}_tempered"], atol=1e-4,
                                   rtol=0)
        sfx = "_upper" if k == "e" else ""
        draws = CTMCDraws(fx[f"step_x1_sampled_{k}{sfx}"], fx[f"step_unmask_rand_{k}{sfx}"],
                          fx[f"step_mask_rand_{k}{sfx}"])
        s_in = state[k][g.upper] if k == "e" else state[k]
        out = ctmc_step(s_in, probs, t=t, dt=dt, eta=fx["step_stochasticity"], temperature=fx["step_temperature"],
                        last_step=False, mask_index=mask_index[k], hc_thresh=fx["step_hc_thresh"], draws=draws)
        new, x1 = (lower_from_upper(out.state, g), lower_from_upper(out.x1_sampled, g)) if k == "e" else (
            out.state, out.x1_sampled)
        assert torch.equal(new, fx[f"step_out_{k}_t"].argmax(-1)), k
        assert torch.equal(x1, fx[f"step_out_{k}_1_pred"].argmax(-1)), k
        m = mask_index[k]
        n_changed[k] = (int(((s_in == m) & (out.state != m)).sum()), int(((s_in != m) & (out.state == m)).sum()))
    assert n_changed == {"a": (1, 2), "c": (2, 1), "e": (4, 6)}  # unmasked / re-masked, as the README states


def test_step_with_generator_and_last_step() -> None:
    torch.manual_seed(0)
    n, K = 400, 5
    probs = torch.softmax(torch.randn(n, K), -1)
    state = torch.full((n,), K)
    state[:200] = torch.randint(0, K, (200,))
    gen = torch.Generator().manual_seed(1)
    out = ctmc_step(state, probs, t=0.5, dt=0.01, eta=10.0, temperature=1.0, last_step=False, mask_index=K,
                    generator=gen)
    unmasked = (state == K) & (out.state != K)
    remasked = (state != K) & (out.state == K)
    assert torch.equal(out.state[unmasked], out.x1_sampled[unmasked])
    # expected rates 0.12 and 0.1 on 200 tokens each
    assert 5 <= int(unmasked.sum()) <= 45 and 3 <= int(remasked.sum()) <= 40
    # last step from t = 1 - dt unmasks every masked token (rate clamps at 1) and never re-masks
    last = ctmc_step(state, probs, t=0.99, dt=0.01, eta=10.0, temperature=0.05, last_step=True, mask_index=K)
    assert not bool((last.state == K).any())
    assert torch.equal(last.state[:200], state[:200])


def test_purity_sampling_prefers_confident_tokens() -> None:
    K = 4
    state = torch.full((8,), K)
    state[6:] = 0  # two unmasked tokens
    confident = torch.tensor([0.97, 0.01, 0.01, 0.01])
    vague = torch.full((K,), 0.25)
    probs = torch.stack([confident] * 2 + [vague] * 4 + [confident] * 2)
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    p = purity_unmask_prob(state, probs, torch.tensor(0.25), K, 0.9, group)
    # group 0: M=4, H=2, budget 1 -> p_h 0.5, p_l 0 ; group 1: M=2, H=0 -> p_l 0.25; unmasked -> 0
    torch.testing.assert_close(p, torch.tensor([0.5, 0.5, 0.0, 0.0, 0.25, 0.25, 0.0, 0.0]))
    out = ctmc_step(state, probs, t=0.5, dt=0.125, eta=0.0, temperature=1.0, last_step=True, mask_index=K,
                    hc_thresh=0.9, group=group,
                    draws=CTMCDraws(torch.zeros(8, dtype=torch.long), torch.full((8,), 0.4)))  # rate 0.25
    assert out.state.tolist() == [0, 0, K, K, K, K, 0, 0]


def test_ctmc_step_rejects_bad_input() -> None:
    probs = torch.full((3, 5), 0.2)
    s = torch.full((3,), 5)
    with pytest.raises(ValueError, match="mask_index"):
        ctmc_step(s, probs, t=0.1, dt=0.1, eta=1.0, temperature=1.0, last_step=False, mask_index=4)
    with pytest.raises(ValueError, match="temperature"):
        ctmc_step(s, probs, t=0.1, dt=0.1, eta=1.0, temperature=0.0, last_step=False, mask_index=5)
    with pytest.raises(ValueError, match="dt must be"):
        ctmc_step(s, probs, t=0.1, dt=0.0, eta=1.0, temperature=1.0, last_step=False, mask_index=5)


def test_cpu_generator_gives_same_draws_on_any_device(device: torch.device) -> None:
    """A CPU generator drives sampling on CPU and CUDA alike (draws made on the CPU, moved to the device)."""
    from flowmol_ext.graph import build_graph
    from flowmol_ext.model.interpolants import centered_normal_prior

    torch.manual_seed(0)
    K = 5
    probs = torch.softmax(torch.randn(50, K), -1)
    state = torch.full((50,), K)
    state[:20] = 1
    kw = dict(t=0.4, dt=0.05, eta=10.0, temperature=0.5, last_step=False, mask_index=K)
    ref = ctmc_step(state, probs, generator=torch.Generator().manual_seed(9), **kw)
    out = ctmc_step(state.to(device), probs.to(device), generator=torch.Generator().manual_seed(9), **kw)
    assert out.state.device.type == device.type
    assert torch.equal(out.state.cpu(), ref.state) and torch.equal(out.x1_sampled.cpu(), ref.x1_sampled)
    g = build_graph([4, 6])
    x_ref = centered_normal_prior(g, generator=torch.Generator().manual_seed(2))
    x_dev = centered_normal_prior(g.to(device), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(x_dev.cpu(), x_ref, atol=1e-6, rtol=0)
    assert x_ref[:4].mean(0).abs().max() < 1e-6 and x_ref[4:].mean(0).abs().max() < 1e-6
