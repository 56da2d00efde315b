"""FDC on molecules: the staged outer loop around the adjoint-matching LightningModule.

Stage k (k = 1..K) of a run directory:
1. sample ``n_fit`` molecules from π_{k−1} (memoryless SDE + CTMC), score them with the reward layer
   (r = −E, Hartree; invalid or failed molecules get NaN and are left out), and record iteration k−1:
   SDF, metrics row, reward histogram;
2. fit the utility's first variation at p_{k−1} (e.g. the quantile q̂_β of SQ_β) and, when enabled,
   a KDE over conformer descriptors for the novelty term −log p̂;
3. fine-tune π_k from π_{k−1} with :class:`AdjointMatchingModule` (terminal gradient ∇g_k/η_k);
4. write the stage's model directory and the metrics atomically (``stages/stage_K/``).
Each stage draws from its own seed (seed, k), so a run killed and resumed continues from the last
finished stage with the same numbers as an uninterrupted run.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor

from fdc_mol.config import FinetuneConfig
from flowmol_ext.io_utils import atomic_write_text
from flowmol_ext.model.sampler import SamplerConfig

from .am_module import AdjointMatchingModule
from .flow import Trajectory
from .flowmol_flow import FlowMolFlow, reward_oracle
from .utilities import CVaR, ExpectedReward, MeanVariance, SuperQuantile

log = logging.getLogger("fdc_mol.finetune")

METRIC_KEYS = ("iteration", "n", "mean_reward", "sq_beta", "q_beta", "mean_energy_per_atom", "validity",
               "reward_fail_rate", "molecule_stability", "atom_stability", "uniqueness", "novelty", "mean_n_atoms",
               "seconds")


def make_utility(cfg: FinetuneConfig) -> Any:
    u = cfg.utility
    if cfg.method == "am":
        return ExpectedReward()
    return {"superquantile": lambda: SuperQuantile(u.beta), "cvar": lambda: CVaR(u.beta),
            "expected": ExpectedReward, "mean_variance": MeanVariance}[u.kind]()


def superquantile(r: np.ndarray, beta: float) -> tuple[float, float]:
    """(SQ_β, q_β) of the finite rewards: the mean of the top (1−β) share (at least one sample)."""
    rf = np.sort(r[np.isfinite(r)])
    if rf.size == 0:
        return math.nan, math.nan
    q = float(np.quantile(rf, beta))
    top = rf[rf >= q]
    return float(top.mean()), q


class MolecularFDC:
    """Runs (or resumes) one fine-tuning job described by a :class:`FinetuneConfig`."""

    def __init__(self, cfg: FinetuneConfig, model: Any = None, reward: Any = None) -> None:
        from flowmol_ext import load_pretrained

        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        model = model if model is not None else load_pretrained(cfg.model, device=self.device)
        sc = cfg.sampler
        sampler = SamplerConfig(stochasticity=sc.stochasticity, temperature=sc.temperature, hc_thresh=sc.hc_thresh,
                                position_sampler="sde")
        self.flow = FlowMolFlow(model.to(self.device), sampler=sampler, n_atoms=cfg.n_atoms, trainable=cfg.trainable)
        self.utility = make_utility(cfg)
        if reward is None:
            from fdc_mol.rewards import make_reward

            rc = cfg.reward
            reward = make_reward(rc.method, engine=rc.engine, executor=rc.executor, cache_dir=rc.cache_dir,
                                 timeout_s=rc.timeout_s)
        self.reward = reward
        self.train_smiles = self._train_smiles()
        # One size draw per run (seeded by the run seed): every iteration, and every method run with the
        # same seed, is evaluated on the same molecule sizes (total energies are extensive).
        self.eval_sizes = self.flow.draw_sizes(cfg.n_fit, torch.Generator(device=self.device).manual_seed(cfg.seed))

    def _train_smiles(self) -> set[str] | None:
        if not self.cfg.data_dir:
            return None
        try:
            from flowmol_ext.data.store import load_train_smiles

            return load_train_smiles(self.cfg.data_dir)
        except (FileNotFoundError, ValueError) as err:
            log.warning("novelty not computed: %s", err)
            return None

    # -- bookkeeping ----------------------------------------------------------------------------------
    def stage_dir(self, k: int) -> Path:
        return self.run_dir / "stages" / f"stage_{k:03d}"

    def last_finished_stage(self) -> int:
        done = [int(p.parent.name.split("_")[1]) for p in (self.run_dir / "stages").glob("stage_*/stage_done.json")]
        return max(done, default=0)

    def _load_stage(self, k: int) -> list[dict[str, Any]]:
        from flowmol_ext.pretrained import load_model_dir

        loaded = load_model_dir(self.stage_dir(k) / "model", device=self.device)
        self.flow.model.load_state_dict(loaded.state_dict())
        self.flow._apply_trainable()
        return json.loads((self.stage_dir(k) / "stage_done.json").read_text())["metrics"]

    # -- one evaluation of the current model ----------------------------------------------------------
    def evaluate(self, iteration: int, seed: int) -> tuple[dict[str, Any], Trajectory, np.ndarray, Any]:
        """Sample n_fit molecules of the current model, score them, and compute the metrics row."""
        from flowmol_ext.metrics import evaluate_molecules

        t0 = time.time()
        gen = torch.Generator(device=self.device).manual_seed(seed)
        traj = self.flow.sample(self.cfg.n_fit, self.cfg.sample_steps, memoryless=True, record=False, generator=gen,
                                sizes=self.eval_sizes)
        mols = FlowMolFlow.molecules(traj)
        res = self.reward(mols, with_grad=False)
        r = np.asarray(res.value, dtype=np.float64)
        met = evaluate_molecules(mols, train_smiles=self.train_smiles, train_smiles_canonical=True)
        beta = self.cfg.utility.beta
        sq, q = superquantile(r, beta)
        n_at = np.array([m.n_atoms for m in mols], dtype=np.float64)
        ok = np.isfinite(r)
        row = {
            "iteration": iteration, "n": len(mols),
            "mean_reward": float(r[ok].mean()) if ok.any() else math.nan, "sq_beta": sq, "q_beta": q,
            "mean_energy_per_atom": float((-r[ok] / n_at[ok]).mean()) if ok.any() else math.nan,
            "validity": met["validity"], "reward_fail_rate": float(1 - ok.mean()),
            "molecule_stability": met["molecule_stability"], "atom_stability": met["atom_stability"],
            "uniqueness": met["uniqueness"], "novelty": met.get("novelty", math.nan),
            "mean_n_atoms": met["mean_n_atoms"], "seconds": time.time() - t0,
        }
        if self.cfg.write_sdf:
            from fdc_mol.io import write_sdf

            props = []
            for i in range(len(mols)):
                p = {"iteration": iteration, "reward_Eh": float(r[i]), **res.sdf_props(i)}
                props.append(p)
            write_sdf(self.run_dir / "samples" / f"iteration_{iteration:03d}.sdf", mols, props)
        from flowmol_ext.io_utils import atomic_write

        atomic_write(self.run_dir / "samples" / f"rewards_{iteration:03d}.npy", lambda p: np.save(open(p, "wb"), r))
        return row, traj, r, mols

    # -- the terminal gradient of stage k -------------------------------------------------------------
    def terminal_grad_fn(self, r: np.ndarray, traj: Trajectory, eta: float) -> tuple[Any, float, dict[str, float]]:
        util = self.utility
        rt = torch.as_tensor(r, dtype=torch.float32)
        rf = rt[torch.isfinite(rt)]
        if rf.numel() < 2:
            raise ValueError(f"fewer than 2 valid molecules among {rt.numel()} samples: cannot fit the utility")
        st = util.stats(rf)
        oracle = reward_oracle(self.reward)
        kde = None
        if self.cfg.novelty_kde_weight > 0:
            from .descriptors import MoleculeKDE

            final = traj.context["final"]
            kde = MoleculeKDE().fit(traj.x1, final.a, final.node_graph, traj.n)
        w_kde = self.cfg.novelty_kde_weight
        scale = 1.0 / self.cfg.alpha if self.cfg.method == "am" else 1.0 / eta

        def grad(x: Tensor, tr: Trajectory) -> Tensor:
            rx, gx = oracle(x, tr)
            g = util.first_variation_grad(x, rx, gx, st, tr)
            if kde is not None:
                fin = tr.context["final"]
                g = g - w_kde * kde.grad_log_prob(x, fin.a, fin.node_graph, tr.n)
            return self.flow.project(g * scale, tr)

        lam = util.grad_scale * scale
        return grad, lam, st

    # -- the run ----------------------------------------------------------------------------------------
    def run(self, stop_after: int | None = None) -> list[dict[str, Any]]:
        """Run stages after the last finished one; returns all metrics rows (iterations 0..K)."""
        cfg = self.cfg
        (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
        start = self.last_finished_stage()
        rows: list[dict[str, Any]] = self._load_stage(start) if start > 0 else []
        if start > 0:
            log.info("resuming %s after finished stage %d", self.run_dir, start)
        for k in range(start + 1, cfg.K + 1):
            eta = cfg.eta * (k if cfg.eta_schedule == "harmonic" else 1)
            row, traj, r, _ = self.evaluate(k - 1, seed=cfg.seed * 1000 + k)
            rows = [x for x in rows if x["iteration"] != k - 1] + [row]
            self._write_metrics(rows)
            log.info("iteration %d: %s", k - 1, _fmt(row))
            grad, lam, st = self.terminal_grad_fn(r, traj, eta)
            base = self.flow.copy_frozen()
            module = AdjointMatchingModule(self.flow, base, grad, cfg.am, cfg.lr, lam, seed=cfg.seed * 1000 + k)
            trainer = pl.Trainer(
                max_steps=cfg.am_steps_per_iteration, accelerator="gpu" if self.device.type == "cuda" else "cpu",
                devices=1, logger=pl.loggers.CSVLogger(str(self.stage_dir(k)), name="logs", version=""),
                enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                gradient_clip_val=cfg.am.grad_clip_norm, gradient_clip_algorithm="norm", log_every_n_steps=1,
                enable_progress_bar=True,
            )
            trainer.fit(module)
            self._finish_stage(k, rows, {"eta": eta, "lambda": lam, **{f"fit_{a}": b for a, b in st.items()}})
            if stop_after is not None and k >= stop_after:
                return rows
        if not rows or rows[-1]["iteration"] != cfg.K:
            row, *_ = self.evaluate(cfg.K, seed=cfg.seed * 1000 + cfg.K + 1)
            rows.append(row)
            self._write_metrics(rows)
            log.info("iteration %d: %s", cfg.K, _fmt(row))
            from flowmol_ext.pretrained import save_model_dir

            save_model_dir(self.flow.model, self.run_dir / "model", extra={
                "finetuned_by": f"fdc-mol finetune ({cfg.method})",
                "n_atoms_hist": (self.flow.model.metadata or {}).get("n_atoms_hist")})
        return rows

    def _finish_stage(self, k: int, rows: list[dict[str, Any]], info: dict[str, float]) -> None:
        from flowmol_ext.pretrained import save_model_dir

        sd = self.stage_dir(k)
        save_model_dir(self.flow.model, sd / "model", extra={"fdc_stage": k, "n_atoms_hist":
                                                              (self.flow.model.metadata or {}).get("n_atoms_hist")})
        atomic_write_text(sd / "stage_done.json", json.dumps({"k": k, "info": info, "metrics": rows}, indent=1))

    def _write_metrics(self, rows: list[dict[str, Any]]) -> None:
        import io

        from fdc_mol.report import plot_run

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(METRIC_KEYS), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(self.run_dir / "metrics.csv", buf.getvalue())
        plot_run(self.run_dir, rows, self.cfg.utility.beta)


def _fmt(row: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
