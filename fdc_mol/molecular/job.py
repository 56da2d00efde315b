"""The finetune job: FlowMol flow + reward + objective + evaluation, run by THE FDC loop (:mod:`fdc_mol.fdc.loop`).

Run directory layout::

    config.yaml                      the resolved config
    metrics.csv, plots.png           one row per iteration (0 = pre-trained), intervals and paired differences
    samples/iteration_KKK.sdf        the primary sampler's molecules with their rewards (SD fields)
    samples/iteration_KKK_<s>.npz    per-molecule arrays per sampler s: rewards, graph keys, sizes, elements
    stages/stage_KKK/                state.pt (model + Adam state), model/ (loadable), logs/, stage_done.json
    model/                           the final model directory (load with flowmol_ext.load_pretrained)

Evaluation uses common random numbers: one size draw per run and one sampling seed for every iteration, so
iteration k and iteration 0 (and runs of other algorithms with the same seed) share sizes, initial noise and
CTMC uniforms; the paired difference r_k − r_0 is taken over molecules whose bond graph did not change.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fdc_mol.config import FinetuneConfig
from fdc_mol.fdc.divergences import Objective
from fdc_mol.fdc.flow import FlowModel, Trajectory
from fdc_mol.fdc.loop import FDCResult, StageStore, harmonic_eta, run_outer_loop, stage_seed
from fdc_mol.fdc.utilities import CVaR, ExpectedReward, FitContext, MeanVariance, SuperQuantile, weighted_quantile
from flowmol_ext import ATOM_TYPES
from flowmol_ext.io_utils import atomic_write

from .am_module import LightningAMSolver
from .descriptors import MoleculeKDE
from .flowmol_flow import FlowMolFlow
from .novelty import ConformerNovelty
from .reward_oracle import molecules_of, reward_oracle
from .statistics import bootstrap, cvar, paired_difference, superquantile

__all__ = ["FinetuneJob", "make_utility", "graph_keys", "METRIC_KEYS"]

log = logging.getLogger("fdc_mol.finetune")

METRIC_KEYS = ("iteration", "n", "mean_reward", "mean_reward_lo", "mean_reward_hi", "sq_beta", "sq_beta_lo",
               "sq_beta_hi", "q_beta", "cvar", "paired_delta", "paired_delta_lo", "paired_delta_hi", "n_paired",
               "fixed_graph_delta", "fixed_graph_delta_lo", "fixed_graph_delta_hi", "n_fixed_graph",
               "fixed_graph_kde_delta", "fixed_graph_kde_delta_lo", "fixed_graph_kde_delta_hi",
               "mean_energy_per_atom", "validity", "reward_fail_rate", "molecule_stability", "atom_stability",
               "uniqueness", "novelty", "composition_tv", "kde_logp_pre", "mean_n_atoms", "seconds")


def make_utility(cfg: FinetuneConfig) -> Any:
    """The utility of the config (ExpectedReward for plain AM)."""
    u = cfg.utility
    if cfg.algorithm == "am":
        return ExpectedReward()
    if u.kind == "log_barrier":
        from fdc_mol.fdc.utilities import LogBarrier

        b = u.barrier
        return LogBarrier(SuperQuantile(u.beta) if b.objective == "superquantile" else ExpectedReward(),
                          b.constraint, b.bound, beta=b.weight, sense=b.sense, min_slack=b.min_slack)
    return {"superquantile": lambda: SuperQuantile(u.beta), "cvar": lambda: CVaR(u.beta),
            "expected": ExpectedReward, "mean_variance": MeanVariance}[u.kind]()


def graph_keys(mols: list[Any]) -> np.ndarray:
    """One int64 key per molecule from its atom types, charges and bonds (equal keys = same graph)."""
    out = np.empty(len(mols), dtype=np.int64)
    for i, m in enumerate(mols):
        h = hashlib.blake2b(digest_size=8)
        for t in (m.a, m.c, m.bonds):
            h.update(np.ascontiguousarray(t.cpu().numpy().astype(np.int64)).tobytes())
            h.update(b"|")
        out[i] = np.frombuffer(h.digest(), dtype=np.int64)[0]
    return out


def element_counts(mols: list[Any]) -> np.ndarray:
    """(B, n_types) atom counts per element of ATOM_TYPES (a still-masked type counts nowhere)."""
    out = np.zeros((len(mols), len(ATOM_TYPES)), dtype=np.int64)
    for i, m in enumerate(mols):
        a = m.a.cpu().numpy()
        a = a[a < len(ATOM_TYPES)]
        out[i] = np.bincount(a, minlength=len(ATOM_TYPES))[: len(ATOM_TYPES)]
    return out


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """np.savez through a temporary file and rename (np.savez would append .npz to a temporary name)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    atomic_write(path, write)


class _JobStore(StageStore):
    """Stage store that also writes a loadable model directory per stage."""

    def __init__(self, run_dir: Path, flow: FlowMolFlow) -> None:
        super().__init__(run_dir)
        self.flow = flow

    def save(self, k: int, model: FlowModel, solver: Any, metrics: list[dict[str, Any]],
             info: dict[str, Any]) -> None:
        from flowmol_ext.pretrained import save_model_dir

        save_model_dir(self.flow.model, self.stage_dir(k) / "model", extra={
            "fdc_stage": k, "n_atoms_hist": (self.flow.model.metadata or {}).get("n_atoms_hist")})
        super().save(k, model, solver, metrics, info)


class FinetuneJob:
    """Runs (or resumes) one fine-tuning job described by a :class:`FinetuneConfig`.

    model / reward: override the config's (tests pass a tiny network and an analytic reward).
    """

    def __init__(self, cfg: FinetuneConfig, model: Any = None, reward: Any = None) -> None:
        from flowmol_ext import load_pretrained

        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        model = model if model is not None else load_pretrained(cfg.model, device=self.device)
        self.flow = FlowMolFlow(model.to(self.device), sampler=cfg.sampler, n_atoms=cfg.n_atoms,
                                trainable=cfg.trainable)
        if cfg.compile:  # the frozen base (a deepcopy) and every evaluation inherit the flag
            self.flow.model.set_compile(True)
        self.pre_state = {k: v.detach().clone() for k, v in self.flow.model.state_dict().items()}
        if reward is None:
            from fdc_mol.rewards import make_molecular_reward

            reward = make_molecular_reward(cfg.reward)
        self.reward = reward
        self.train_reward = getattr(reward, "for_training", lambda: reward)()
        self.oracle = reward_oracle(self.train_reward, grad_clip_per_atom=cfg.reward.grad_clip_per_atom)
        self.train_smiles = self._train_smiles()
        # One size draw and one sampling seed per run: common random numbers for every evaluation.
        self.n_eval = cfg.evaluation.n_molecules or cfg.n_fit
        self.eval_sizes = self.flow.draw_sizes(self.n_eval, torch.Generator(device=self.device).manual_seed(cfg.seed))
        self.eval_seed = stage_seed(cfg.seed, 10**6)
        self.reference: dict[str, dict[str, np.ndarray]] = {}
        self.kde_pre: MoleculeKDE | None = None
        self.ref_traj: Trajectory | None = None  # iteration 0's recorded ODE trajectory (fixed-graph comparison)
        self.ref_rewards: np.ndarray | None = None
        self.ref_kde_logp: np.ndarray | None = None  # leave-one-out log p̂_pre of iteration 0's conformers
        terms = ([(cfg.novelty_kde_weight, ConformerNovelty(n_components=cfg.novelty_kde_components))]
                 if cfg.novelty_kde_weight > 0 else [])
        self.objective = Objective(make_utility(cfg), terms=terms)

    def close(self) -> None:
        """Release the reward's workers (a reward without ``close`` holds none)."""
        close = getattr(self.reward, "close", None)
        if close:
            close()

    def __enter__(self) -> FinetuneJob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def final_flow(self, run_dir: Path) -> FlowMolFlow:
        """A frozen copy of this job's flow holding the final model of the run in ``run_dir`` (``run_dir/model``)."""
        from flowmol_ext.pretrained import load_model_dir

        flow = self.flow.copy_frozen()
        flow.model.load_state_dict(load_model_dir(Path(run_dir) / "model").state_dict())
        return flow
    def _train_smiles(self) -> set[str] | None:
        if not self.cfg.data_dir:
            return None
        try:
            from flowmol_ext.data.store import load_train_smiles

            return load_train_smiles(self.cfg.data_dir)
        except (FileNotFoundError, ValueError) as err:
            log.warning("novelty not computed: %s", err)
            return None

    # -- evaluation ----------------------------------------------------------------------------------
    def _arrays_path(self, k: int, sampler: str) -> Path:
        return self.run_dir / "samples" / f"iteration_{k:03d}_{sampler}.npz"

    def sample_evaluation(self, flow: FlowMolFlow, sampler: str, record: bool = False) -> Trajectory:
        """The evaluation sample of ``flow``: ``evaluation.n_molecules`` (default n_fit) molecules of the run's
        sizes and sampling seed (CRN)."""
        gen = torch.Generator(device=self.device).manual_seed(self.eval_seed)
        return flow.sample(self.n_eval, self.cfg.sample_steps, memoryless=sampler == "sde", record=record,
                           generator=gen, sizes=self.eval_sizes)

    def evaluate(self, flow: FlowModel, k: int) -> tuple[dict[str, Any], Any]:
        """Metrics of iteration k for every configured sampler; payload = (trajectory, rewards) of the primary."""
        from flowmol_ext.metrics import evaluate_molecules

        cfg = self.cfg
        row: dict[str, Any] = {}
        payload = None
        for si, sampler in enumerate(cfg.evaluation.samplers):
            t0 = time.time()
            traj = self.sample_evaluation(flow, sampler, record=k == 0 and si == 0 and sampler == "ode")
            mols = molecules_of(traj)
            res = self.reward(mols, with_grad=False)
            r = np.asarray(res.value, dtype=np.float64)
            keys, counts = graph_keys(mols), element_counts(mols)
            n_at = np.array([m.n_atoms for m in mols], dtype=np.float64)
            fixed: dict[str, Any] = {}
            if si == 0 and sampler == "ode":
                fixed = self._fixed_graph_delta(flow, traj, r, k)
            arrays = {"rewards": r, "graph_keys": keys, "element_counts": counts, "n_atoms": n_at}
            for name in ("fixed_graph_rewards", "fixed_graph_kde_logp"):  # per molecule, into the npz
                if name in fixed:
                    arrays[name] = fixed.pop(name)
            save_npz(self._arrays_path(k, sampler), **arrays)
            if k == 0 or sampler not in self.reference:
                ref_path = self._arrays_path(0, sampler)
                self.reference[sampler] = dict(np.load(ref_path)) if ref_path.is_file() else {}
            ref = self.reference[sampler]
            met = evaluate_molecules(mols, train_smiles=self.train_smiles, train_smiles_canonical=True)
            beta, seed = cfg.utility.beta, cfg.seed
            ok = np.isfinite(r)
            mean_ci = bootstrap(r, np.mean, cfg.evaluation.n_boot, seed=seed)
            sq_ci = bootstrap(r, lambda v, b=beta: superquantile(v, b), cfg.evaluation.n_boot, seed=seed)
            rf = r[ok]
            vals: dict[str, Any] = {
                "n": len(mols), "mean_reward": mean_ci.value, "mean_reward_lo": mean_ci.low,
                "mean_reward_hi": mean_ci.high, "sq_beta": sq_ci.value, "sq_beta_lo": sq_ci.low,
                "sq_beta_hi": sq_ci.high,
                "q_beta": float(weighted_quantile(torch.as_tensor(rf), beta)) if rf.size else math.nan,
                "cvar": cvar(r, 1.0 - beta),
                "mean_energy_per_atom": float((np.asarray(res.energy)[ok] / n_at[ok]).mean()) if ok.any() else
                math.nan,
                "validity": met["validity"], "reward_fail_rate": float(1 - ok.mean()),
                "molecule_stability": met["molecule_stability"], "atom_stability": met["atom_stability"],
                "uniqueness": met["uniqueness"], "novelty": met.get("novelty", math.nan),
                "mean_n_atoms": met["mean_n_atoms"],
            }
            if ref:
                same = ref["graph_keys"] == keys
                d = paired_difference(r, ref["rewards"], same, cfg.evaluation.n_boot, seed=seed)
                f0 = ref["element_counts"].sum(0) / max(ref["element_counts"].sum(), 1)
                fk = counts.sum(0) / max(counts.sum(), 1)
                vals.update({"paired_delta": d.value, "paired_delta_lo": d.low, "paired_delta_hi": d.high,
                             "n_paired": d.n, "graph_unchanged": float(same.mean()),
                             "composition_tv": float(0.5 * np.abs(fk - f0).sum())})
            vals.update(fixed)
            if si == 0:
                vals["kde_logp_pre"] = self._kde_logp_pre(traj, k)
                payload = (traj, torch.as_tensor(r, dtype=torch.float32))
                if cfg.write_sdf:
                    self._write_sdf(k, mols, r, res)
            vals["seconds"] = time.time() - t0
            prefix = "" if si == 0 else f"{sampler}_"
            row.update({f"{prefix}{a}": b for a, b in vals.items()})
        log.info("iteration %d: %s", k, ", ".join(f"{a}={b:.4g}" for a, b in row.items() if isinstance(b, float)))
        return row, payload

    def _fixed_graph_delta(self, flow: FlowMolFlow, traj: Trajectory, r: np.ndarray, k: int) -> dict[str, float]:
        """Paired Δr of the current model's geometry on iteration 0's molecules (same graphs, same start).

        Iteration 0's ODE trajectory is recorded once (types, charges, bonds at every step); for k > 0 the current
        model integrates positions along it (:meth:`FlowMolFlow.replay_positions`) and the same molecules are
        scored again. Keys: fixed_graph_delta (Eh, mean over molecules finite in both) with its 95 % interval,
        and fixed_graph_rewards (B,), the per-molecule rewards (saved in the iteration's npz, so that
        ``fdc-mol compare`` pairs the methods on the same molecules without sampling them again); likewise
        fixed_graph_kde_delta (nats) and the per-molecule fixed_graph_kde_logp (B,), see
        :meth:`_fixed_graph_kde_logp`."""
        if k == 0:
            self.ref_traj, self.ref_rewards = traj, r  # sampled with record=True at iteration 0
            self.kde_pre = self._fit_kde_pre(traj)  # the one fit of iteration 0 (_kde_logp_pre reuses it)
            self.ref_kde_logp = self._fixed_graph_kde_logp(traj.x1)
            out0: dict[str, Any] = {"fixed_graph_delta": 0.0, "fixed_graph_kde_delta": 0.0, "fixed_graph_rewards": r}
            if self.ref_kde_logp is not None:
                out0["fixed_graph_kde_logp"] = self.ref_kde_logp
            return out0
        if self.ref_traj is None:
            return {}
        x = flow.replay_positions(self.ref_traj)
        fixed_r = self.rewards_on(self.ref_traj, x=x)
        n_boot, seed = self.cfg.evaluation.n_boot, self.cfg.seed
        d = paired_difference(fixed_r, self.ref_rewards, None, n_boot, seed=seed)
        out: dict[str, Any] = {"fixed_graph_delta": d.value, "fixed_graph_delta_lo": d.low,
                               "fixed_graph_delta_hi": d.high, "n_fixed_graph": d.n, "fixed_graph_rewards": fixed_r}
        lp = self._fixed_graph_kde_logp(x)
        if self.ref_kde_logp is not None and lp is not None:
            dk = paired_difference(lp, self.ref_kde_logp, None, n_boot, seed=seed)
            out.update({"fixed_graph_kde_delta": dk.value, "fixed_graph_kde_delta_lo": dk.low,
                        "fixed_graph_kde_delta_hi": dk.high, "fixed_graph_kde_logp": lp})
        return out

    def _fixed_graph_kde_logp(self, x: Tensor) -> np.ndarray | None:
        """log p̂_pre (B,) nats of iteration 0's molecules with positions x (N, 3) Å, each molecule leaving out its
        own iteration-0 conformer (row i of the KDE's references), so that Δ = this − the iteration-0 value is
        the change in how typical each molecule's geometry is under the pre-trained model, on the same graphs
        (negative = more novel conformers). NaN for a molecule with non-finite positions."""
        ref = self.ref_traj
        if ref is None or self.kde_pre is None:
            return None
        final = ref.context["final"]
        with torch.no_grad():
            lp = self.kde_pre.log_prob(x, final.a, final.node_graph, ref.n, exclude_self=True)
        return lp.double().cpu().numpy()

    def rewards_on(self, ref: Trajectory, flow: FlowMolFlow | None = None, x: Tensor | None = None) -> np.ndarray:
        """Evaluation rewards (B,) of ref's molecules: with positions ``x`` (N, 3) Å, else with ``flow``'s geometry
        replayed along ref's recorded discrete states (:meth:`FlowMolFlow.replay_positions`), else with ref's own
        positions."""
        if x is None and flow is not None:
            x = flow.replay_positions(ref)
        return np.asarray(self.reward(molecules_of(ref, x), with_grad=False).value, np.float64)

    def _fit_kde_pre(self, traj: Trajectory) -> MoleculeKDE:
        """The KDE of iteration 0's conformer descriptors (π_pre, the run's CRN sample), as the novelty term's."""
        final = traj.context["final"]
        return MoleculeKDE(n_components=self.cfg.novelty_kde_components).fit(traj.x1, final.a, final.node_graph,
                                                                              traj.n)

    def _kde_logp_pre(self, traj: Trajectory, k: int) -> float:
        """Mean log p̂_pre of the conformer descriptors under a KDE fitted on iteration 0's samples (nats);
        lower = more novel conformers relative to the pre-trained model."""
        final = traj.context["final"]
        if k == 0 or self.kde_pre is None:
            if k != 0:
                return math.nan  # resumed without the iteration-0 sample in memory
            if self.kde_pre is None or self.ref_traj is not traj:  # not fitted on this sample by _fixed_graph_delta
                self.kde_pre = self._fit_kde_pre(traj)
            lp = self.kde_pre.log_prob(traj.x1, final.a, final.node_graph, traj.n, exclude_self=True)
        else:
            lp = self.kde_pre.log_prob(traj.x1, final.a, final.node_graph, traj.n)
        return float(lp.mean())

    def _write_sdf(self, k: int, mols: list[Any], r: np.ndarray, res: Any) -> None:
        from fdc_mol.io import write_sdf

        props = [{"iteration": k, "reward_Eh": float(r[i]), **res.sdf_props(i)} for i in range(len(mols))]
        write_sdf(self.run_dir / "samples" / f"iteration_{k:03d}.sdf", mols, props)

    def fit_context(self, base: FlowModel, pre: FlowModel, k: int, payload: Any) -> FitContext:
        """The fit sample at p_{k−1}: ``fit_sampler: am`` draws n_fit terminal states of the process AM trains
        (memoryless SDE on am.steps) and scores them with the training reward; ``evaluation`` reuses the
        primary evaluation sample of iteration k − 1 and its rewards."""
        columns = None
        if self.cfg.fit_sampler == "am":
            gen = torch.Generator(device=self.device).manual_seed(stage_seed(self.cfg.seed, k) + 2)
            traj = base.sample(self.cfg.n_fit, self.cfg.am.steps, memoryless=True, record=False, generator=gen)
            res = self.train_reward(molecules_of(traj), with_grad=False)
            r = torch.as_tensor(np.asarray(res.value, dtype=np.float64), dtype=torch.float32)
            log.info("fit sample of iteration %d (SDE, %d steps): %d of %d scored", k - 1, self.cfg.am.steps,
                     int(torch.isfinite(r).sum()), r.numel())
            payload = (traj, r)
            columns = {k: torch.as_tensor(np.asarray(v, np.float64)) for k, v in res.extras.items()}
        elif payload is None:
            _, payload = self.evaluate(base, k - 1)
        traj, r = payload
        if int(torch.isfinite(r).sum()) < 2:
            raise ValueError(f"iteration {k - 1}: fewer than 2 of {r.numel()} molecules have a finite reward; "
                             "cannot fit the utility (see the reasons in the iteration's SDF)")
        return FitContext(x=traj.x1, traj=traj, model=base, pre=pre, reward=self.oracle, rewards=r, columns=columns)

    # -- the run -------------------------------------------------------------------------------------
    def run(self, stop_after: int | None = None) -> list[dict[str, Any]]:
        """Run the stages after the last finished one; returns the metrics rows (iterations 0..K)."""
        cfg = self.cfg
        (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
        eta: Any = cfg.kl_weight if cfg.algorithm == "am" else (
            harmonic_eta(cfg.mirror_eta) if cfg.mirror_eta_schedule == "harmonic" else cfg.mirror_eta)
        solver = LightningAMSolver(cfg.am, cfg.lr, log_dir=self.run_dir / "stages",
                                   accelerator="gpu" if self.device.type == "cuda" else "cpu")
        store = _JobStore(self.run_dir, self.flow)
        if 0 < store.last_finished() < cfg.K:
            self._restore_kde_reference()
        res: FDCResult = run_outer_loop(
            self.flow, self.objective, K=cfg.K, eta=eta, solver=solver, steps_per_iter=cfg.am_steps_per_iteration,
            fit_context=self.fit_context, seed=cfg.seed, evaluate=self.evaluate, store=store, stop_after=stop_after)
        rows = res.metrics
        self._write_report(rows)
        if rows and rows[-1]["iteration"] == cfg.K:
            from flowmol_ext.pretrained import save_model_dir

            save_model_dir(self.flow.model, self.run_dir / "model", extra={
                "finetuned_by": f"fdc-mol finetune ({cfg.algorithm})",
                "n_atoms_hist": (self.flow.model.metadata or {}).get("n_atoms_hist")})
        return rows

    def _restore_kde_reference(self) -> None:
        """On resume, rebuild iteration 0's references from π_pre (the same CRN draws as before): the KDE of its
        conformers and its recorded ODE trajectory with rewards (for the fixed-graph comparison)."""
        pre = self.flow.copy_frozen()
        pre.model.load_state_dict(self.pre_state)
        primary = self.cfg.evaluation.samplers[0]
        traj = self.sample_evaluation(pre, primary, record=primary == "ode")
        self.kde_pre = self._fit_kde_pre(traj)
        if primary == "ode":
            self.ref_traj = traj
            self.ref_rewards = self.rewards_on(traj)
            self.ref_kde_logp = self._fixed_graph_kde_logp(traj.x1)

    def _write_report(self, rows: list[dict[str, Any]]) -> None:
        from fdc_mol.report import plot_run

        if rows:
            plot_run(self.run_dir, rows, self.cfg.utility.beta)
            from fdc_mol.report import write_html_report

            write_html_report(self.run_dir, rows, title=f"fdc-mol finetune: {self.run_dir.name}")
