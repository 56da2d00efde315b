"""Speed of the re-implemented FlowMol network: train step, forward, end-to-end sampling.

Mirrors the official-code baseline of tests/fixtures/flowmol_v2/README.md §4 (same synthetic
QM9-like batches, same definitions of a train step / forward / sample), so its rows can be set side
by side. The official code cannot run here (DGL has no wheel for torch ≥ 2.3), so the baseline is the
recorded table measured on the same kind of 2-core machine, not in this run: the ratio is indicative.

    python bench/bench_model.py --config small --threads 2
    python bench/bench_model.py --config paper --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from flowmol_ext.batch import MolBatch, Molecule
from flowmol_ext.model.config import ModelConfig
from flowmol_ext.model.flow import FlowMol
from flowmol_ext.model.sampler import SamplerConfig, sample_batch

# Official FlowMol v2.0 QM9 train histogram (reference/flowmol.md §8): sizes 3..27 and 29.
HIST_SIZES = list(range(3, 28)) + [29]
HIST_COUNTS = [1, 3, 3, 9, 16, 50, 132, 358, 799, 1632, 2960, 5102, 7700, 10332, 12691, 12970, 13531, 9194, 9889,
               3324, 4765, 538, 1397, 42, 270, 26]
P_A = [0.35283, 0.51207, 0.05618, 0.07764, 0.00129]
P_E = [0.88177, 0.11046, 0.00598, 0.00179]

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=["small", "paper"], default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tasks", default="train32,train128,fwd100,sample100")
    ap.add_argument("--sample-steps", type=int, default=100)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = FlowMol(config_for(args.config)).to(dev)
    print(f"config {args.config}: {model.n_parameters():,} parameters on {dev} ({args.threads} CPU threads)")
    opt = torch.optim.Adam(model.parameters(), lr=2.5e-4, weight_decay=1e-12)
    results = {}
    for task in args.tasks.split(","):
        if task.startswith("train"):
            batch = synthetic_batch(int(task[5:]), seed=1).to(dev)
            x0 = torch.randn_like(batch.x)

            def step(batch=batch, x0=x0) -> None:
                model.train()
                opt.zero_grad(set_to_none=True)
                model.training_loss(batch, x0).total.backward()
                torch.nn.utils.clip_grad_value_(model.parameters(), 1.0)
                opt.step()

            times = timed(step, args.reps, sync)
        elif task == "fwd100":
            batch = synthetic_batch(100, seed=2).to(dev)
            t = torch.full((100,), 0.5, device=dev)
            model.eval()

            def fwd(batch=batch, t=t) -> None:
                with torch.no_grad():
                    model.predict(batch.x, batch.a, batch.c, batch.e, t, batch.graph, apply_softmax=True,
                                  remove_com=True)

            times = timed(fwd, args.reps, sync)
        elif task == "sample100":
            sizes = synthetic_batch(100, seed=3).n_atoms
            cfg = SamplerConfig(steps=args.sample_steps, stochasticity=10.0, hc_thresh=0.0)
            model.eval()
            times = timed(lambda sizes=sizes, cfg=cfg: sample_batch(model, sizes, cfg, device=dev),
                          max(1, args.reps // 2), sync)
            if args.sample_steps != 100:
                times = [t * 100 / args.sample_steps for t in times]  # scale to 100 steps
        else:
            raise ValueError(f"unknown task {task!r}")
        med = statistics.median(times)
        base = BASELINE.get((args.config, task))
        ref = None if base is None else (base[0] if args.threads >= 2 else base[1])
        ratio = "" if ref is None or dev.type != "cpu" else f"  official/ours = {ref / med:.2f}x (official {ref:.2f} s)"
        print(f"{task:10s} median {med:.3f} s (min {min(times):.3f}, max {max(times):.3f}){ratio}")
        results[task] = {"median_s": med, "min_s": min(times), "max_s": max(times), "official_s": ref}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"peak RSS {rss:.2f} GB")
    if dev.type == "cuda":
        print(f"peak CUDA memory {torch.cuda.max_memory_allocated() / 1e9:.2f} GB ({torch.cuda.get_device_name(0)})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"config": args.config, "device": str(dev), "threads": args.threads, "results": results}, fh,
                      indent=2)


if __name__ == "__main__":
    main()
