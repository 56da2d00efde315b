"""Reward components: dxtb gap/dipole gradients against finite differences, transforms against closed forms,
aggregation numbers, NaN propagation with reasons, the config schema, and the user plugin protocol."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from fdc_mol.config import FinetuneConfig, RewardConfig
from fdc_mol.rewards.components import (
    ComponentConfig,
    ComponentReward,
    TransformConfig,
    aggregate,
    apply_transform,
    load_plugin,
)
from fdc_mol.rewards.dxtb_props import xtb_properties
from flowmol_ext.config import ConfigError, validate_config

from .conftest import qm9_rows

EXAMPLES = Path(__file__).resolve().parents[3] / "docs" / "examples"
Z = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}


@pytest.fixture()
def examples_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    yield
    sys.modules.pop("plugin_example", None)


def _fd_check(name: str, z: np.ndarray, x: np.ndarray, atoms_coords: list[tuple[int, int]], h: float = 1e-4) -> None:
    p = xtb_properties(z, x, names=(name,), with_grad=True)
    for i, k in atoms_coords:
        xp, xm = x.copy(), x.copy()
        xp[i, k] += h
        xm[i, k] -= h
        vp = xtb_properties(z, xp, names=(name,), with_grad=False).values[name]
        vm = xtb_properties(z, xm, names=(name,), with_grad=False).values[name]
        fd = (vp - vm) / (2 * h)
        assert p.grads[name][i, k] == pytest.approx(fd, rel=1e-4, abs=1e-5), (name, i, k)


@pytest.mark.slow
def test_gap_and_dipole_gradients_match_central_differences() -> None:
    """A real QM9 molecule (propanal, row 34 of the sample: polar, HOMO and LUMO 1.5 eV and 4 eV from their
    neighbours): autograd through dxtb's SCF against central differences (h = 1e-4 Å) on coordinates of three
    different atoms. (At a degenerate HOMO, e.g. acetonitrile's π pair, the gap is not differentiable.)"""
    els, xyz, smi = qm9_rows(35)[34]
    assert smi == "CCC=O"
    z = np.array([Z[e] for e in els])
    p = xtb_properties(z, xyz, names=("gap", "dipole"), with_grad=False)
    assert 1.0 < p.values["gap"] < 20.0, smi  # eV
    assert p.values["dipole"] > 0.3, smi  # Debye: a polar molecule, so |μ| is smooth here
    coords = [(0, 0), (1, 2), (len(els) - 1, 1)]
    _fd_check("gap", z, xyz, coords)
    _fd_check("dipole", z, xyz, coords)


def test_gap_gradient_is_invariant_to_translation() -> None:
    els, xyz, _ = qm9_rows(13)[12]
    z = np.array([Z[e] for e in els])
    p = xtb_properties(z, xyz, names=("gap",))
    assert np.abs(p.grads["gap"].sum(0)).max() < 1e-6  # Σ_i ∂gap/∂x_i = 0: the gap ignores a rigid shift
    q = xtb_properties(z, xyz + 3.0, names=("gap",), with_grad=False)
    assert q.values["gap"] == pytest.approx(p.values["gap"], abs=1e-8)


@pytest.mark.parametrize("kind", ["sigmoid", "reverse_sigmoid", "clip", "step"])
def test_transforms_against_closed_forms(kind: str) -> None:
    t = TransformConfig(kind=kind, low=2.0, high=6.0, k=0.3)
    v = np.array([-1.0, 2.0, 3.5, 4.0, 5.9, 6.0, 9.0, np.nan])
    out, d = apply_transform(t, v)
    f = v[:-1]
    if kind in ("sigmoid", "reverse_sigmoid"):
        s = 1.0 / (1.0 + 10.0 ** (10 * 0.3 * (f - 4.0) / (2.0 - 6.0)))  # REINVENT4's formula
        want = s if kind == "sigmoid" else 1 - s
        assert out[:-1] == pytest.approx(want, rel=1e-12)
        assert out[3] == pytest.approx(0.5)  # the midpoint
        h = 1e-6
        num = (apply_transform(t, f + h)[0] - apply_transform(t, f - h)[0]) / (2 * h)
        assert d[:-1] == pytest.approx(num, rel=1e-6, abs=1e-10)
    elif kind == "clip":
        assert out[:-1].tolist() == [2.0, 2.0, 3.5, 4.0, 5.9, 6.0, 6.0]
        assert d[:-1].tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    else:
        assert out[:-1].tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
        assert (d[:-1] == 0).all()
    assert math.isnan(out[-1]) and math.isnan(d[-1])


def test_aggregation_numbers() -> None:
    s = np.array([[0.5, 0.8], [0.2, 0.9], [np.nan, 0.5], [-0.1, 0.5]])
    w = np.array([1.0, 3.0])
    r, dr, why = aggregate(s, w, "sum")
    assert r[:2] == pytest.approx([(0.5 + 3 * 0.8) / 4, (0.2 + 3 * 0.9) / 4])
    assert r[3] == pytest.approx((-0.1 + 1.5) / 4)  # a sum takes negative scores
    assert math.isnan(r[2]) and dr[0].tolist() == [0.25, 0.75]
    r, dr, why = aggregate(s, w, "product")
    assert r[0] == pytest.approx(0.5**0.25 * 0.8**0.75) and r[1] == pytest.approx(0.2**0.25 * 0.9**0.75)
    assert dr[0, 0] == pytest.approx(r[0] * 0.25 / 0.5)  # ∂/∂s₁ of s₁^¼ s₂^¾
    assert math.isnan(r[2]) and math.isnan(r[3]) and "positive" in why[3] and why[0] == ""


def test_weighted_sum_and_gradients_of_components(qm9_molecules, examples_on_path) -> None:  # noqa: ANN001
    """Aggregate of a dxtb gap (maximize, sigmoid) and the example plugin (minimize, raw): value and gradient are
    the weighted combination of the raw columns; the energy constraint is a column with its own gradient."""
    mols = qm9_molecules[3:6]
    rw = ComponentReward([
        ComponentConfig(kind="gap", transform={"kind": "sigmoid", "low": 4.0, "high": 10.0}, weight=2.0),
        ComponentConfig(plugin="plugin_example:radius_of_gyration", name="rg", direction="minimize",
                        params={"heavy_only": False}),
        ComponentConfig(kind="xtb_energy", role="constraint"),
    ], "sum", executor="serial")
    try:
        res = rw(mols)
    finally:
        rw.close()
    assert res.ok.all()
    s_gap, d_gap = apply_transform(TransformConfig(kind="sigmoid", low=4.0, high=10.0), res.extras["gap"])
    want = (2 * s_gap - res.extras["rg"]) / 3
    assert res.value == pytest.approx(want, rel=1e-12)
    for i, m in enumerate(mols):
        spec_x = m.x.double().numpy()
        rg_grad = load_plugin("plugin_example:radius_of_gyration")([m], True, heavy_only=False).grad[0]
        from fdc_mol.rewards.base import spec_from_molecule

        sp = spec_from_molecule(m)
        gap_grad = xtb_properties(sp.z, spec_x, names=("gap",)).grads["gap"]
        assert res.grad[i] == pytest.approx((2 * d_gap[i] * gap_grad - rg_grad) / 3, rel=1e-6, abs=1e-9)
    assert res.energy == pytest.approx(res.extras["xtb_energy"])
    assert res.energy.max() < -4.0  # Hartree
    assert [g.shape for g in res.extra_grads["xtb_energy"]] == [(m.n_atoms, 3) for m in mols]
    props = res.sdf_props(0)
    assert {"reward", "gap_eV", "rg", "xtb_energy_Eh", "energy_Eh"} <= set(props)


def test_failures_propagate_as_nan_with_reason(qm9_molecules, examples_on_path) -> None:  # noqa: ANN001
    """A molecule the gate rejects, one a plugin cannot score and one outside a QED gate: NaN (never 0) and the
    failing component named in the reason; the others keep their values."""
    good = qm9_molecules[8]
    clash = qm9_molecules[9]
    clash = type(clash)(x=clash.x.clone(), a=clash.a, c=clash.c, bonds=clash.bonds)
    clash.x[1] = clash.x[0] + 0.3  # two atoms 0.3 Å apart
    methane = qm9_molecules[0]  # one heavy atom: the heavy-atom radius of gyration is undefined
    rw = ComponentReward([
        ComponentConfig(kind="gap"),
        ComponentConfig(plugin="plugin_example:radius_of_gyration", name="rg", role="weight"),
        ComponentConfig(kind="qed", role="gate", transform={"kind": "step", "low": 0.0, "high": 0.99}),
    ], executor="serial")
    res = rw([good, clash, methane])
    assert res.ok.tolist() == [True, False, False]
    assert np.isfinite(res.value[0]) and np.isnan(res.value[1:]).all()
    assert res.reason[1].startswith("gap: overlapping atoms")
    assert res.reason[2] == "rg: 1 counted atom(s), need 2"
    assert res.grad[1] is None and res.grad[2] is None
    rw2 = ComponentReward([ComponentConfig(kind="gap"),
                           ComponentConfig(kind="qed", role="gate", transform={"kind": "step", "low": 0.9, "high": 1})],
                          executor="serial")
    res2 = rw2([good])
    assert not res2.ok[0] and res2.reason[0].startswith("gate qed: ") and "outside [0.9, 1]" in res2.reason[0]
    assert np.isfinite(res2.extras["gap"][0])  # the gap column is kept


def test_schema_rejects_gradient_free_terms_with_one_line() -> None:
    for comp, needle in [
        ({"kind": "qed"}, "component 'qed' has no position gradient, so it cannot be a gradient-carrying 'objective'"),
        ({"kind": "qed", "role": "constraint"}, "use role 'gate' or 'weight'"),
        ({"plugin": "m:f", "has_gradient": False}, "component 'f' has no position gradient"),
        ({"kind": "gap", "transform": {"kind": "step", "low": 1, "high": 2}}, "step transform has zero gradient"),
        ({"kind": "qed", "role": "gate"}, "needs transform {kind: step, low, high}"),
        ({"kind": "gap", "plugin": "m:f"}, "exactly one of 'kind' or 'plugin'"),
    ]:
        with pytest.raises(ConfigError) as err:
            validate_config(RewardConfig, {"components": [{"kind": "gap", "name": "g0"}, comp]}, source="cfg.yaml")
        msg = str(err.value)
        assert needle in msg, msg
        line = [ln for ln in msg.splitlines() if needle in ln]
        assert len(line) == 1
    assert validate_config(RewardConfig, {"components": [{"kind": "gap"}, {"kind": "qed", "role": "weight"}]})
    with pytest.raises(ConfigError, match="reward.kind composition_corrected does not apply"):
        validate_config(RewardConfig, {"kind": "composition_corrected", "components": [{"kind": "gap"}]})
    with pytest.raises(ConfigError, match="reward.aggregate product applies only with reward.components"):
        validate_config(RewardConfig, {"aggregate": "product"})
    with pytest.raises(ConfigError, match="role 'objective'"):
        validate_config(RewardConfig, {"components": [{"kind": "gap", "role": "constraint"}]})


def test_config_without_components_is_unchanged() -> None:
    cfg = validate_config(RewardConfig, {"level": "gfn1", "kind": "composition_corrected"})
    assert cfg.components is None
    from fdc_mol.rewards import make_molecular_reward
    from fdc_mol.rewards.composition import CompositionCorrectedReward

    rw = make_molecular_reward(cfg.model_copy(update={"executor": "serial"}))
    assert isinstance(rw, CompositionCorrectedReward)
    rw.close()


@pytest.mark.parametrize("name", ["gap_sq_constrained_cpu", "fdc_demo_cpu"])
def test_resolved_config_loads_again(name: str, tmp_path: Path) -> None:
    """The resolved config a run writes (every key, defaults included) validates again: with and without
    components."""
    import yaml

    from fdc_mol.config import config_path
    from flowmol_ext.config import load_config

    cfg = load_config(FinetuneConfig, config_path(name))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    again = load_config(FinetuneConfig, tmp_path / "config.yaml")
    assert again == cfg


def test_barrier_config_must_name_a_constraint_component() -> None:
    base = {"reward": {"components": [{"kind": "gap"}, {"kind": "xtb_energy", "role": "constraint", "name": "E"}]},
            "utility": {"kind": "log_barrier", "beta": 0.75,
                        "barrier": {"objective": "superquantile", "constraint": "E", "bound": -5.0}}}
    cfg = validate_config(FinetuneConfig, base)
    assert cfg.utility.barrier.bound == -5.0
    bad = {**base, "utility": {**base["utility"], "barrier": {**base["utility"]["barrier"], "constraint": "gap"}}}
    with pytest.raises(ConfigError, match="must name a reward component with role 'constraint'"):
        validate_config(FinetuneConfig, bad)


def test_plugin_example_runs_and_bad_plugins_fail_clearly(qm9_molecules, examples_on_path, caplog) -> None:  # noqa: ANN001
    mols = qm9_molecules[10:13]
    fn = load_plugin("plugin_example:radius_of_gyration")
    out = fn(mols, with_grad=True)
    x = mols[0].x.double().numpy()
    heavy = mols[0].a.numpy() != 1
    assert out.value[0] == pytest.approx(np.sqrt(((x[heavy] - x[heavy].mean(0)) ** 2).sum(1).mean()))
    for bad, needle in [("no_such_pkg.mod:fn", "plugin 'no_such_pkg.mod:fn': cannot import module 'no_such_pkg.mod'"),
                        ("plugin_example:nope", "plugin 'plugin_example:nope': module 'plugin_example' has no "
                                                "callable 'nope'")]:
        with pytest.raises(ValueError) as err:
            ComponentReward([ComponentConfig(kind="gap"), ComponentConfig(plugin=bad, role="weight",
                                                                          has_gradient=False)], executor="serial")
        assert str(err.value).startswith(needle) and "\n" not in str(err.value), str(err.value)
    # a plugin that raises: every molecule NaN with a one-line reason naming it; the other columns are kept
    rw = ComponentReward([ComponentConfig(kind="gap"),
                          ComponentConfig(plugin="plugin_example:broken", role="weight", has_gradient=False)],
                         executor="serial")
    res = rw(mols)
    assert not res.ok.any()
    assert res.reason[0] == ("broken: plugin 'plugin_example:broken' raised RuntimeError: example failure inside "
                             "the plugin")
    assert np.isfinite(res.extras["gap"]).all()
    assert "plugin_example:broken" in caplog.text


def test_training_gate_reaches_dxtb_components(qm9_molecules) -> None:  # noqa: ANN001
    """for_training() applies the bond-aware clash gate to dxtb components (not only to energies)."""
    m = qm9_molecules[9]
    m = type(m)(x=m.x.clone(), a=m.a, c=m.c, bonds=m.bonds)
    i, j = int(m.bonds[0, 0]), int(m.bonds[0, 1])
    m.x[j] = m.x[i] + (m.x[j] - m.x[i]) * (0.85 / float((m.x[j] - m.x[i]).norm()))  # a bond of 0.85 Å
    assert float((m.x[j] - m.x[i]).norm()) == pytest.approx(0.85, abs=1e-5)
    rw = ComponentReward([ComponentConfig(kind="gap")], executor="serial", train_update={"min_distance_scale": 0.5})
    strict = rw([m])
    train = rw.for_training()([m])
    assert not strict.ok[0] and "min_distance_A" in strict.reason[0]
    assert train.ok[0] and np.isfinite(train.value[0]), train.reason[0]


def test_energy_components_strain_and_mmff(qm9_molecules) -> None:  # noqa: ANN001
    """xtb_energy and composition_corrected_energy share one tblite call; strain = E − E(relaxed) ≥ 0 with gradient
    ∇E; mmff_energy equals the MMFF94 reward's energy (all Eh)."""
    from fdc_mol.rewards import make_reward
    from fdc_mol.rewards.composition import _counts, load_element_references

    mols = qm9_molecules[12:14]
    rw = ComponentReward([
        ComponentConfig(kind="xtb_energy", direction="minimize"),
        ComponentConfig(kind="composition_corrected_energy", role="constraint", name="ecc"),
        ComponentConfig(kind="strain", role="constraint"),
        ComponentConfig(kind="mmff_energy", role="constraint"),
    ], executor="serial")
    try:
        res = rw(mols)
    finally:
        rw.close()
    assert res.ok.all(), res.reason
    with make_reward("gfn1", executor="serial") as ref, make_reward("mmff94", executor="serial") as mm:
        e = ref(mols)
        emm = mm(mols, with_grad=False)
    np.testing.assert_allclose(res.extras["xtb_energy"], e.energy, rtol=1e-10)
    np.testing.assert_allclose(res.value, -e.energy, rtol=1e-10)  # minimize: r = −E
    np.testing.assert_allclose(res.extras["ecc"], e.energy - _counts(mols) @ load_element_references("gfn1"))
    assert (res.extras["strain"] >= 0).all() and (res.extras["strain"] < 0.01).all()  # DFT geometries: small strain
    np.testing.assert_allclose(res.extras["mmff_energy"], emm.energy, rtol=1e-10)
    for i in range(2):
        np.testing.assert_allclose(res.grad[i], e.grad[i], rtol=1e-10)  # d(−E)/dx
        np.testing.assert_allclose(res.extra_grads["strain"][i], -e.grad[i], rtol=1e-10)  # ∇strain = ∇E
        np.testing.assert_allclose(res.extra_grads["ecc"][i], -e.grad[i], rtol=1e-10)


def test_plugin_from_an_entry_point(qm9_molecules, examples_on_path, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """'entry-point:NAME' loads a function registered by an installed distribution (here a dist-info directory on
    sys.path) under the group fdc_mol.reward_components; an unknown name gives one line listing what is there."""
    dist = tmp_path / "fdc_plugin_demo-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fdc-plugin-demo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[fdc_mol.reward_components]\nrg = plugin_example:radius_of_gyration\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rw = ComponentReward([ComponentConfig(plugin="entry-point:rg", direction="minimize")], executor="serial")
    res = rw(qm9_molecules[10:12])
    direct = load_plugin("plugin_example:radius_of_gyration")(qm9_molecules[10:12], with_grad=False)
    np.testing.assert_allclose(res.value, -direct.value)
    assert set(res.extras) == {"rg"}
    with pytest.raises(ValueError) as err:
        load_plugin("entry-point:nope")
    assert str(err.value).startswith("plugin 'entry-point:nope': no entry point 'nope' in group "
                                     "'fdc_mol.reward_components' (installed: ") and "rg" in str(err.value)
