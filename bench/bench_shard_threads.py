"""Would sharding molecules over Python threads use 2 cores better than torch's intra-op threads?

The lean adjoint's unit of work: the base network's forward and vector–Jacobian product (w.r.t. positions) on a
recorded batch of ``--n-traj`` QM9-sized molecules of the shipped ``qm9_small``, at ``--n-steps`` grid steps.
Timed three ways in the same process, interleaved, medians of ``--reps``:

- ``1 thread``: one call, ``torch.set_num_threads(1)`` (the reference of the ratios);
- ``2 intra-op threads``: one call, ``torch.set_num_threads(2)`` (what the code does today);
- ``2 Python threads``: the molecules split in two halves (``FlowMolFlow.select``), each half's calls in its own
  Python thread with ``torch.set_num_threads(1)`` (PyTorch releases the GIL inside its kernels).

Molecules are independent in the network, so the sharded results equal the unsharded rows (float rounding).
Prints each time and the speed-ups over 1 thread; ``--compile`` puts the network under torch.compile first.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_shard_threads.py [--compile]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from fdc_mol.fdc.flow import Trajectory
from fdc_mol.molecular.flowmol_flow import FlowMolFlow
from flowmol_ext import load_pretrained


def forward_vjp(flow: FlowMolFlow, traj: Trajectory, steps: list[int]) -> torch.Tensor:
    """Forward and VJP (ones as the cotangent) of the velocity at each grid step in ``steps``; the last VJP."""
    g = torch.zeros(())
    for k in steps:
        x = traj.xs[k].detach().requires_grad_(True)
        v = flow.velocity(x, float(traj.times[k]), k, traj)
        (g,) = torch.autograd.grad(v, x, grad_outputs=torch.ones_like(v))
    return g


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-traj", type=int, default=32)
    ap.add_argument("--grid", type=int, default=20, help="steps of the recorded SDE trajectory")
    ap.add_argument("--n-steps", type=int, default=9, help="grid steps timed per call (the last ones before t = 1)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    load = os.getloadavg()
    print(f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, cpus={os.cpu_count()}")
    flow = FlowMolFlow(load_pretrained("qm9_small"), trainable="positions")
    if args.compile:
        flow.model.set_compile(True)
    torch.set_num_threads(2)
    traj = flow.sample(args.n_traj, args.grid, memoryless=True, record=True, generator=torch.Generator().manual_seed(0))
    base = flow.copy_frozen()
    half = torch.zeros(args.n_traj, dtype=torch.bool)
    half[::2] = True
    shards = [base.select(traj, half), base.select(traj, ~half)]
    steps = list(range(args.grid - 1 - args.n_steps, args.grid - 1))
    pool = ThreadPoolExecutor(2)

    def one_call(threads: int) -> float:
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        forward_vjp(base, traj, steps)
        return time.perf_counter() - t0

    def sharded() -> float:
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        for f in [pool.submit(forward_vjp, base, s, steps) for s in shards]:
            f.result()
        return time.perf_counter() - t0

    # equal results: the sharded VJP rows are the unsharded ones
    torch.set_num_threads(1)
    full = forward_vjp(base, traj, steps)
    rows = [forward_vjp(base, s, steps) for s in shards]
    atoms = half[traj.group]
    err = max(float((full[atoms] - rows[0]).abs().max()), float((full[~atoms] - rows[1]).abs().max()))
    print(f"max |VJP(full) - VJP(shard)| = {err:.2e} Å⁻¹·(Å/t)")
    for _ in range(2):  # warm-up (and compilation with --compile)
        one_call(1), one_call(2), sharded()
    times: dict[str, list[float]] = {"1 thread": [], "2 intra-op threads": [], "2 Python threads": []}
    for _ in range(args.reps):
        times["1 thread"].append(one_call(1))
        times["2 intra-op threads"].append(one_call(2))
        times["2 Python threads"].append(sharded())
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"forward + VJP, {args.n_traj} molecules x {len(steps)} steps{' (compiled)' if args.compile else ''}, "
          f"medians of {args.reps}:")
    for k, v in med.items():
        print(f"  {k:20s} {v:7.3f} s   speed-up over 1 thread {med['1 thread'] / v:.2f}x")
    print(f"  2 Python threads / 2 intra-op threads: {med['2 intra-op threads'] / med['2 Python threads']:.2f}x")
    load = os.getloadavg()
    print(f"load average at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
