"""The ``fdc-mol`` command line: a thin dispatcher over :mod:`fdc_mol.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys

from fdc_mol import __version__
from fdc_mol.commands import COMMANDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fdc-mol",
        description=(
            "Flow Density Control for 3D molecule generation: pretrain a FlowMol-style generator on QM9, "
            "sample and evaluate molecules, and fine-tune it with FDC toward objectives such as "
            "novelty-seeking low xTB energy. No FlowMol weights are downloaded: the project ships its own "
            "QM9 model (qm9_small) and can import an official FlowMol v2.0 qm9_ctmc checkpoint you provide."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fdc-mol {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_path in COMMANDS.items():
        try:
            module = importlib.import_module(module_path)
        except ModuleNotFoundError as err:
            if err.name == module_path:
                continue  # command not built in this version
            raise
        p = sub.add_parser(
            name, help=module.HELP, description=module.HELP, formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    from fdc_mol.runlog import setup_logging

    setup_logging(args.log_level)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; the run directory holds the last finished checkpoint", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as err:
        # Input errors carry a precise message (bad key, file, record); no traceback for users.
        print(f"fdc-mol {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
