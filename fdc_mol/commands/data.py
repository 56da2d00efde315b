"""``fdc-mol data qm9``: fetch QM9, perceive bonds and charges, split as FlowMol, write shards + stats."""

from __future__ import annotations

import argparse
import json
import os

HELP = "Get and process QM9 (qm9pack wheel, figshare files, XYZ folder or CSV): bonds, FlowMol splits, statistics."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    p = sub.add_parser(
        "qm9", help="process QM9 into shards + statistics", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--source", default="qm9pack", choices=["qm9pack", "figshare", "xyz-dir", "csv"],
                   help="input kind: PyPI wheel qm9pack==1.0.3, figshare dsgdb9nsd.xyz.tar.bz2, a folder of .xyz "
                        "files, or a CSV in the qm9pack part-file format")
    p.add_argument("--path", default=None,
                   help="input file/folder (qm9pack: a wheel, default: the cache or `pip download`)")
    p.add_argument("--uncharacterized", default=None,
                   help="uncharacterized.txt (default: next to --path; qm9pack lacks these molecules anyway)")
    p.add_argument("--data-dir", default="data/qm9", help="output folder for the processed data")
    p.add_argument("--cache-dir", default="data/cache", help="download cache (qm9pack wheel)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes for bond perception")
    p.add_argument("--split-seed", type=int, default=42, help="pandas random_state of FlowMol's split")
    p.add_argument("--force", action="store_true", help="reprocess even if the output is up to date")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fdc_mol.runlog import start_run
    from flowmol_ext.data.qm9 import format_summary, process_qm9
    from flowmol_ext.io_utils import check_writable_dir

    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    check_writable_dir(Path(args.data_dir), "--data-dir")  # before downloading and processing
    config = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    start_run("data qm9", seed=args.split_seed, config=config, device="cpu")
    report = process_qm9(
        source=args.source,
        path=args.path,
        data_dir=Path(args.data_dir),
        cache_dir=Path(args.cache_dir),
        uncharacterized=args.uncharacterized,
        workers=args.workers,
        force=args.force,
        split_seed=args.split_seed,
        progress=not args.no_progress,
    )
    print(format_summary(report))
    if report["n_input"] and not report.get("noop"):
        print(json.dumps({"kept_fraction": round(report["kept_fraction"], 5), "excluded": report["excluded"]}))
    return 0
