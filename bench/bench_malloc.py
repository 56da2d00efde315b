"""Today's code as users ran it (glibc's default malloc) against the new code as the ``fdc-mol`` CLI runs it
(``flowmol_ext.malloc.keep_freed_memory``), in alternating child processes of one run.

The malloc settings are process-wide, so ``bench_model.py`` and ``bench_am_step.py`` cannot show them in their
in-process old/new interleaving. This runs the chosen benchmark ``--rounds`` times with ``--malloc default`` and
``--malloc tuned`` alternately (default first), reads each child's ``--json`` medians, and prints per row:

- today/new, default malloc: the code change alone (the benchmarks' own ratio);
- new default/new tuned: the malloc settings alone;
- today (default malloc) / new (tuned malloc): what a user of the CLI gains over today's code.

    OMP_NUM_THREADS=1 python bench/bench_malloc.py model --threads 1 --reps 3 --tasks train32,train128,sample100 \\
        --sample-steps 20
    OMP_NUM_THREADS=1 python bench/bench_malloc.py am_step --threads 1 --steps 100 --n-traj 32 --parts am
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = {"model": "bench_model.py", "am_step": "bench_am_step.py"}


def _rows(bench: str, data: dict) -> dict[str, tuple[float, float]]:
    """{row name: (today seconds, new seconds)} from one child's JSON."""
    if bench == "model":
        return {task: (r["today_s"], r["median_s"]) for task, r in data["results"].items() if "today_s" in r}
    return {f"{part} ({thr} thr)": (r["today_s"], r["new_s"]) for part, by_thr in data.items()
            for thr, r in by_thr.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench", choices=sorted(SCRIPTS))
    ap.add_argument("--rounds", type=int, default=2, help="default/tuned child pairs, alternating")
    args, rest = ap.parse_known_args()
    runs: dict[str, list[dict[str, tuple[float, float]]]] = {"default": [], "tuned": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            for mode in ("default", "tuned"):
                out = Path(tmp) / f"{mode}{rnd}.json"
                cmd = [sys.executable, str(HERE / SCRIPTS[args.bench]), *rest, "--malloc", mode, "--json", str(out)]
                print(f"# round {rnd}, malloc {mode}: {' '.join(cmd[1:])}", flush=True)
                subprocess.run(cmd, check=True, env=dict(os.environ))
                runs[mode].append(_rows(args.bench, json.loads(out.read_text())))
    names = list(runs["default"][0])

    def med(mode: str, name: str, i: int) -> float:
        return statistics.median(r[name][i] for r in runs[mode])

    print(f"\nmedians over {args.rounds} child process(es) per malloc mode (seconds)")
    print(f"{'row':34s} {'today dflt':>10s} {'new dflt':>9s} {'new tuned':>9s} {'today/new dflt':>14s} "
          f"{'new dflt/tuned':>14s} {'today dflt/new tuned':>20s}")
    for n in names:
        td, nd, nt = med("default", n, 0), med("default", n, 1), med("tuned", n, 1)
        print(f"{n:34s} {td:10.2f} {nd:9.2f} {nt:9.2f} {td / nd:13.2f}x {nd / nt:13.2f}x {td / nt:19.2f}x")


if __name__ == "__main__":
    main()
