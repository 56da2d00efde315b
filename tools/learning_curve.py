"""Learning curve of a pretraining run: sample metrics per snapshot against training time.

Reads the file written by ``tools/sample_snapshots.py`` (molecules sampled from each snapshot),
computes atom/molecule stability, validity, uniqueness and novelty with flowmol_ext.metrics, and
writes a CSV and a PNG (metrics against wall-clock training time, so the cost of each point shows).

    python tools/learning_curve.py snapshot_samples.pt --data-dir data/qm9 --out-prefix docs/qm9_small_curve
    python tools/learning_curve.py cpu_a.pt cpu_b.pt --hardware "2-core CPU" --batch-size 64 \
        --step-offset 2867 --prior docs/qm9_small_learning_curve_gpu.csv --out-prefix docs/qm9_small_curve_cpu
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

from fdc_mol.io import decode_molecules, load_snapshot_samples
from flowmol_ext.data.store import load_train_smiles
from flowmol_ext.metrics import evaluate_molecules

KEYS = ("atom_stability", "molecule_stability", "validity", "connectivity", "uniqueness", "novelty", "mean_n_atoms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("samples", type=Path, nargs="+", help="files of tools/sample_snapshots.py (pooled per snapshot)")
    ap.add_argument("--data-dir", default="data/qm9")
    ap.add_argument("--out-prefix", type=Path, required=True)
    ap.add_argument("--hardware", default="1x H200", help="what trained the run, for the plot's axis label")
    ap.add_argument("--batch-size", type=int, default=256, help="training batch size, for molecules seen")
    ap.add_argument("--step-offset", type=int, default=0, help="steps trained before this run (init_from)")
    ap.add_argument("--prior", type=Path, help="learning-curve CSV of the run this one started from (plotted first)")
    ap.add_argument("--prior-batch-size", type=int, default=256)
    ap.add_argument("--paused-s", type=float, default=0.0,
                    help="seconds the run was paused (SIGSTOP) before its first snapshot; subtracted from wall time")
    args = ap.parse_args()
    train = load_train_smiles(args.data_dir)
    rows = []
    for rec in load_snapshot_samples(args.samples):
        mols = decode_molecules(rec)
        met = evaluate_molecules(mols, train_smiles=train, train_smiles_canonical=True)
        row = {"snapshot": rec["snapshot"], "global_step": rec["global_step"],
               "train_minutes": ((rec["wall_time_s"] or float("nan")) - args.paused_s) / 60.0, "n": len(mols),
               "molecules_seen_M": (args.step_offset * args.prior_batch_size
                                    + (rec["global_step"] or 0) * args.batch_size) / 1e6}
        row.update({k: met.get(k, float("nan")) for k in KEYS})
        rows.append(row)
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    args.out_prefix.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{args.out_prefix}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    keys = ("atom_stability", "molecule_stability", "validity", "uniqueness", "novelty")
    if args.prior:
        with open(args.prior, newline="") as fh:
            prior = list(csv.DictReader(fh))
        px = [float(r["global_step"]) * args.prior_batch_size / 1e6 for r in prior]
        for i, k in enumerate(keys):
            ax.plot(px, [float(r[k]) for r in prior], marker=".", ls="--", color=f"C{i}", alpha=0.6)
        ax.axvline(args.step_offset * args.prior_batch_size / 1e6, color="grey", lw=0.8)
        x = [r["molecules_seen_M"] for r in rows]
        ax.set_xlabel(f"training molecules seen (millions); dashed: {args.prior.name}, solid: this run "
                      f"({args.hardware})", fontsize=7)
    else:
        x = [r["train_minutes"] for r in rows]
        ax.set_xlabel(f"training wall time (minutes, {args.hardware})")
    for i, k in enumerate(keys):
        ax.plot(x, [r[k] for r in rows], marker="o", label=k, color=f"C{i}")
    ax.set_ylabel("fraction of samples (100 steps)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    steps = [r["global_step"] for r in rows]
    ax.set_title(f"qm9_small learning curve (steps {steps[0]}..{steps[-1]}, batch {args.batch_size})")
    fig.tight_layout()
    fig.savefig(f"{args.out_prefix}.png", dpi=120)
    print(f"wrote {args.out_prefix}.csv and .png")
    assert all(math.isfinite(r["validity"]) for r in rows)


if __name__ == "__main__":
    main()
