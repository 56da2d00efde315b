"""``fdc-mol compare``: several finetune configs (e.g. FDC and plain AM) over several seeds.

Each (config, seed) runs into ``OUT/<config name>_s<seed>`` (resumable). With the same seed every config shares
the evaluation sizes, noise and CTMC draws (common random numbers), so the pre-trained row (iteration 0) is the
same molecules for all. Writes ``OUT/per_seed.csv`` (the raw rows) and prints mean ± std over seeds, and per
seed whether each method's SQ_β and paired difference exclude the pre-trained value.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
from pathlib import Path
from typing import Any

HELP = "Run finetune configs (FDC, AM, ...) over several seeds and tabulate mean ± std and per-seed rows."

COLS = [("mean_reward", "E[r] (Eh)"), ("sq_beta", "SQ_β (Eh)"), ("paired_delta", "paired Δr (Eh)"),
        ("validity", "validity"), ("molecule_stability", "mol. stab."), ("uniqueness", "uniq."),
        ("composition_tv", "comp. TV")]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", action="append", required=True,
                   help="a config name or file; repeat for each method (e.g. -c fdc_demo_cpu -c am_demo_cpu)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=Path("runs/compare"))
    p.add_argument("--summarize", action="store_true", help="only tabulate finished runs")
    p.add_argument("--no-fixed-graph", action="store_true",
                   help="skip the fixed-graph comparison (each final model's geometry on the same molecules)")
    p.add_argument("--crn-samplers", nargs="+", choices=["ode", "sde"], default=[],
                   help="also compare fresh samples per sampler with common random numbers (CRN-paired bootstrap "
                        "of SQ_β and E[r] differences); a sampler the runs did not record is evaluated now for "
                        "the pre-trained and each final model, cached under OUT/crn_<sampler>/")
    p.add_argument("--fixed-graph-molecules", type=int, default=None, metavar="N",
                   help="sample N pre-trained ODE molecules for the fixed-graph comparison instead of using the "
                        "runs' recorded evaluation molecules (evaluation.n_molecules): narrower intervals for the "
                        "same runs. Rewards are cached per model under OUT/fixed_graph_n<N>/ (a rerun reads them: "
                        "delete that folder after re-running a method); writes OUT/fixed_graph_n<N>.csv; no "
                        "conformer-novelty column")


def mean_std(vals: list[float]) -> str:
    v = [x for x in vals if isinstance(x, (int, float)) and not math.isnan(x)]
    if not v:
        return "n/a"
    m = sum(v) / len(v)
    sd = (sum((x - m) ** 2 for x in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else 0.0
    return f"{m:.4g} ± {sd:.2g}"


def run(args: argparse.Namespace) -> int:
    from fdc_mol.commands.finetune import load_finetune_config, run_finetune
    from fdc_mol.report import format_table
    from flowmol_ext.io_utils import atomic_write_text

    n_fg = getattr(args, "fixed_graph_molecules", None)
    if n_fg is not None and n_fg < 8:  # evaluation.n_molecules' lower bound; checked before any run starts
        raise ValueError(f"--fixed-graph-molecules must be >= 8, got {n_fg}")
    per_seed: list[dict[str, Any]] = []
    names = [Path(c).stem for c in args.config]
    for seed in args.seeds:
        for name, config in zip(names, args.config):
            run_dir = args.out / f"{name}_s{seed}"
            cfg = load_finetune_config(config, run_dir=run_dir, seed=seed)
            if args.summarize and not (run_dir / "model").is_dir():
                continue
            rows = run_finetune(cfg, print_table=False)
            if not rows or rows[-1]["iteration"] != cfg.K:
                continue
            per_seed.append({"method": "pre-trained", "config": name, "seed": seed, **rows[0]})
            per_seed.append({"method": name, "config": name, "seed": seed, **rows[-1]})
    if not per_seed:
        where = f"{args.out}/<config>_s<seed>"
        raise FileNotFoundError(f"no finished run to compare in {where} for configs {names} and seeds {args.seeds}"
                                + (" (--summarize runs nothing)" if args.summarize else ""))
    keys: list[str] = []
    for r in per_seed:
        keys += [k for k in r if k not in keys and isinstance(r[k], (int, float, str))]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    w.writerows(per_seed)
    atomic_write_text(args.out / "per_seed.csv", buf.getvalue())
    methods: dict[str, list[dict[str, Any]]] = {}
    for r in per_seed:
        if r["method"] == "pre-trained" and r["config"] != names[0]:
            continue  # the same molecules in every config of a seed: list them once
        methods.setdefault(r["method"], []).append(r)
    print(f"{len(args.seeds)} seeds {args.seeds}; mean ± std over seeds; per-seed rows: {args.out / 'per_seed.csv'}")
    print(format_table(["method", *[c for _, c in COLS]],
                       [[m, *[mean_std([r.get(k, math.nan) for r in rs]) for k, _ in COLS]]
                        for m, rs in methods.items()]))
    print("\nper seed: SQ_β [95% CI] and paired Δr [95% CI] against the pre-trained model")
    body = []
    for r in per_seed:
        if r["method"] == "pre-trained":
            continue
        body.append([r["seed"], r["method"], f"{r['sq_beta']:.4g} [{r['sq_beta_lo']:.4g}, {r['sq_beta_hi']:.4g}]",
                     f"{r.get('paired_delta', math.nan):.4g} [{r.get('paired_delta_lo', math.nan):.4g}, "
                     f"{r.get('paired_delta_hi', math.nan):.4g}] (n={int(r.get('n_paired', 0))})"])
    print(format_table(["seed", "method", "SQ_β", "paired Δr"], body))
    if not args.no_fixed_graph:
        fixed_graph_comparison(args, names)
    for sampler in args.crn_samplers:
        crn_sampler_comparison(args, names, sampler)
    return 0


#: Two runs' iteration-0 rewards of the same molecules agree to this (Eh). xTB's SCF is not bit-reproducible
#: across thread counts and processes (3.5e-8 Eh measured between runs of the same seed), five orders of magnitude
#: below any reported difference.
SAME_REWARD_ATOL = 1e-6


def same_rewards(a: Any, b: Any, atol: float = SAME_REWARD_ATOL) -> bool:
    """Same shape, NaN (failed molecule) in the same places, finite values within ``atol`` Eh."""
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=0.0, atol=atol, equal_nan=True))


def _recorded_fixed_graph_rewards(args: argparse.Namespace, names: list[str], dirs: dict[str, Path],
                                  seed: int) -> dict[str, Any] | None:
    """The per-molecule fixed-graph rewards each run saved at its last iteration, keyed like the comparison
    (``pre-trained`` = iteration 0's rewards); None unless every run has them and all runs start from the very
    same molecules (identical iteration-0 graphs and rewards within :data:`SAME_REWARD_ATOL`: same model, sizes,
    seed and sampler)."""
    import numpy as np

    from fdc_mol.commands.finetune import load_finetune_config

    out: dict[str, Any] = {}
    ref: dict[str, np.ndarray] | None = None
    for n, config in zip(names, args.config):
        cfg = load_finetune_config(config, run_dir=dirs[n], seed=seed)
        first, last = (dirs[n] / "samples" / f"iteration_{k:03d}_ode.npz" for k in (0, cfg.K))
        if not (first.is_file() and last.is_file()):
            return None
        a0, ak = dict(np.load(first)), dict(np.load(last))
        if "fixed_graph_rewards" not in ak:
            return None
        if ref is None:
            ref = a0
        elif not (same_rewards(ref["rewards"], a0["rewards"])
                  and np.array_equal(ref["graph_keys"], a0["graph_keys"])):
            return None
        out[n] = ak["fixed_graph_rewards"]
    assert ref is not None
    return {"pre-trained": ref["rewards"], **out}


def _recorded_fixed_graph_kde(names: list[str], dirs: dict[str, Path], last: dict[str, int]) -> dict[str, Any] | None:
    """Per-molecule leave-own-reference-out log p̂_pre (nats) of the same molecules, as each run saved it at its
    last iteration (``pre-trained`` = iteration 0's), or None unless every run saved it (runs from before the
    novelty metric, or with the rewards resampled)."""
    import numpy as np

    out: dict[str, Any] = {}
    for n in names:
        paths = [dirs[n] / "samples" / f"iteration_{k:03d}_ode.npz" for k in (0, last[n])]
        if not all(p.is_file() for p in paths):
            return None
        a0, ak = dict(np.load(paths[0])), dict(np.load(paths[1]))
        if "fixed_graph_kde_logp" not in a0 or "fixed_graph_kde_logp" not in ak:
            return None
        out.setdefault("pre-trained", a0["fixed_graph_kde_logp"])
        out[n] = ak["fixed_graph_kde_logp"]
    return out


def fixed_graph_comparison(args: argparse.Namespace, names: list[str]) -> None:
    """Per seed: the pre-trained ODE sample's molecules (recorded discrete trajectory) re-integrated with each
    method's final positions network; SQ_β and the mean of the SAME molecules' rewards (those the strict gate
    scores under every model of the seed), with paired bootstrap intervals of the differences to the pre-trained
    model and between the first two methods."""
    import numpy as np

    from fdc_mol.commands.finetune import load_finetune_config
    from fdc_mol.molecular.statistics import paired_bootstrap, superquantile
    from fdc_mol.report import format_table
    from flowmol_ext.io_utils import atomic_write_text

    rows, body = [], []
    for seed in args.seeds:
        dirs = {n: args.out / f"{n}_s{seed}" for n in names}
        if not all((d / "model").is_dir() for d in dirs.values()):
            continue
        cfg = load_finetune_config(args.config[0], run_dir=dirs[names[0]], seed=seed)
        n_new = getattr(args, "fixed_graph_molecules", None)
        rewards = None if n_new else _recorded_fixed_graph_rewards(args, names, dirs, seed)
        kde = None
        if rewards is not None:
            last = {n: load_finetune_config(c, run_dir=dirs[n], seed=seed).K for n, c in zip(names, args.config)}
            kde = _recorded_fixed_graph_kde(names, dirs, last)
        else:  # N new molecules, or runs from before the per-molecule arrays were saved: sample and score
            rewards = _resampled_fixed_graph_rewards(args, cfg, names, dirs, seed, n_new)
        beta = cfg.utility.beta
        # One set of molecules per seed: those the strict gate scores under EVERY model. Per-pair sets would let a
        # molecule that fails under one method drop out of that method's rows only, so FDC − AM would not equal
        # (FDC − pre) − (AM − pre) on the mean, and "the same molecules" would differ from row to row.
        rewards = {k: np.asarray(v, np.float64) for k, v in rewards.items()}
        scored_by_all = np.logical_and.reduce([np.isfinite(v) for v in rewards.values()])
        rewards = {k: np.where(scored_by_all, v, np.nan) for k, v in rewards.items()}

        def sq(v: np.ndarray, b: float = beta) -> float:
            return superquantile(v, b)

        pairs = [(n, "pre-trained") for n in names] + ([(names[0], names[1])] if len(names) > 1 else [])
        for a, b in pairs:
            dsq = paired_bootstrap(rewards[a], rewards[b], sq, cfg.evaluation.n_boot, seed=seed)
            dmean = paired_bootstrap(rewards[a], rewards[b], np.mean, cfg.evaluation.n_boot, seed=seed)
            row = {"seed": seed, "a": a, "b": b, "sq_a": sq(rewards[a]), "sq_b": sq(rewards[b]),
                   "d_sq": dsq.value, "d_sq_lo": dsq.low, "d_sq_hi": dsq.high, "d_mean": dmean.value,
                   "d_mean_lo": dmean.low, "d_mean_hi": dmean.high, "n": dsq.n}
            line = [seed, f"{a} − {b}", f"{dsq.value:+.4g} [{dsq.low:+.4g}, {dsq.high:+.4g}]",
                    f"{dmean.value:+.4g} [{dmean.low:+.4g}, {dmean.high:+.4g}]", dsq.n, ""]
            if kde is not None:  # conformer novelty of the same molecules: Δ log p̂_pre, lower = more novel
                dk = paired_bootstrap(kde[a], kde[b], np.mean, cfg.evaluation.n_boot, seed=seed)
                row.update({"d_kde_logp": dk.value, "d_kde_logp_lo": dk.low, "d_kde_logp_hi": dk.high})
                line[-1] = f"{dk.value:+.3g} [{dk.low:+.3g}, {dk.high:+.3g}]"
            rows.append(row)
            body.append(line)
    if not rows:
        return
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for r in rows for k in r))  # runs without the novelty arrays leave it blank
    w = csv.DictWriter(buf, fieldnames=fields, restval="")
    w.writeheader()
    w.writerows(rows)
    n_new = getattr(args, "fixed_graph_molecules", None)
    path = args.out / ("fixed_graph.csv" if not n_new else f"fixed_graph_n{n_new}.csv")
    atomic_write_text(path, buf.getvalue())
    print(f"\nfixed graphs: the pre-trained ODE sample's molecules (sizes, noise, types, charges, bonds) with each "
          f"model's geometry (ODE along the recorded discrete states); paired bootstrap 95 % CI; {path}")
    print(format_table(["seed", "difference", "Δ SQ_β (Eh)", "Δ E[r] (Eh)", "molecules",
                        "Δ log p̂_pre (nats)"], body))


def _resampled_fixed_graph_rewards(args: argparse.Namespace, cfg: Any, names: list[str], dirs: dict[str, Path],
                                   seed: int, n_molecules: int | None) -> dict[str, Any]:
    """Per-molecule rewards (Eh; NaN = not scored) of one seed's fixed-graph comparison, sampled now: the
    pre-trained model's ODE sample of ``n_molecules`` molecules (default: the runs' evaluation.n_molecules; the
    run's evaluation seed, so its sizes, noise and CTMC draws) recorded, and each method's final positions network
    integrated along its discrete states. Each model's array is cached in ``OUT/fixed_graph_n<N>/s<seed>_<model>
    .npz`` as soon as it is scored (a rerun, or a run stopped half-way, samples only what is missing)."""
    import numpy as np
    import torch

    from fdc_mol.molecular.job import FinetuneJob, save_npz

    if n_molecules is not None:
        cfg = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={"n_molecules": n_molecules})})
    job_n = cfg.evaluation.n_molecules or cfg.n_fit
    cache = args.out / f"fixed_graph_n{job_n}"
    paths = {m: cache / f"s{seed}_{m}.npz" for m in ["pre-trained", *names]}
    out: dict[str, Any] = {m: np.load(p)["rewards"] for m, p in paths.items() if p.is_file()}
    if len(out) == len(paths):
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with FinetuneJob(cfg) as job, torch.no_grad():
        ref = job.sample_evaluation(job.flow, "ode", record=True)
        for m, p in paths.items():
            if m not in out:
                out[m] = job.rewards_on(ref, None if m == "pre-trained" else job.final_flow(dirs[m]))
                save_npz(p, rewards=out[m])
    return out

_CRN_METRICS = ("validity", "molecule_stability", "uniqueness")


def _crn_sample(args: argparse.Namespace, names: list[str], seed: int, sampler: str) -> dict[str, dict[str, Any]]:
    """Per model (``pre-trained`` and each method's final model) of one seed: the per-molecule rewards of its
    evaluation sample with ``sampler`` (the runs' CRN sizes, noise and CTMC draws) and its validity, molecule
    stability and uniqueness. Taken from the runs' records when they evaluated this sampler; otherwise sampled
    and scored now and cached in ``OUT/crn_<sampler>/s<seed>_<model>.npz`` (a rerun reads the cache)."""
    import numpy as np

    from fdc_mol.commands.finetune import load_finetune_config

    dirs = {n: args.out / f"{n}_s{seed}" for n in names}
    cfgs = {n: load_finetune_config(c, run_dir=dirs[n], seed=seed) for n, c in zip(names, args.config)}
    out: dict[str, dict[str, Any]] = {}
    if all(sampler in c.evaluation.samplers for c in cfgs.values()):
        for n in names:
            with open(dirs[n] / "metrics.csv") as fh:
                rows = list(csv.DictReader(fh))
            prefix = "" if cfgs[n].evaluation.samplers[0] == sampler else f"{sampler}_"
            for model, k, row in (("pre-trained", 0, rows[0]), (n, cfgs[n].K, rows[-1])):
                if model in out:
                    continue
                arr = np.load(dirs[n] / "samples" / f"iteration_{k:03d}_{sampler}.npz")
                out[model] = {"rewards": arr["rewards"], **{m: float(row[prefix + m]) for m in _CRN_METRICS}}
        return out
    cache = args.out / f"crn_{sampler}"
    cache.mkdir(parents=True, exist_ok=True)
    paths = {m: cache / f"s{seed}_{m}.npz" for m in ["pre-trained", *names]}
    for m, p in paths.items():  # cached models: the rewards array and the scalar metrics
        if p.is_file():
            out[m] = {k: (v if k == "rewards" else float(v)) for k, v in np.load(p).items()}
    if len(out) == len(paths):
        return out
    from fdc_mol.molecular.job import FinetuneJob, save_npz
    from fdc_mol.molecular.reward_oracle import molecules_of
    from flowmol_ext.metrics import evaluate_molecules

    with FinetuneJob(cfgs[names[0]]) as job:
        for m, p in paths.items():
            if m in out:
                continue
            flow = job.flow if m == "pre-trained" else job.final_flow(dirs[m])
            mols = molecules_of(job.sample_evaluation(flow, sampler))
            r = np.asarray(job.reward(mols, with_grad=False).value, dtype=np.float64)
            met = evaluate_molecules(mols, train_smiles=job.train_smiles, train_smiles_canonical=True)
            out[m] = {"rewards": r, **{k: float(met[k]) for k in _CRN_METRICS}}
            save_npz(p, **out[m])
    return out

def crn_sampler_comparison(args: argparse.Namespace, names: list[str], sampler: str) -> None:
    """Per seed, fresh samples of the pre-trained and each final model with ``sampler`` under common random
    numbers: SQ_β and E[r] with bootstrap 95 % intervals, validity, molecule stability, uniqueness, and the
    CRN-paired bootstrap of the differences (method − pre-trained, first − second method). The graphs of
    fresh samples differ between models, so these differences include composition changes; the fixed-graph
    table is the paired geometry-only comparison. Writes ``OUT/crn_<sampler>.csv``."""
    import numpy as np

    from fdc_mol.commands.finetune import load_finetune_config
    from fdc_mol.molecular.statistics import bootstrap, crn_bootstrap, superquantile
    from fdc_mol.report import format_table
    from flowmol_ext.io_utils import atomic_write_text

    rows, body, diffs = [], [], []
    for seed in args.seeds:
        if not all((args.out / f"{n}_s{seed}" / "model").is_dir() for n in names):
            continue
        cfg = load_finetune_config(args.config[0], run_dir=args.out / f"{names[0]}_s{seed}", seed=seed)
        beta, n_boot = cfg.utility.beta, cfg.evaluation.n_boot

        def sq(v: np.ndarray, b: float = beta) -> float:
            return superquantile(v, b)

        data = _crn_sample(args, names, seed, sampler)
        for m, d in data.items():
            r = d["rewards"]
            s_ci, e_ci = bootstrap(r, sq, n_boot, seed=seed), bootstrap(r, np.mean, n_boot, seed=seed)
            rows.append({"seed": seed, "model": m, "kind": "value", "sq_beta": s_ci.value, "sq_beta_lo": s_ci.low,
                         "sq_beta_hi": s_ci.high, "mean_reward": e_ci.value, "mean_reward_lo": e_ci.low,
                         "mean_reward_hi": e_ci.high, "n": int(r.size), "n_finite": int(np.isfinite(r).sum()),
                         **{k: d[k] for k in _CRN_METRICS}})
            body.append([seed, m, f"{s_ci.value:.4g} [{s_ci.low:.4g}, {s_ci.high:.4g}]",
                         f"{e_ci.value:.4g} [{e_ci.low:.4g}, {e_ci.high:.4g}]", f"{np.isfinite(r).sum()}/{r.size}",
                         *[f"{d[k]:.3f}" for k in _CRN_METRICS]])
        pairs = [(n, "pre-trained") for n in names] + ([(names[0], names[1])] if len(names) > 1 else [])
        for a, b in pairs:
            ds = crn_bootstrap(data[a]["rewards"], data[b]["rewards"], sq, n_boot, seed=seed)
            de = crn_bootstrap(data[a]["rewards"], data[b]["rewards"], np.mean, n_boot, seed=seed)
            rows.append({"seed": seed, "model": f"{a} − {b}", "kind": "difference", "sq_beta": ds.value,
                         "sq_beta_lo": ds.low, "sq_beta_hi": ds.high, "mean_reward": de.value,
                         "mean_reward_lo": de.low, "mean_reward_hi": de.high, "n": ds.n,
                         **{k: data[a][k] - data[b][k] for k in _CRN_METRICS}})
            diffs.append([seed, f"{a} − {b}", f"{ds.value:+.4g} [{ds.low:+.4g}, {ds.high:+.4g}]",
                          f"{de.value:+.4g} [{de.low:+.4g}, {de.high:+.4g}]",
                          *[f"{data[a][k] - data[b][k]:+.3f}" for k in _CRN_METRICS]])
    if not rows:
        return
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)), restval="")
    w.writeheader()
    w.writerows(rows)
    path = args.out / f"crn_{sampler}.csv"
    atomic_write_text(path, buf.getvalue())
    print(f"\nfresh samples, {sampler.upper()} sampler, common random numbers (same sizes, noise and CTMC draws "
          f"per index; graphs may differ between models); bootstrap 95 % CI; {path}")
    print(format_table(["seed", "model", "SQ_β (Eh)", "E[r] (Eh)", "scored", *_CRN_METRICS], body))
    print(format_table(["seed", "difference", "Δ SQ_β (Eh)", "Δ E[r] (Eh)", *[f"Δ {k}" for k in _CRN_METRICS]],
                       diffs))
