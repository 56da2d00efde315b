"""Speed of one adjoint-matching (AM) step and of one ODE evaluation, new code against today's, side by side.

Times, on the shipped model (``flowmol_ext.load_pretrained("qm9_small")``, molecule sizes drawn from
its QM9 atom-count histogram, i.e. synthetic QM9-sized batches):

- one AM step, ``--n-traj`` trajectories × ``--steps`` steps (default 32 × 100), split into
  sampling with record (memoryless SDE + CTMC), lean adjoint (a VJP through the base model at every
  step), and the loss forward/backward on the timestep subset (last 25 % + 25 % of the rest);
  the terminal gradient is a fixed random COM-free field on a fraction ``--signal-frac`` of the
  molecules (1 = every molecule; FDC runs see ~0.1–0.4, see ``terminal_gradient``), zero on the rest
  (reward scoring is timed by ``bench/bench_rewards.py``);
- one evaluation: Euler ODE sampling of ``--eval-n`` molecules × ``--eval-steps`` steps (default 256 × 100);

on each thread count of ``--threads``. "today" is the code of commit ``aac49eb`` (the head before the
issue-16 speed work), materialised from git by ``bench/_baseline.py`` and imported side by side;
old and new run interleaved in the same process on the same inputs and weights, so machine load
hits both alike. ``--profile`` prints the torch.profiler top entries of each new part (at
``--profile-steps`` steps).

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_am_step.py --threads 2,1
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_am_step.py --threads 2 --steps 20 --profile

The baseline's loss holds one network graph per loss timestep at once (~0.33 GB each at 32
trajectories, ~14 GB for the 43 timesteps of a 100-step grid). Above ``--baseline-loss-chunk``
timesteps it is timed in chunks of that many timesteps, each its own call and backward: the
chunked baseline is faster than the unchunked one (less memory), so the printed ratio is a lower bound.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _baseline import BASELINE_COMMIT, baseline_model, load_baseline  # noqa: E402

import flowmol_ext  # noqa: E402
from fdc_mol.fdc import adjoint_matching as am_new  # noqa: E402
from flowmol_ext.malloc import keep_freed_memory  # noqa: E402

try:  # the adapter is moving from fdc_mol.fdc to fdc_mol.molecular
    from fdc_mol.molecular.flowmol_flow import FlowMolFlow  # noqa: E402
except ImportError:  # pragma: no cover - older layout
    from fdc_mol.fdc.flowmol_flow import FlowMolFlow  # type: ignore[no-redef]  # noqa: E402


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def terminal_gradient(fine: Any, traj: Any, seed: int, signal_frac: float) -> torch.Tensor:
    """A fixed random COM-free field on ⌈signal_frac·n⌉ molecules (chosen at random), zero on the others.

    In FDC runs most sampled molecules carry no reward gradient: they fail the training gate (NaN reward) or
    lie outside the tail the super-quantile weights. The effect protocol logged 4–7 of 48 (FDC, SQ β = 0.75)
    and 19 of 48 (plain AM) trajectories with signal per step."""
    gen = torch.Generator().manual_seed(seed + 1)
    g = torch.randn(traj.x1.shape, generator=gen)
    n_signal = max(1, math.ceil(signal_frac * traj.n))
    keep = torch.zeros(traj.n, dtype=torch.bool)
    keep[torch.randperm(traj.n, generator=gen)[:n_signal]] = True
    rows = keep if traj.group is None else keep[traj.group]
    return fine.project(g * rows.to(g.dtype).unsqueeze(-1), traj)


def am_step_parts(fine: Any, base: Any, am: Any, *, n_traj: int, steps: int, seed: int,
                  loss_chunk: int | None = None, signal_frac: float = 1.0,
                  shards: int = 1) -> tuple[dict[str, float], dict[str, Any]]:
    """Time one AM step (sample → lean adjoint → loss fwd/bwd) with module ``am``; seconds per part. ``shards``
    > 1 splits the molecules over Python threads in the adjoint and the loss (the new code only)."""
    gen = torch.Generator().manual_seed(seed)
    t_s, traj = _timed(lambda: fine.sample(n_traj, steps, memoryless=True, record=True, generator=gen))
    g = terminal_gradient(fine, traj, seed, signal_frac)
    idx = am.timestep_subset(steps, 0.25, 0.25, gen)
    # today's lean_adjoint has no v_base_steps (it computes v_base at every step); the new one needs only idx
    kw = {"v_base_steps": idx} if "v_base_steps" in inspect.signature(am.lean_adjoint).parameters else {}
    loss_kw = {}
    if shards > 1:
        kw["shards"] = loss_kw["shards"] = shards
    t_a, (adj, v_base) = _timed(lambda: am.lean_adjoint(base, traj, g, **kw))
    for p in fine.parameters():
        p.grad = None

    def loss_fb() -> float:
        chunks = [idx] if loss_chunk is None else list(torch.split(idx, loss_chunk))
        value = 0.0
        for ch in chunks:
            loss = am.am_loss_for_trajectory(fine, traj, adj, v_base, ch, clip=None, **loss_kw)
            loss.backward()
            value += float(loss.detach())
        return value

    t_l, value = _timed(loss_fb)
    grad_norm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in fine.parameters() if p.grad is not None)))
    parts = {"sample": t_s, "adjoint": t_a, "loss": t_l, "total": t_s + t_a + t_l}
    return parts, {"loss": value, "grad_norm": grad_norm, "adj_T": float(adj[steps].norm()),
                   "adj_1": float(adj[1].norm()), "n_loss_steps": int(idx.numel())}


def ode_eval(flow: Any, n: int, steps: int, seed: int, scale_to: int | None = None) -> float:
    """Seconds for one Euler-ODE evaluation of n molecules over ``steps`` steps (scaled to ``scale_to`` steps)."""
    gen = torch.Generator().manual_seed(seed)
    t, _ = _timed(lambda: flow.sample(n, steps, memoryless=False, record=False, generator=gen))
    return t * (scale_to / steps if scale_to else 1.0)


def profile_parts(fine: Any, base: Any, steps: int, n_traj: int, top: int) -> None:
    """torch.profiler top entries (self CPU time) of each part of one new AM step."""
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(7)
    with profile(activities=[ProfilerActivity.CPU]) as p_s:
        traj = fine.sample(n_traj, steps, memoryless=True, record=True, generator=gen)
    g = fine.project(torch.randn(traj.x1.shape), traj)
    with profile(activities=[ProfilerActivity.CPU]) as p_a:
        adj, v_base = am_new.lean_adjoint(base, traj, g)
    idx = am_new.timestep_subset(steps, 0.25, 0.25, gen)
    with profile(activities=[ProfilerActivity.CPU]) as p_l:
        am_new.am_loss_for_trajectory(fine, traj, adj, v_base, idx).backward()
    for name, prof in (("sampling with record", p_s), ("lean adjoint", p_a), ("loss forward/backward", p_l)):
        print(f"\n--- profile (new code): {name}, {n_traj} trajectories x {steps} steps ---")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=36))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="2,1", help="comma-separated torch thread counts")
    ap.add_argument("--n-traj", type=int, default=32)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--eval-n", type=int, default=256)
    ap.add_argument("--eval-steps", type=int, default=100)
    ap.add_argument("--eval-measure-steps", type=int, default=None,
                    help="run the ODE evaluation for this many steps and scale the time to --eval-steps (the ODE "
                         "step costs the same at every step: same graph, one network call)")
    ap.add_argument("--reps", type=int, default=1, help="interleaved old/new repetitions per thread count")
    ap.add_argument("--parts", default="am,eval", help="am, eval (comma-separated)")
    ap.add_argument("--baseline-loss-chunk", type=int, default=8,
                    help="time the baseline loss in chunks of this many timesteps (0: unchunked, needs ~0.33 GB "
                         "per timestep at 32 trajectories)")
    ap.add_argument("--compile", action="store_true",
                    help="also time the new code with the network under torch.compile (after a warm-up that compiles)")
    ap.add_argument("--signal-frac", type=float, default=1.0,
                    help="fraction of trajectories with a non-zero terminal gradient (1: all; the effect protocol "
                         "logged ~0.125 for FDC and ~0.4 for plain AM)")
    ap.add_argument("--shards", type=int, default=1,
                    help="> 1: also time the new code (and the compiled one) with the molecules split over this many "
                         "Python threads in the adjoint and the loss (AMConfig.shards; one torch thread each)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the medians here: {part: {threads: {today_s, <variant>_s}}}")
    ap.add_argument("--malloc", choices=["default", "tuned"], default="default",
                    help="tuned: flowmol_ext.malloc.keep_freed_memory() in this process (what the fdc-mol CLI does); "
                         "it applies to both codes alike: bench/bench_malloc.py compares processes")
    args = ap.parse_args()
    if args.malloc == "tuned" and not keep_freed_memory():
        raise SystemExit("--malloc tuned: glibc mallopt is not available here")
    load = os.getloadavg()
    print(f"AM-step benchmark: shipped qm9_small, today = commit {BASELINE_COMMIT} (bench/_baseline.py), "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, cpus={os.cpu_count()}, "
          f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    base_mods = load_baseline()
    model = flowmol_ext.load_pretrained("qm9_small")
    new_fine = FlowMolFlow(model)
    new_base = new_fine.copy_frozen()
    old_fine = base_mods.flowmol_flow.FlowMolFlow(baseline_model(model))
    old_base = old_fine.copy_frozen()
    chunk = args.baseline_loss_chunk or None
    variants: dict[str, tuple[Any, Any, Any, int]] = {"new": (new_fine, new_base, am_new, 1)}
    if args.shards > 1:
        variants[f"new {args.shards} shards"] = (new_fine, new_base, am_new, args.shards)
    if args.compile:
        c_fine = FlowMolFlow(copy.deepcopy(model))
        c_fine.model.set_compile(True)
        c_base = c_fine.copy_frozen()
        variants["compiled"] = (c_fine, c_base, am_new, 1)
        if args.shards > 1:
            variants[f"compiled {args.shards} shards"] = (c_fine, c_base, am_new, args.shards)
        torch.set_num_threads(int(args.threads.split(",")[0]))
        t0 = time.perf_counter()
        # Two warm-up steps at the timed signal fraction: with signal < 1 the adjoint runs on the selected molecules
        # and a no-grad base forward on the others (more graphs), and a size that changes between calls makes
        # inductor recompile once with that dimension dynamic. A run reaches this state after its first AM steps.
        for warm_seed in (99, 98):
            for shards in sorted({1, args.shards}):
                am_step_parts(c_fine, c_base, am_new, n_traj=args.n_traj, steps=4, seed=warm_seed,
                              signal_frac=args.signal_frac, shards=shards)
        ode_eval(c_fine, 8, 3, seed=99)
        print(f"torch.compile warm-up (2 AM steps of 4 steps: sampling, adjoint VJP, loss fwd/bwd; ODE; dynamic "
              f"shapes): "
              f"{time.perf_counter() - t0:.0f} s, not counted below")
    rows: list[tuple[str, int, list[float], dict[str, list[float]]]] = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for part in args.parts.split(","):
            if part == "am":
                times: dict[str, dict[str, list[float]]] = {"today": {}, **{v: {} for v in variants}}
                for rep in range(args.reps):
                    seed = args.seed + rep
                    o, o_info = am_step_parts(old_fine, old_base, base_mods.am, n_traj=args.n_traj, steps=args.steps,
                                              seed=seed, loss_chunk=chunk, signal_frac=args.signal_frac)
                    for k in o:
                        times["today"].setdefault(k, []).append(o[k])
                    line = f"  [{threads} thr, rep {rep}] today: " + " ".join(f"{k} {v:.1f}s" for k, v in o.items())
                    for name, (fine, base, am, shards) in variants.items():
                        n, n_info = am_step_parts(fine, base, am, n_traj=args.n_traj, steps=args.steps, seed=seed,
                                                  signal_frac=args.signal_frac, shards=shards)
                        for k in n:
                            times[name].setdefault(k, []).append(n[k])
                        line += f" | {name}: " + " ".join(f"{k} {v:.1f}s" for k, v in n.items())
                        print(f"    same seed, today vs {name}: loss {o_info['loss']:.6g} vs {n_info['loss']:.6g}, "
                              f"|grad| {o_info['grad_norm']:.6g} vs {n_info['grad_norm']:.6g}, "
                              f"|adj_1| {o_info['adj_1']:.6g} vs {n_info['adj_1']:.6g} "
                              f"({n_info['n_loss_steps']} loss timesteps)")
                    print(line, flush=True)
                for k in times["today"]:
                    sig = "" if args.signal_frac >= 1 else f" sig {args.signal_frac:g}"
                    rows.append((f"AM {args.n_traj}x{args.steps}{sig} {k}", threads, times["today"][k],
                                 {v: times[v][k] for v in variants}))
            elif part == "eval":
                o_t: list[float] = []
                n_t: dict[str, list[float]] = {v: [] for v in variants}
                for rep in range(args.reps):
                    ms = args.eval_measure_steps or args.eval_steps
                    o_t.append(ode_eval(old_fine, args.eval_n, ms, args.seed + rep, args.eval_steps))
                    for name, (fine, _, _, _) in variants.items():
                        n_t[name].append(ode_eval(fine, args.eval_n, ms, args.seed + rep, args.eval_steps))
                print(f"  [{threads} thr] ODE eval today {o_t[-1]:.1f}s | "
                      + " | ".join(f"{k} {v[-1]:.1f}s" for k, v in n_t.items()), flush=True)
                label = f"ODE eval {args.eval_n}x{args.eval_steps}"
                if args.eval_measure_steps:
                    label += f" (meas. {args.eval_measure_steps})"
                rows.append((label, threads, o_t, n_t))
            else:
                raise ValueError(f"unknown part {part!r}")
    load = os.getloadavg()
    print(f"\nload average at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (other processes share the CPUs)")
    head = f"{'part':34s} {'thr':>3s} {'today (s)':>10s}"
    for v in variants:
        head += f" {v + ' (s)':>14s} {'today/' + v:>16s}"
    print(head)
    for name, threads, o, ns in rows:
        mo = statistics.median(o)
        line = f"{name:34s} {threads:3d} {mo:10.2f}"
        for v in variants:
            mn = statistics.median(ns[v])
            line += f" {mn:14.2f} {mo / mn:15.2f}x"
        print(line)
    if args.json:
        import json

        out: dict[str, dict[str, dict[str, float]]] = {}
        for name, threads, o, ns in rows:
            out.setdefault(name, {})[str(threads)] = {"today_s": statistics.median(o),
                                                      **{f"{v}_s": statistics.median(ns[v]) for v in variants}}
        Path(args.json).write_text(json.dumps(out, indent=1))
    if chunk:
        print(f"(today's loss timed in chunks of {chunk} timesteps: a lower bound on today's time)")
    if args.profile:
        torch.set_num_threads(int(args.threads.split(",")[0]))
        profile_parts(new_fine, new_base, args.profile_steps, args.n_traj, top=15)


if __name__ == "__main__":
    main()
