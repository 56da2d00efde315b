"""Bad inputs: each gets NaN and a reason; good molecules in the same batch are unaffected."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from fdc_mol.rewards import make_reward
from flowmol_ext.batch import Molecule

from .conftest import molecule_from_xyz, qm9_rows


def _mol(symbols: str, xyz, bonds=(), charges=None) -> Molecule:
    types = {"C": 0, "H": 1, "N": 2, "O": 3, "F": 4}
    a = torch.tensor([types.get(s, 7) for s in symbols], dtype=torch.long)
    c = torch.tensor([2 + q for q in (charges or [0] * len(symbols))], dtype=torch.long)
    return Molecule(
        x=torch.tensor(np.asarray(xyz, dtype=np.float64).reshape(-1, 3), dtype=torch.float32),
        a=a,
        c=c,
        bonds=torch.tensor(list(bonds), dtype=torch.long).reshape(-1, 3),
    )


def _water(**kw) -> Molecule:
    return _mol("OHH", [[0, 0, 0], [0, 0, 0.96], [0.93, 0, -0.24]], bonds=[(0, 1, 1), (0, 2, 1)], **kw)


def _bad_inputs() -> dict[str, tuple[Molecule, str]]:
    w = _water()
    overlap = _water()
    overlap.x[2] = overlap.x[1] + 0.05
    exploded = _water()
    exploded.x[1, 2] = 1e6
    unknown = _water()
    unknown.a[1] = 7
    empty = Molecule(
        x=torch.zeros(0, 3),
        a=torch.zeros(0, dtype=torch.long),
        c=torch.zeros(0, dtype=torch.long),
        bonds=torch.zeros(0, 3, dtype=torch.long),
    )
    methyl = _mol(
        "CHHH",
        [[0, 0, 0], [1.09, 0, 0], [-0.545, 0.944, 0], [-0.545, -0.944, 0]],
        bonds=[(0, 1, 1), (0, 2, 1), (0, 3, 1)],
    )
    nan = _water()
    nan.x[0, 1] = float("nan")
    # ethane with a C=C double bond: pentavalent carbons, even electron count (18)
    pentavalent = _mol(
        "CCHHHHHH",
        [
            [0, 0, 0],
            [1.5, 0, 0],
            [-0.4, 1.0, 0],
            [-0.4, -0.5, 0.9],
            [-0.4, -0.5, -0.9],
            [1.9, 1.0, 0],
            [1.9, -0.5, 0.9],
            [1.9, -0.5, -0.9],
        ],
        bonds=[(0, 1, 2), (0, 2, 1), (0, 3, 1), (0, 4, 1), (1, 5, 1), (1, 6, 1), (1, 7, 1)],
    )
    two = _mol("OHHOHH", np.r_[w.x.numpy(), w.x.numpy() + 3.0], bonds=[(0, 1, 1), (0, 2, 1), (3, 4, 1), (3, 5, 1)])
    carbene = _mol("CHH", [[0, 0, 0], [1.09, 0, 0], [-0.4, 1.0, 0]], bonds=[(0, 1, 1), (0, 2, 1)])
    return {
        "overlapping": (overlap, "overlapping atoms"),
        "exploded": (exploded, "exploded coordinates"),
        "unknown element": (unknown, "unknown element"),
        "empty": (empty, "empty molecule"),
        "radical (odd electrons)": (methyl, "radical"),
        "radical (carbene)": (carbene, "radical"),
        "nan": (nan, "non-finite coordinates"),
        "bad valence": (pentavalent, "RDKit sanitisation failed"),
        "disconnected": (two, "disconnected"),
    }


def test_each_bad_input_gets_nan_and_a_reason() -> None:
    cases = _bad_inputs()
    good = molecule_from_xyz(*qm9_rows(3)[2][:2])
    mols = [good] + [m for m, _ in cases.values()] + [good]
    reward = make_reward("gfn1", executor="serial")
    res = reward(mols)
    assert res.ok[0] and res.ok[-1] and res.energy[0] == res.energy[-1]
    assert res.reason[0] == "" and res.grad[0].shape == (3, 3)
    for k, (name, (_, expect)) in enumerate(cases.items(), start=1):
        assert not res.ok[k], name
        assert np.isnan(res.value[k]) and np.isnan(res.energy[k]), name
        assert res.grad[k] is None, name
        assert expect in res.reason[k], (name, res.reason[k])
        assert res.sdf_props(k)["energy_failure"] == res.reason[k]
    print("\n".join(f"{n}: {r}" for n, r in zip(cases, res.reason[1:-1])))


def test_scf_non_convergence_is_a_failure_not_zero() -> None:
    good = molecule_from_xyz(*qm9_rows(50)[49][:2])
    for engine in ("tblite", "xtb"):
        res = make_reward("gfn2", engine=engine, executor="serial", max_iterations=2)([good])
        assert not res.ok[0] and np.isnan(res.value[0])
        assert "not converge" in res.reason[0], res.reason[0]


@pytest.mark.parametrize("engine", ["tblite", "xtb"])
def test_engine_errors_are_caught_with_the_gate_off(engine: str) -> None:
    """Garbage that bypasses the gate still gives NaN + the engine's reason, quickly."""
    off = dict(
        sanitize=False,
        min_distance_A=None,
        require_connected=False,
        max_abs_coordinate_A=1e9,
        max_iterations=30,
        executor="serial",
        engine=engine,
    )
    overlap = _water()
    overlap.x[2] = overlap.x[0]
    exploded = _water()
    exploded.x[1, 2] = 1e6
    t0 = time.monotonic()
    res = make_reward("gfn2", **off)([overlap, exploded, _water()])
    assert time.monotonic() - t0 < 20
    assert not res.ok[0] and not res.ok[1] and res.ok[2]
    assert np.isnan(res.value[:2]).all()
    assert all(r for r in res.reason[:2]), res.reason


def test_open_shell_allowed_when_configured() -> None:
    methyl = _bad_inputs()["radical (odd electrons)"][0]
    res = make_reward("gfn2", executor="serial", watchdog=False, allow_radicals=True)([methyl])
    assert res.ok[0] and -5.0 < res.energy[0] < -3.0
    bad = make_reward("gfn2", executor="serial", watchdog=False, multiplicity=2)([_water()])
    assert not bad.ok[0] and "multiplicity 2 is impossible with 10 electrons" in bad.reason[0]


def test_malformed_and_charged_inputs() -> None:
    w = _water()
    w.x = torch.zeros(2, 3)
    res = make_reward("gfn1", executor="serial", watchdog=False)([w])
    assert not res.ok[0] and "positions have shape (2, 3), expected (3, 3)" in res.reason[0]
    # hydroxide: charge -1 from the formal charges, 10 electrons, closed shell
    oh = _mol("OH", [[0, 0, 0], [0, 0, 0.97]], bonds=[(0, 1, 1)], charges=[-1, 0])
    res = make_reward("gfn1", executor="serial", watchdog=False)([oh])
    assert res.ok[0], res.reason


def test_bad_settings_raise_precise_errors() -> None:
    from flowmol_ext.config import ConfigError

    with pytest.raises(ConfigError, match="unknown key 'acuracy'"):
        make_reward("gfn1", acuracy=1.0)
    with pytest.raises(ConfigError, match="engine 'rdkit' cannot run method 'gfn1'"):
        make_reward("gfn1", engine="rdkit")
    with pytest.raises(ValueError, match="unknown executor spec 'cluster'"):
        make_reward("gfn1", executor="cluster")
