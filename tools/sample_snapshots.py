"""Sample molecules from every model snapshot of a pretraining run, for the learning curve.

Runs where the model trained (a GPU box without RDKit is fine): it only writes tensors, in the
snapshot-sample format documented in :mod:`fdc_mol.io`. The
metrics (stability, validity, ...) are computed afterwards with ``tools/learning_curve.py``.

    python tools/sample_snapshots.py RUN_DIR OUT.pt --n 1000 --steps 100

On a CPU, split the work over processes (one thread each) with ``--only`` and ``--seed``, e.g.
``--only step_0001000 model_last --seed 1``; the metric scripts merge several output files.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fdc_mol.io import encode_molecule, save_snapshot_samples
from flowmol_ext.model.sampler import SamplerConfig, sample_molecules
from flowmol_ext.pretrained import load_model_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-snapshots", type=int, default=12)
    ap.add_argument("--only", nargs="+", help="sample just these snapshots (step_XXXXXXX or model_last)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.only:
        dirs = [args.run_dir / name if name == "model_last" else args.run_dir / "snapshots" / name
                for name in args.only]
        missing = [str(d) for d in dirs if not d.is_dir()]
        if missing:
            raise SystemExit(f"no such snapshot: {', '.join(missing)}")
    else:
        dirs = sorted((args.run_dir / "snapshots").glob("step_*"))
        if len(dirs) > args.max_snapshots:  # keep an even spread, always the last
            idx = torch.linspace(0, len(dirs) - 1, args.max_snapshots).round().long().unique().tolist()
            dirs = [dirs[i] for i in idx]
        dirs.append(args.run_dir / "model_last")
    cfg = SamplerConfig(steps=args.steps, batch_size=args.batch_size)
    records = []
    for d in dirs:
        model = load_model_dir(d, device=args.device)
        t0 = time.time()
        mols = sample_molecules(model, args.n, cfg, seed=args.seed, progress=False, device=args.device)
        dt = time.time() - t0
        meta = model.metadata or {}
        records.append({
            "snapshot": d.name, "global_step": meta.get("global_step"), "wall_time_s": meta.get("wall_time_s"),
            "sample_seconds": dt, "seed": args.seed,
            "molecules": [encode_molecule(m) for m in mols],
        })
        print(f"{d.name}: step {meta.get('global_step')} sampled {len(mols)} molecules in {dt:.1f} s", flush=True)
    save_snapshot_samples(args.out, records, n=args.n, steps=args.steps, device=args.device)


if __name__ == "__main__":
    main()
