"""Learning curve of a pretraining run: sample metrics per snapshot against training time.

Reads the file written by ``bench/sample_snapshots.py`` (molecules sampled from each snapshot),
computes atom/molecule stability, validity, uniqueness and novelty with flowmol_ext.metrics, and
writes a CSV and a PNG (metrics against wall-clock training time, so the cost of each point shows).

    python bench/learning_curve.py snapshot_samples.pt --data-dir data/qm9 --out-prefix docs/qm9_small_curve
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import torch

from flowmol_ext.batch import Molecule
from flowmol_ext.data.store import load_train_smiles
from flowmol_ext.metrics import evaluate_molecules

KEYS = ("atom_stability", "molecule_stability", "validity", "connectivity", "uniqueness", "novelty", "mean_n_atoms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("samples", type=Path)
    ap.add_argument("--data-dir", default="data/qm9")
    ap.add_argument("--out-prefix", type=Path, required=True)
    args = ap.parse_args()
    blob = torch.load(args.samples, weights_only=True)
    train = load_train_smiles(args.data_dir)
    rows = []
    for rec in blob["records"]:
        mols = [Molecule(x=m["x"], a=m["a"].long(), c=m["c"].long(), bonds=m["bonds"].long())
                for m in rec["molecules"]]
        met = evaluate_molecules(mols, train_smiles=train, train_smiles_canonical=True)
        row = {"snapshot": rec["snapshot"], "global_step": rec["global_step"],
               "train_minutes": (rec["wall_time_s"] or float("nan")) / 60.0, "n": len(mols)}
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
    x = [r["train_minutes"] for r in rows]
    for k in ("atom_stability", "molecule_stability", "validity", "uniqueness", "novelty"):
        ax.plot(x, [r[k] for r in rows], marker="o", label=k)
    ax.set_xlabel("training wall time (minutes, 1x H200)")
    ax.set_ylabel("fraction of 1,000 samples (100 steps)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    steps = [r["global_step"] for r in rows]
    ax.set_title(f"qm9_small learning curve (steps {steps[0]}..{steps[-1]}, batch 256)")
    fig.tight_layout()
    fig.savefig(f"{args.out_prefix}.png", dpi=120)
    print(f"wrote {args.out_prefix}.csv and .png")
    assert all(math.isfinite(r["validity"]) for r in rows)


if __name__ == "__main__":
    main()
