"""Write a processed QM9 split as SDF and score it with ``fdc-mol evaluate`` (the metric sanity check:
real molecules must come out ≥ 99 % valid and stable, otherwise the metric is wrong).

    python tools/evaluate_qm9_split.py --split test --out runs/qm9_test.sdf
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
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()
    store = load_split(args.data_dir, args.split)
    n = len(store) if args.limit is None else min(args.limit, len(store))
    t0 = time.time()
    mols = [store[i] for i in range(n)]
    write_sdf(args.out, mols, [{"qm9_index": m.props["qm9_index"], "smiles": m.props["smiles"]} for m in mols])
    print(f"wrote {n} {args.split} molecules to {args.out} in {time.time() - t0:.1f} s")
    cli_main(["evaluate", str(args.out), "--data-dir", args.data_dir, "--out", str(args.out.with_suffix(".json"))])


if __name__ == "__main__":
    main()
