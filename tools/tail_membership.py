"""Who carries each method's training signal? The SQ tail and the bulk of a fit-like sample, under both gates.

Draws n molecules of the config's model with the process AM trains on (memoryless SDE, ``am.steps`` steps), scores
them with the training reward (its bond-aware gate: 0.75 x covalent radii, fragments and open shells scored) and
with the strict evaluation reward, and splits the molecules scored in training into the SQ tail (r >= q_β, the
molecules FDC's first variation sees) and the bulk (the rest, which plain AM also sees). For each group it prints
how many pass the strict gate, why the others fail it, the mean training reward (Eh), the mean size and the
element fractions [C, H, N, O, F].

    python tools/tail_membership.py -c fdc_demo_cpu -n 192 --seed 0

One core, a few minutes for n = 192 (sampling and two xTB passes without gradients).
"""

from __future__ import annotations

import argparse
import collections
import json

import numpy as np
import torch


def membership(config: str, n: int, seed: int) -> dict[str, dict]:
    """Per group (tail, bulk, unscored): size, strict-pass fraction, strict failure reasons, mean training reward
    (Eh), mean atom count and element fractions. The sample uses generator seed 1000 + seed."""
    from fdc_mol.commands.finetune import load_finetune_config
    from fdc_mol.molecular.job import FinetuneJob, element_counts
    from fdc_mol.molecular.reward_oracle import molecules_of

    cfg = load_finetune_config(config, run_dir="runs/tail_membership", seed=seed)
    cfg = cfg.model_copy(update={"reward": cfg.reward.model_copy(update={"executor": "local:1"})})
    job = FinetuneJob(cfg)
    traj = job.flow.sample(n, cfg.am.steps, memoryless=True, record=False,
                           generator=torch.Generator().manual_seed(1000 + seed))
    mols = molecules_of(traj)
    r_train = np.asarray(job.train_reward(mols, with_grad=False).value, dtype=float)
    strict = job.reward(mols, with_grad=False)
    r_strict = np.asarray(strict.value, dtype=float)
    scored = np.isfinite(r_train)
    q = float(np.quantile(r_train[scored], cfg.utility.beta))
    groups = {"tail": scored & (r_train >= q), "bulk": scored & (r_train < q), "unscored": ~scored}
    counts = element_counts(mols)
    n_atoms = np.array([m.n_atoms for m in mols])
    out: dict[str, dict] = {"_": {"n": n, "seed": seed, "q_beta": q, "beta": cfg.utility.beta,
                                  "scored_train": int(scored.sum()), "scored_strict": int(np.isfinite(r_strict).sum())}}
    for name, m in groups.items():
        idx = np.where(m)[0]
        reasons = collections.Counter((strict.reason[i] or "ok").split(":")[0] for i in idx)
        out[name] = {
            "n": int(m.sum()), "strict_pass": float(np.isfinite(r_strict[m]).mean()) if m.any() else float("nan"),
            "strict_reasons": dict(reasons.most_common()),
            "mean_r_train": float(np.mean(r_train[m])) if name != "unscored" and m.any() else float("nan"),
            "mean_atoms": float(n_atoms[m].mean()) if m.any() else float("nan"),
            "element_fractions": np.round(counts[m].sum(0) / max(counts[m].sum(), 1), 3).tolist(),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-c", "--config", default="fdc_demo_cpu")
    ap.add_argument("-n", type=int, default=192)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    res = membership(args.config, args.n, args.seed)
    head = res.pop("_")
    print(f"{args.config}, n = {head['n']}, seed {head['seed']}: {head['scored_train']} scored with the training "
          f"gate, {head['scored_strict']} with the strict gate; q_β (β = {head['beta']}) = {head['q_beta']:.4f} Eh")
    for name, g in res.items():
        print(f"{name:8s} n = {g['n']:3d}  strict pass {g['strict_pass']:.2f}  mean r_train {g['mean_r_train']:.4f} Eh"
              f"  atoms {g['mean_atoms']:.1f}  [C,H,N,O,F] {g['element_fractions']}")
        print(f"         strict gate: {json.dumps(g['strict_reasons'])}")


if __name__ == "__main__":
    main()
