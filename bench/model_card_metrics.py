"""Metrics of the model card: stability, validity, uniqueness, novelty and mean GFN2-xTB energy per atom.

Either samples fresh molecules from a model (``--model qm9_small --n 1000 --steps 100``) or reads the
molecules of one record of a ``bench/sample_snapshots.py`` file (``--samples F --record model_last``).

    python bench/model_card_metrics.py --samples docs/snapshot_samples.pt --record model_last
    python bench/model_card_metrics.py --model qm9_small --n 1000 --steps 100
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from sample_snapshots import decode_molecules, load_records  # bench/ is on sys.path when run as a script

from fdc_mol.rewards import make_reward
from flowmol_ext.data.store import load_train_smiles
from flowmol_ext.metrics import evaluate_molecules


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", nargs="+", help="files of bench/sample_snapshots.py, pooled")
    ap.add_argument("--record", default="model_last")
    ap.add_argument("--model", default="qm9_small")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--data-dir", default="data/qm9")
    ap.add_argument("--executor", default="local:2")
    args = ap.parse_args()
    if args.samples:  # several files = several seeds / processes of the same snapshot, pooled
        rec = next((r for r in load_records(args.samples) if r["snapshot"] == args.record), None)
        if rec is None:
            raise SystemExit(f"no record {args.record!r} in {', '.join(args.samples)}")
        mols = decode_molecules(rec)
        origin = (f"{', '.join(args.samples)} [{args.record}, step {rec['global_step']}], "
                  f"{rec['steps']} steps on {rec['device']}")
    else:
        from flowmol_ext import load_pretrained
        from flowmol_ext.model.sampler import SamplerConfig, sample_molecules

        model = load_pretrained(args.model)
        mols = sample_molecules(model, args.n, SamplerConfig(steps=args.steps), seed=0)
        origin = f"{args.model}, {args.n} samples, {args.steps} steps, seed 0"
    met = evaluate_molecules(mols, train_smiles=load_train_smiles(args.data_dir), train_smiles_canonical=True)
    t0 = time.time()
    with make_reward("gfn2", executor=args.executor) as reward:
        res = reward(mols, with_grad=False)
    n_at = np.array([m.n_atoms for m in mols], dtype=float)
    ok = res.ok
    out = {k: met[k] for k in ("atom_stability", "molecule_stability", "validity", "validity_whole", "connectivity",
                               "uniqueness", "novelty", "mean_n_atoms")}
    out.update({
        "n": len(mols), "origin": origin,
        "gfn2_scored": int(ok.sum()), "gfn2_failed": int((~ok).sum()),
        "gfn2_mean_energy_per_atom_Eh": float((res.energy[ok] / n_at[ok]).mean()),
        "gfn2_mean_energy_Eh": float(res.energy[ok].mean()), "gfn2_seconds": time.time() - t0,
    })
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
