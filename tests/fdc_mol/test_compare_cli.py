"""``fdc-mol compare`` end to end on tiny budgets: per-seed rows, mean ± std, and the fixed-graph comparison."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from fdc_mol.cli import main

TINY = {"seed": 0, "model": "qm9_small", "device": "cpu", "n_fit": 16, "sample_steps": 100, "n_atoms": None,
        "am": {"n_traj": 3, "steps": 20, "lct": None, "grad_clip_norm": 1.0}, "data_dir": None,
        "utility": {"kind": "superquantile", "beta": 0.5}, "evaluation": {"samplers": ["ode"], "n_boot": 20},
        "reward": {"level": "gfn1", "executor": "serial", "kind": "composition_corrected",
                   "train_min_distance_scale": 0.5, "train_require_connected": False,
                   "train_allow_radicals": True}}


@pytest.mark.slow
def test_compare_two_methods_one_seed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fdc = {**TINY, "algorithm": "fdc", "K": 1, "am_steps_per_iteration": 1, "mirror_eta": 0.01}
    am = {**TINY, "algorithm": "am", "K": 1, "am_steps_per_iteration": 1, "kl_weight": 0.01}
    for name, cfg in (("tiny_fdc", fdc), ("tiny_am", am)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "cmp"
    rc = main(["compare", "-c", str(tmp_path / "tiny_fdc.yaml"), "-c", str(tmp_path / "tiny_am.yaml"),
               "--seeds", "0", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "fixed graphs" in text and "tiny_fdc − tiny_am" in text
    rows = list(csv.DictReader(open(out / "per_seed.csv")))
    assert [r["method"] for r in rows] == ["pre-trained", "tiny_fdc", "pre-trained", "tiny_am"]
    assert rows[0]["sq_beta"] == rows[2]["sq_beta"]  # same seed: the same pre-trained molecules (CRN)
    fixed = list(csv.DictReader(open(out / "fixed_graph.csv")))
    assert [(r["a"], r["b"]) for r in fixed] == [("tiny_fdc", "pre-trained"), ("tiny_am", "pre-trained"),
                                                 ("tiny_fdc", "tiny_am")]
    assert all(int(r["n"]) == int(fixed[0]["n"]) for r in fixed)  # the same molecules in every comparison
    dm = {(r["a"], r["b"]): float(r["d_mean"]) for r in fixed}  # hence the mean differences add up
    fdc_pre, am_pre = dm[("tiny_fdc", "pre-trained")], dm[("tiny_am", "pre-trained")]
    assert dm[("tiny_fdc", "tiny_am")] == pytest.approx(fdc_pre - am_pre, abs=1e-12)
    assert 2 <= int(fixed[0]["n"]) <= 16
    for r in fixed:
        assert float(r["d_sq_lo"]) <= float(r["d_sq"]) <= float(r["d_sq_hi"])
        assert float(r["d_sq"]) == pytest.approx(float(r["sq_a"]) - float(r["sq_b"]))
    # conformer novelty of the same molecules (mean Δ log p̂_pre is linear: FDC − AM = (FDC − pre) − (AM − pre))
    import numpy as np

    d = {(r["a"], r["b"]): float(r["d_kde_logp"]) for r in fixed}
    assert d[("tiny_fdc", "tiny_am")] == pytest.approx(d[("tiny_fdc", "pre-trained")] - d[("tiny_am", "pre-trained")],
                                                      abs=1e-9)
    lp0 = np.load(out / "tiny_fdc_s0" / "samples" / "iteration_000_ode.npz")["fixed_graph_kde_logp"]
    lp1 = np.load(out / "tiny_fdc_s0" / "samples" / "iteration_001_ode.npz")["fixed_graph_kde_logp"]
    assert d[("tiny_fdc", "pre-trained")] == pytest.approx(float(np.mean(lp1 - lp0)), rel=1e-9)
    # the recorded per-molecule arrays give what sampling the molecules again gives (same CRN draws)
    from fdc_mol.commands import compare as compare_cmd

    recorded = list(csv.DictReader(open(out / "fixed_graph.csv")))
    (out / "fixed_graph.csv").unlink()
    real = compare_cmd._recorded_fixed_graph_rewards
    compare_cmd._recorded_fixed_graph_rewards = lambda *a: None  # force the re-sampling path
    try:
        main(["compare", "-c", str(tmp_path / "tiny_fdc.yaml"), "-c", str(tmp_path / "tiny_am.yaml"),
              "--seeds", "0", "--out", str(out), "--summarize"])
    finally:
        compare_cmd._recorded_fixed_graph_rewards = real
    resampled = list(csv.DictReader(open(out / "fixed_graph.csv")))
    for a, b in zip(recorded, resampled):
        assert a["n"] == b["n"]
        for key in ("sq_a", "sq_b", "d_mean"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-6), key
    # More molecules than the runs recorded: N new pre-trained molecules, every model's rewards cached per model;
    # the table is the cached arrays' paired statistics, and a rerun samples nothing.
    main(["compare", "-c", str(tmp_path / "tiny_fdc.yaml"), "-c", str(tmp_path / "tiny_am.yaml"),
          "--seeds", "0", "--out", str(out), "--summarize", "--fixed-graph-molecules", "24"])
    cached = {m: np.load(out / "fixed_graph_n24" / f"s0_{m}.npz")["rewards"]
              for m in ("pre-trained", "tiny_fdc", "tiny_am")}
    assert all(v.shape == (24,) for v in cached.values())
    both = np.logical_and.reduce([np.isfinite(v) for v in cached.values()])
    big = {(r["a"], r["b"]): r for r in csv.DictReader(open(out / "fixed_graph_n24.csv"))}
    for (a, b), r in big.items():
        assert int(r["n"]) == int(both.sum())
        assert float(r["d_mean"]) == pytest.approx(float(np.mean(cached[a][both] - cached[b][both])), abs=1e-12)
    before_big = (out / "fixed_graph_n24.csv").read_text()
    monkey = pytest.MonkeyPatch()
    from fdc_mol.molecular import job as job_mod

    monkey.setattr(job_mod, "FinetuneJob", lambda *a, **k: (_ for _ in ()).throw(AssertionError("sampled again")))
    try:
        main(["compare", "-c", str(tmp_path / "tiny_fdc.yaml"), "-c", str(tmp_path / "tiny_am.yaml"),
              "--seeds", "0", "--out", str(out), "--summarize", "--fixed-graph-molecules", "24"])
    finally:
        monkey.undo()
    assert (out / "fixed_graph_n24.csv").read_text() == before_big
    # Runs of the same seed whose iteration-0 rewards differ by xTB's float noise (3.5e-8 Eh measured across thread
    # counts) still pair on their records; a real difference, or a failure in one run only, does not.
    import argparse

    args = argparse.Namespace(config=[str(tmp_path / "tiny_fdc.yaml"), str(tmp_path / "tiny_am.yaml")])
    dirs = {n: out / f"{n}_s0" for n in ("tiny_fdc", "tiny_am")}
    first = dirs["tiny_am"] / "samples" / "iteration_000_ode.npz"
    saved = dict(np.load(first))
    assert real(args, ["tiny_fdc", "tiny_am"], dirs, 0) is not None
    for shift, pairs in ((3.5e-8, True), (1e-3, False)):
        np.savez(first, **{**saved, "rewards": saved["rewards"] + shift})
        assert (real(args, ["tiny_fdc", "tiny_am"], dirs, 0) is not None) is pairs, shift
    failed = saved["rewards"].copy()
    failed[np.flatnonzero(np.isfinite(failed))[0]] = np.nan
    np.savez(first, **{**saved, "rewards": failed})
    assert real(args, ["tiny_fdc", "tiny_am"], dirs, 0) is None
    np.savez(first, **saved)

    # Fresh samples under common random numbers, per sampler: the ODE from the runs' records, the SDE (not
    # recorded by these runs) sampled now for the pre-trained and both final models and cached.
    capsys.readouterr()
    main(["compare", "-c", str(tmp_path / "tiny_fdc.yaml"), "-c", str(tmp_path / "tiny_am.yaml"),
          "--seeds", "0", "--out", str(out), "--summarize", "--no-fixed-graph", "--crn-samplers", "ode", "sde"])
    text = capsys.readouterr().out
    assert "ODE sampler, common random numbers" in text and "SDE sampler" in text
    per = {r["method"]: r for r in csv.DictReader(open(out / "per_seed.csv"))}
    crn_ode = {r["model"]: r for r in csv.DictReader(open(out / "crn_ode.csv"))}
    for m in ("pre-trained", "tiny_fdc", "tiny_am"):
        assert float(crn_ode[m]["sq_beta"]) == pytest.approx(float(per[m]["sq_beta"]), abs=1e-9)
        assert float(crn_ode[m]["validity"]) == pytest.approx(float(per[m]["validity"]))
    d = crn_ode["tiny_fdc − pre-trained"]
    want = float(per["tiny_fdc"]["sq_beta"]) - float(per["pre-trained"]["sq_beta"])
    assert float(d["sq_beta"]) == pytest.approx(want)
    assert float(d["sq_beta_lo"]) <= float(d["sq_beta"]) <= float(d["sq_beta_hi"])
    crn_sde = list(csv.DictReader(open(out / "crn_sde.csv")))
    assert [r["model"] for r in crn_sde] == ["pre-trained", "tiny_fdc", "tiny_am", "tiny_fdc − pre-trained",
                                             "tiny_am − pre-trained", "tiny_fdc − tiny_am"]
    vals = {r["model"]: float(r["mean_reward"]) for r in crn_sde}
    assert vals["tiny_fdc − tiny_am"] == pytest.approx(vals["tiny_fdc"] - vals["tiny_am"], abs=1e-9)
    assert all(int(r["n"]) == 16 for r in crn_sde)
    assert sorted(p.name for p in (out / "crn_sde").iterdir()) == ["s0_pre-trained.npz", "s0_tiny_am.npz",
                                                                   "s0_tiny_fdc.npz"]
    # A rerun reads the cache: no model is sampled again, and the table is the same.
    from fdc_mol.molecular import job as job_mod

    def no_sampling(*a: object, **k: object) -> None:
        raise AssertionError("sampled again despite the cache")

    monkey = pytest.MonkeyPatch()
    monkey.setattr(job_mod, "FinetuneJob", no_sampling)
    try:
        before = (out / "crn_sde.csv").read_text()
        main(["compare", "-c", str(tmp_path / "tiny_fdc.yaml"), "-c", str(tmp_path / "tiny_am.yaml"),
              "--seeds", "0", "--out", str(out), "--summarize", "--no-fixed-graph", "--crn-samplers", "sde"])
        assert (out / "crn_sde.csv").read_text() == before
    finally:
        monkey.undo()
