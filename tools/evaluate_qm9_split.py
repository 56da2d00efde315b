"""Write a processed QM9 split as SDF and score it with ``fdc-mol evaluate`` (the metric sanity check:
real molecules must come out ≥ 99 % valid and stable, otherwise the metric is wrong).

    python tools/evaluate_qm9_split.py --split test --out runs/qm9_test.sdf
    python tools/evaluate_qm9_split.py --split test --random 1000 --geometry --workers 2 --out runs/qm9_test_1000.sdf

``--random N`` takes N molecules drawn without replacement (``--seed``) instead of the first ones (QM9's order
runs from small to large molecules, so the first N are not representative).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fdc_mol.cli import main as cli_main
from fdc_mol.io import write_sdf
from flowmol_ext.data.store import load_split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="data/qm9")
    ap.add_argument("--split", default="test")
    ap.add_argument("--out", type=Path, default=Path("runs/qm9_test.sdf"))
    ap.add_argument("--limit", type=int, default=None, help="the first N molecules")
    ap.add_argument("--random", type=int, default=None, help="N molecules drawn at random (without replacement)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--geometry", action="store_true", help="pass --geometry to fdc-mol evaluate")
    ap.add_argument("--workers", type=int, default=1, help="worker processes of fdc-mol evaluate")
    args = ap.parse_args()
    store = load_split(args.data_dir, args.split)
    if args.random is not None:
        import numpy as np

        idx = sorted(np.random.default_rng(args.seed).choice(len(store), min(args.random, len(store)),
                                                             replace=False).tolist())
    else:
        idx = list(range(len(store) if args.limit is None else min(args.limit, len(store))))
    n = len(idx)
    t0 = time.time()
    mols = [store[i] for i in idx]
    write_sdf(args.out, mols, [{"qm9_index": m.props["qm9_index"], "smiles": m.props["smiles"]} for m in mols])
    print(f"wrote {n} {args.split} molecules to {args.out} in {time.time() - t0:.1f} s")
    t1 = time.time()
    cli_main(["evaluate", str(args.out), "--data-dir", args.data_dir, "--out", str(args.out.with_suffix(".json")),
              "--workers", str(args.workers), *(["--geometry"] if args.geometry else [])])
    print(f"evaluate wall time: {time.time() - t1:.0f} s ({args.workers} workers)")


if __name__ == "__main__":
    main()
