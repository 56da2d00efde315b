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


def _one_line(err: BaseException) -> str:
    """The error's message on one line (pydantic errors as 'key: problem (got value)', no web links)."""
    from pydantic import ValidationError

    if isinstance(err, ValidationError):
        from flowmol_ext.config import _format_errors

        text = _format_errors(err, err.title)
    else:
        text = str(err) or type(err).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " ".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run one ``fdc-mol`` command. Returns the exit status: 0 success, 2 bad input (config, file,
    argument), 1 other failures (write errors, unexpected exceptions), 128 + signum when stopped by
    SIGTERM (143) or SIGINT (130). Every failure is reported as one line on stderr."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    from fdc_mol.runlog import setup_logging
    from flowmol_ext import signals
    from flowmol_ext.malloc import keep_freed_memory

    setup_logging(args.log_level)
    keep_freed_memory()  # freed tensor memory stays in the heap: no page faults per network call (FDC_MOL_MALLOC)
    previous = signals.install()
    prog = f"fdc-mol {args.command}"
    try:
        return int(args._run(args) or 0)
    except signals.Interrupted as err:
        print(f"{prog}: stopped by {err.name} (exit {err.exit_code}); the run directory keeps the last saved "
              "checkpoint, resume from it", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (SIGINT, exit 130); the run directory keeps the last saved checkpoint",
              file=sys.stderr)
        return 130
    except SystemExit as err:
        if type(err).__name__ == "SIGTERMException":  # Lightning's SIGTERM exit carries no code (would be 0)
            print(f"{prog}: stopped by SIGTERM (exit 143); the run directory keeps the last saved checkpoint",
                  file=sys.stderr)
            return 143
        raise
    except (ValueError, FileNotFoundError) as err:
        # Input errors carry a precise message (bad key, file, record); no traceback for users.
        print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # write errors (full disk, permissions), unreadable files
        print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - one line for users; the traceback with --log-level DEBUG
        if args.log_level == "DEBUG":
            import traceback

            traceback.print_exc()
        print(f"{prog}: error: {type(err).__name__}: {_one_line(err)} (run with --log-level DEBUG for the "
              "traceback)", file=sys.stderr)
        return 1
    finally:
        signals.restore(previous)


if __name__ == "__main__":
    sys.exit(main())
