"""Speed of the re-implemented FlowMol network: train step, forward, end-to-end sampling.

Mirrors the official-code baseline of tests/fixtures/flowmol_v2/README.md §4 (same synthetic
QM9-like batches, same definitions of a train step / forward / sample), so its rows can be set side
by side. The official code cannot run here (DGL has no wheel for torch ≥ 2.3), so the baseline is the
recorded table measured on the same kind of 2-core machine, not in this run: the ratio is indicative.

Issue 16: by default every task is also run with "today's" code (commit ``aac49eb``, the head before
the speed work, imported side by side by ``bench/_baseline.py``) on the same weights and inputs,
old and new interleaved rep by rep, and the table prints today/new and, from the official/today
medians measured side by side on this machine kind (issue 16: train B=32 1.18×, B=128 1.29×,
forward 100 1.18×, sampling 100×100 1.10×), the implied official/new ratio. ``--compile`` times
the new network under ``torch.compile`` as an extra column (after a warm-up call that compiles).

    OMP_NUM_THREADS=2 python bench/bench_model.py --config small --threads 2
    python bench/bench_model.py --config paper --device cuda --no-compare
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from flowmol_ext.batch import MolBatch, Molecule
from flowmol_ext.malloc import keep_freed_memory
from flowmol_ext.model.config import ModelConfig
from flowmol_ext.model.flow import FlowMol
from flowmol_ext.model.sampler import SamplerConfig, sample_batch

# Official FlowMol v2.0 QM9 train histogram (reference/flowmol.md §8): sizes 3..27 and 29.
HIST_SIZES = list(range(3, 28)) + [29]
HIST_COUNTS = [1, 3, 3, 9, 16, 50, 132, 358, 799, 1632, 2960, 5102, 7700, 10332, 12691, 12970, 13531, 9194, 9889,
               3324, 4765, 538, 1397, 42, 270, 26]
P_A = [0.35283, 0.51207, 0.05618, 0.07764, 0.00129]
P_E = [0.88177, 0.11046, 0.00598, 0.00179]

# Issue 16: official/today (commit aac49eb) measured side by side on this machine kind (small config,
# 2 threads, 5 interleaved rounds, medians of 5 reps).
OFFICIAL_OVER_TODAY = {"train32": 1.18, "train128": 1.29, "fwd100": 1.18, "sample100": 1.10}

# Official code, random weights, 2-core VM (fixtures README §4): median seconds for (threads=2, threads=1).
BASELINE = {
    ("paper", "train32"): (2.79, 3.70), ("paper", "train128"): (16.71, 22.81),
    ("paper", "fwd100"): (2.90, 4.91), ("paper", "sample100"): (279.15, 456.75),
    ("small", "train32"): (0.58, 0.97), ("small", "train128"): (2.40, 3.36),
    ("small", "fwd100"): (0.74, 1.11), ("small", "sample100"): (65.59, 88.47),
}


def synthetic_batch(n_mols: int, seed: int) -> MolBatch:
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor(HIST_COUNTS, dtype=torch.float)
    sizes = [HIST_SIZES[i] for i in torch.multinomial(counts, n_mols, replacement=True, generator=g).tolist()]
    mols = []
    for n in sizes:
        x = torch.randn(n, 3, generator=g) * 1.5
        a = torch.multinomial(torch.tensor(P_A), n, replacement=True, generator=g)
        e = torch.multinomial(torch.tensor(P_E), n * (n - 1) // 2, replacement=True, generator=g)
        mols.append(Molecule(x=x - x.mean(0), a=a, c=torch.full((n,), 2), bonds=Molecule.bonds_from_e_upper(e, n)))
    return MolBatch.from_molecules(mols)


def config_for(name: str) -> ModelConfig:
    return ModelConfig.paper() if name == "paper" else ModelConfig.small(n_bond_types=5, update_after_first_conv=False)


def timed(fn, reps: int, sync) -> list[float]:  # noqa: ANN001
    fn()  # warm-up
    sync()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def make_task(task: str, model, opt, dev: torch.device, sample_steps: int, sampler_fn, cfg_cls):  # noqa: ANN001, ANN201
    """A zero-argument callable running one rep of ``task`` on ``model`` (inputs fixed by seeds)."""
    if task.startswith("train"):
        batch = synthetic_batch(int(task[5:]), seed=1).to(dev)
        x0 = torch.randn_like(batch.x)

        def step() -> None:
            model.train()
            opt.zero_grad(set_to_none=True)
            model.training_loss(batch, x0, generator=torch.Generator().manual_seed(0)).total.backward()
            torch.nn.utils.clip_grad_value_(model.parameters(), 1.0)
            opt.step()

        return step
    if task == "fwd100":
        batch = synthetic_batch(100, seed=2).to(dev)
        t = torch.full((100,), 0.5, device=dev)

        def fwd() -> None:
            model.eval()
            with torch.no_grad():
                model.predict(batch.x, batch.a, batch.c, batch.e, t, batch.graph, apply_softmax=True, remove_com=True)

        return fwd
    if task == "sample100":
        sizes = synthetic_batch(100, seed=3).n_atoms
        cfg = cfg_cls(steps=sample_steps, stochasticity=10.0, hc_thresh=0.0)

        def sample() -> None:
            model.eval()
            sampler_fn(model, sizes, cfg, generator=torch.Generator().manual_seed(0), device=dev)

        return sample
    raise ValueError(f"unknown task {task!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=["small", "paper"], default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tasks", default="train32,train128,fwd100,sample100")
    ap.add_argument("--sample-steps", type=int, default=100)
    ap.add_argument("--no-compare", action="store_true", help="skip today's code (commit aac49eb)")
    ap.add_argument("--compile", action="store_true", help="also time the new network under torch.compile")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--malloc", choices=["default", "tuned"], default="default",
                    help="tuned: flowmol_ext.malloc.keep_freed_memory() in this process (what the fdc-mol CLI does); "
                         "it applies to both codes alike: bench/bench_malloc.py compares processes")
    args = ap.parse_args()
    if args.malloc == "tuned" and not keep_freed_memory():
        raise SystemExit("--malloc tuned: glibc mallopt is not available here")
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = FlowMol(config_for(args.config)).to(dev)
    load = os.getloadavg()
    print(f"config {args.config}: {model.n_parameters():,} parameters on {dev} ({args.threads} CPU threads, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})")
    variants: dict[str, tuple] = {}
    opt = torch.optim.Adam(model.parameters(), lr=2.5e-4, weight_decay=1e-12)
    variants["new"] = (model, opt, sample_batch, SamplerConfig)
    if not args.no_compare:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _baseline import BASELINE_COMMIT, baseline_model, load_baseline

        base = load_baseline()
        old = baseline_model(model)
        old_opt = torch.optim.Adam(old.parameters(), lr=2.5e-4, weight_decay=1e-12)
        variants["today"] = (old, old_opt, base.sampler.sample_batch, base.sampler.SamplerConfig)
        print(f"today = commit {BASELINE_COMMIT} (bench/_baseline.py), same initial weights, interleaved reps")
    if args.compile:
        import copy

        cmodel = copy.deepcopy(model)
        cmodel.vector_field.set_compile(True)
        copt = torch.optim.Adam(cmodel.parameters(), lr=2.5e-4, weight_decay=1e-12)
        variants["compiled"] = (cmodel, copt, sample_batch, SamplerConfig)
    results = {}
    for task in args.tasks.split(","):
        fns = {k: make_task(task, m, o, dev, args.sample_steps, sf, cc) for k, (m, o, sf, cc) in variants.items()}
        times: dict[str, list[float]] = {k: [] for k in fns}
        for k, fn in fns.items():  # warm-up (and compile)
            t0 = time.perf_counter()
            fn()
            sync()
            if k == "compiled":
                print(f"  {task}: compiled warm-up {time.perf_counter() - t0:.1f} s")
        reps = max(1, args.reps // 2) if task == "sample100" else args.reps
        for _ in range(reps):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                sync()
                times[k].append(time.perf_counter() - t0)
        scale = 100 / args.sample_steps if task == "sample100" else 1.0
        med = {k: statistics.median(v) * scale for k, v in times.items()}
        base_ref = BASELINE.get((args.config, task))
        ref = None if base_ref is None else (base_ref[0] if args.threads >= 2 else base_ref[1])
        lo, hi = min(times["new"]) * scale, max(times["new"]) * scale
        line = f"{task:10s} new {med['new']:.3f} s (min {lo:.3f}, max {hi:.3f})"
        row = {"median_s": med["new"], "min_s": lo, "max_s": hi, "official_s": ref}
        if "today" in med:
            sp = med["today"] / med["new"]
            line += f" | today {med['today']:.3f} s, today/new {sp:.2f}x"
            row.update(today_s=med["today"], today_over_new=sp)
            if task in OFFICIAL_OVER_TODAY and args.config == "small" and dev.type == "cpu":
                off = OFFICIAL_OVER_TODAY[task] * sp
                line += (f" | official/new {off:.2f}x (= issue-16 side-by-side official/today "
                         f"{OFFICIAL_OVER_TODAY[task]:.2f}x × today/new)")
                row["official_over_new_via_issue16"] = off
        if "compiled" in med:
            line += f" | compiled {med['compiled']:.3f} s"
            if "today" in med:
                line += f", today/compiled {med['today'] / med['compiled']:.2f}x"
            row["compiled_s"] = med["compiled"]
        if ref is not None and dev.type == "cpu":
            line += f" | recorded official table {ref:.2f} s: official/new {ref / med['new']:.2f}x"
        print(line)
        results[task] = row
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    load = os.getloadavg()
    print(f"peak RSS {rss:.2f} GB; load average at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if dev.type == "cuda":
        print(f"peak CUDA memory {torch.cuda.max_memory_allocated() / 1e9:.2f} GB ({torch.cuda.get_device_name(0)})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"config": args.config, "device": str(dev), "threads": args.threads, "results": results}, fh,
                      indent=2)


if __name__ == "__main__":
    main()
