"""Energy rewards: :class:`EnergyReward` and :func:`make_reward`.

``reward = sign * E`` with ``sign = -1`` by default (r = −E in Hartree, as in the FDC paper with
GFN1-xTB), gradient d(reward)/dx in Hartree/Å. Molecules are converted to plain numpy specs here,
looked up in the cache, sent in chunks to the executor, and reassembled in input order.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import Executor
from typing import Any

import numpy as np

from fdc_mol.rewards.base import (
    DEFAULT_ENGINE,
    MolSpec,
    RewardResult,
    RewardSettings,
    settings_key_json,
    spec_from_molecule,
)
from fdc_mol.rewards.parallel import LocalPool, make_executor, parse_executor_spec, run_chunks, shutdown_executor
from fdc_mol.rewards.worker import OneResult
from flowmol_ext.config import validate_config

__all__ = ["EnergyReward", "make_reward"]

log = logging.getLogger(__name__)

MAX_AUTO_CHUNK = 32


class EnergyReward:
    """Callable reward over lists of :class:`~flowmol_ext.batch.Molecule`.

    ``executor``: an ``Executor``, a spec string for :func:`make_executor`, or None for ``"local"``
    (a process pool created on first use). Executors built from strings are owned and closed by
    :meth:`close`; a broken owned local pool is rebuilt.
    """

    def __init__(self, settings: RewardSettings, executor: Executor | str | None = None) -> None:
        self.settings = settings
        self._spec = "local" if executor is None else executor if isinstance(executor, str) else None
        self._executor: Executor | None = None if isinstance(executor, str) or executor is None else executor
        if self._spec is not None:
            parse_executor_spec(self._spec)  # fail early on a bad spec
        self._owns = self._spec is not None
        self._key_json = settings_key_json(settings)
        self._cache = None
        if settings.cache_dir is not None:
            from fdc_mol.rewards.cache import EnergyCache

            self._cache = EnergyCache(settings.cache_dir)

    @property
    def method(self) -> str:
        return self.settings.label

    @property
    def executor(self) -> Executor:
        """The executor (created on first use for spec strings)."""
        if self._executor is None:
            self._executor = make_executor(self._spec)
        return self._executor

    def _n_workers(self) -> int:
        from fdc_mol.rewards.parallel import executor_workers

        return executor_workers(self.executor)

    def evaluate_specs(self, specs: list[MolSpec]) -> list[OneResult]:
        """Results for plain specs, in order (cache, then executor)."""
        out: list[OneResult | None] = [None] * len(specs)
        todo: dict[str, list[int]] = {}  # key -> indices (duplicates computed once)
        for i, sp in enumerate(specs):
            if sp.error:
                out[i] = OneResult(float("nan"), None, False, sp.error, {})
            else:
                key = sp.cache_key(self._key_json) if self._cache is not None else str(i)
                todo.setdefault(key, []).append(i)
        if self._cache is not None and todo:
            for key, res in self._cache.get_many(list(todo)).items():
                res = res._replace(extras={**res.extras, "cached": 1.0})
                for i in todo.pop(key):
                    out[i] = res
        if todo:
            executor = self.executor
            keys = list(todo)
            work = [specs[todo[k][0]] for k in keys]
            auto = math.ceil(len(work) / (4 * self._n_workers()))
            size = self.settings.chunk_size or max(1, min(MAX_AUTO_CHUNK, auto))
            chunks = [work[s:s + size] for s in range(0, len(work), size)]
            owned_pool = self._owns and isinstance(executor, LocalPool)
            rebuild = (lambda: make_executor(self._spec)) if owned_pool else None
            chunk_results, self._executor = run_chunks(executor, chunks, self.settings, rebuild)
            flat = [r for rs in chunk_results for r in rs]
            for key, res in zip(keys, flat):
                for i in todo[key]:
                    out[i] = res
            if self._cache is not None:
                try:
                    self._cache.put_many(list(zip(keys, flat)))
                except Exception as err:  # noqa: BLE001 - a cache problem must not lose results
                    log.warning("energy cache %s: write failed (%s); results not cached", self._cache.path, err)
        return [r if r is not None else OneResult(float("nan"), None, False, "internal error", {}) for r in out]

    def __call__(self, molecules: list[Any], with_grad: bool = True) -> RewardResult:
        """Rewards for ``molecules`` (list of Molecule), in input order; see :class:`RewardResult`."""
        specs = [spec_from_molecule(m) for m in molecules]
        res = self.evaluate_specs(specs)
        return self.assemble(res, with_grad)

    def assemble(self, res: list[OneResult], with_grad: bool = True) -> RewardResult:
        """Build a :class:`RewardResult` (value = sign * energy) from per-molecule results."""
        sign = float(self.settings.sign)
        energy = np.array([r.energy if r.ok else np.nan for r in res], dtype=np.float64)
        ok = np.array([r.ok for r in res], dtype=bool)
        grad = [sign * r.grad if (r.ok and r.grad is not None) else None for r in res] if with_grad else None
        extras: dict[str, np.ndarray] = {}
        names = sorted({k for r in res for k in r.extras} | ({"cached"} if self._cache is not None else set()))
        for k in names:
            fill = 0.0 if k == "cached" else np.nan
            extras[k] = np.array([float(r.extras.get(k, fill)) if r.ok or k == "cached" else fill for r in res])
        return RewardResult(
            value=sign * energy, energy=energy, grad=grad, ok=ok, reason=[r.reason for r in res],
            method=self.method, extras=extras,
        )

    def close(self) -> None:
        """Shut down an owned executor and close the cache."""
        if self._owns and self._executor is not None:
            shutdown_executor(self._executor)
            self._executor = None
        if self._cache is not None:
            self._cache.close()

    def __enter__(self) -> EnergyReward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            if self._owns and isinstance(self._executor, LocalPool):
                self._executor.shutdown(wait=False, cancel_futures=True)
        except Exception:  # noqa: BLE001
            pass


def make_reward(
    method: str = "gfn1",
    engine: str | None = None,
    executor: Executor | str | None = None,
    cache_dir: Any = None,
    **settings: Any,
) -> EnergyReward:
    """Energy reward for ``method`` ("gfn1" | "gfn2" | "mmff94") on ``engine`` ("tblite" | "xtb" | "rdkit").

    ``engine=None`` picks the method's default (tblite for xTB, rdkit for MMFF94). Further keyword
    settings are the fields of :class:`RewardSettings`; unknown keys raise ``ConfigError``.
    """
    data = {"method": method, "engine": engine or DEFAULT_ENGINE.get(method, "tblite"), **settings}
    if cache_dir is not None:
        data["cache_dir"] = str(cache_dir)
    return EnergyReward(validate_config(RewardSettings, data, source="make_reward(...)"), executor=executor)


class _TrainingGated:
    """An energy reward with a training gate: ``for_training()`` gives the same reward (same executor) with
    the bond-aware clash gate; calling it evaluates with the strict gate."""

    def __init__(self, strict: EnergyReward, train_scale: float | None, require_connected: bool = True,
                 allow_radicals: bool = False) -> None:
        self.strict = strict
        self.train_update: dict[str, Any] = {}
        if train_scale is not None:
            self.train_update["min_distance_scale"] = train_scale
        if not require_connected:
            self.train_update["require_connected"] = False
        if allow_radicals:
            self.train_update["allow_radicals"] = True
        self.settings = strict.settings
        self._train: EnergyReward | None = None

    @property
    def method(self) -> str:
        return self.strict.method

    def __call__(self, molecules: list[Any], with_grad: bool = True) -> RewardResult:
        return self.strict(molecules, with_grad=with_grad)

    def for_training(self) -> EnergyReward:
        if not self.train_update:
            return self.strict
        if self._train is None:
            st = self.strict.settings.model_copy(update=self.train_update)
            self._train = EnergyReward(st, executor=self.strict.executor)
        return self._train

    def close(self) -> None:
        self.strict.close()


def make_molecular_reward(cfg: Any) -> Any:
    """The reward of a finetune config's ``reward`` section (:class:`fdc_mol.config.RewardConfig`).

    Evaluation calls use the strict gate; ``.for_training()`` the bond-aware clash gate when
    ``train_min_distance_scale`` is set. kind ``composition_corrected`` wraps it in
    :class:`~fdc_mol.rewards.composition.CompositionCorrectedReward` (per-element references of ``level``).
    With ``components`` (and then without ``kind``) the reward is a
    :class:`~fdc_mol.rewards.components.ComponentReward` aggregating them.
    """
    if getattr(cfg, "components", None):
        from fdc_mol.rewards.components import ComponentReward

        train_update: dict[str, Any] = {}
        if cfg.train_min_distance_scale is not None:
            train_update["min_distance_scale"] = cfg.train_min_distance_scale
        if not cfg.train_require_connected:
            train_update["require_connected"] = False
        if cfg.train_allow_radicals:
            train_update["allow_radicals"] = True
        return ComponentReward(cfg.components, cfg.aggregate, level=cfg.level, engine=cfg.engine,
                               executor=cfg.executor, cache_dir=cfg.cache_dir, timeout_s=cfg.timeout_s,
                               train_update=train_update)
    base = make_reward(cfg.level, engine=cfg.engine, executor=cfg.executor, cache_dir=cfg.cache_dir,
                       timeout_s=cfg.timeout_s)
    reward: Any = _TrainingGated(base, cfg.train_min_distance_scale, cfg.train_require_connected,
                                 cfg.train_allow_radicals)
    if cfg.kind == "composition_corrected":
        from fdc_mol.rewards.composition import CompositionCorrectedReward, load_element_references

        reward = CompositionCorrectedReward(reward, load_element_references(cfg.level))
    return reward
