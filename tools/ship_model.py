"""Ship a trained model directory as a package model (``load_pretrained(NAME)``): config + weights only.

Appends one entry to the ``history`` list of the metadata (the previous shipped model's history is kept
when the run started from it), so the model directory says how it was trained. Refuses weights over 10 MB.

    python tools/ship_model.py runs/cpu_ema/model_last qm9_small \\
        --entry '{"config": "configs/flowmol_qm9_small.yaml", "init_from": "qm9_small", "hardware": "2-core CPU"}'
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flowmol_ext.pretrained import PRETRAINED_DIR, WEIGHTS_FILE, is_model_dir, load_model_dir, save_model_dir

MAX_BYTES = 10 * 1024 * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("name")
    ap.add_argument("--entry", default="{}", help="JSON object describing this training phase")
    ap.add_argument("--continues", action="store_true", help="the run started from the shipped NAME: keep its history")
    args = ap.parse_args()
    model = load_model_dir(args.model_dir)
    dest = PRETRAINED_DIR / args.name
    history = []
    if args.continues and is_model_dir(dest):
        prev = load_model_dir(dest).metadata
        history = list(prev.get("history") or [{"global_step": prev.get("global_step"),
                                                "wall_time_s": prev.get("wall_time_s")}])
    entry = {"global_step": model.metadata.get("global_step"), "wall_time_s": model.metadata.get("wall_time_s"),
             **json.loads(args.entry)}
    model.metadata["history"] = history + [entry]
    model.metadata["total_steps"] = sum(int(h.get("global_step") or 0) for h in model.metadata["history"])
    n_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if n_bytes > MAX_BYTES:  # checked before writing, so an oversized model never replaces the shipped one
        raise SystemExit(f"{args.model_dir} holds {n_bytes / 1e6:.1f} MB of weights, over the 10 MB limit")
    save_model_dir(model, dest)
    size = (dest / WEIGHTS_FILE).stat().st_size
    print(f"shipped {args.model_dir} as {args.name!r} in {dest} ({size / 1e6:.1f} MB)")
    print(json.dumps(model.metadata["history"], indent=1))


if __name__ == "__main__":
    main()
