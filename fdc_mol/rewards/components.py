"""Composable reward components (REINVENT4-style scoring components, transforms and an aggregator).

A finetune config's ``reward.components`` lists components; each computes one raw property per molecule in its
own units, optionally transforms it, and plays one role:

- ``objective`` (default): enters the aggregated reward r. Needs a position gradient.
- ``constraint``: not aggregated; exposed as a named column with its gradient for the log-barrier utility
  (:class:`fdc_mol.fdc.utilities.LogBarrier`, ``utility.kind: log_barrier``). Needs a position gradient.
- ``gate``: a molecule whose value lies outside the step transform's [low, high] fails (NaN, with the reason).
- ``weight``: multiplies r by the (transformed) value, which is held constant in the gradient (∇r is
  multiplied by the same factor; the weight's own derivative is not used).

Components without a position gradient (``qed``, plugins with ``has_gradient: false``) are allowed only as gates
or weights; the schema rejects them in the other roles with a one-line message, so no term silently contributes
a zero gradient. A ``step`` transform has zero derivative almost everywhere and is rejected for the same reason.

Score of component j: s_j = d_j · T_j(v_j), with v_j the raw value, T_j the transform (identity when absent) and
d_j = +1 (maximize) or −1 (minimize). Aggregation over objective components with weights w_j (W = Σ w_j):
``sum`` r = Σ w_j s_j / W; ``product`` (weighted geometric mean) r = Π s_j^(w_j/W), defined only for s_j > 0.
A component that fails on a molecule gives that molecule NaN with ``"<name>: <reason>"``, never 0.

Kinds and units (gradients in units per Å):

==============================  =====  =====================================================================
kind                            units  value
==============================  =====  =====================================================================
xtb_energy                      Eh     total GFN1/GFN2-xTB energy E (tblite, the reward pool and cache)
composition_corrected_energy    Eh     E − Σ_el n_el ε_el (:mod:`fdc_mol.rewards.composition`)
strain                          Eh     E − E(relaxed) (tblite + L-BFGS-B relaxation; gradient ∇E, see below)
gap                             eV     HOMO–LUMO gap (dxtb, autograd through the SCF)
dipole                          D      point-charge dipole moment of the GFN charges (dxtb)
mmff_energy                     Eh     MMFF94 energy (RDKit)
qed                             1      RDKit QED drug-likeness (no gradient: gate or weight only)
plugin                          any    a user function ``module:function`` or ``entry-point:NAME`` (docs/plugins.md)
==============================  =====  =====================================================================

Strain: E(relaxed) is the energy of the local minimum reached from x, constant while x stays in the same
basin, so ∇strain = ∇E (exact for a converged relaxation; one relaxation costs up to ``relax_max_steps``
single points per molecule, so strain is the expensive component).

Evaluation: energy components run through :class:`~fdc_mol.rewards.reward.EnergyReward` (executor, cache,
watchdog); dxtb, QED and plugin components run serially in the calling process (dxtb ≈ 0.1–0.2 s per QM9-size
molecule with its gradient).
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from fdc_mol.rewards.base import RewardResult, RewardSettings, spec_from_molecule
from flowmol_ext.config import StrictModel

__all__ = [
    "GRADIENT_KINDS",
    "KIND_UNITS",
    "ComponentConfig",
    "ComponentResult",
    "ComponentReward",
    "ComponentValues",
    "TransformConfig",
    "aggregate",
    "apply_transform",
    "ENTRY_POINT_GROUP",
    "load_plugin",
]

log = logging.getLogger(__name__)

Kind = Literal["xtb_energy", "composition_corrected_energy", "strain", "gap", "dipole", "mmff_energy", "qed"]
KIND_UNITS: dict[str, str] = {"xtb_energy": "Eh", "composition_corrected_energy": "Eh", "strain": "Eh", "gap": "eV",
                              "dipole": "D", "mmff_energy": "Eh", "qed": "1"}
GRADIENT_KINDS = frozenset(KIND_UNITS) - {"qed"}
_ENERGY_KINDS = {"xtb_energy", "composition_corrected_energy", "strain", "mmff_energy"}
_DXTB_KINDS = {"gap", "dipole"}


class TransformConfig(StrictModel):
    """A REINVENT4-style transform of a raw value v (``low``/``high`` in the component's units).

    sigmoid: 1 / (1 + 10^(10k (v − m)/(low − high))), m = (low + high)/2 (rises from 0 at low to 1 at high);
    reverse_sigmoid: 1 − sigmoid; step: 1 on [low, high], else 0 (gates and weights only); clip: min(max(v, low),
    high).
    """

    kind: Literal["sigmoid", "reverse_sigmoid", "step", "clip"]
    low: float
    high: float
    k: float = Field(0.5, gt=0.0, description="sigmoid steepness (REINVENT4's k)")

    @model_validator(mode="after")
    def _check(self) -> TransformConfig:
        if not self.low < self.high:
            raise ValueError(f"transform {self.kind}: low ({self.low:g}) must be < high ({self.high:g})")
        return self


class ComponentConfig(StrictModel):
    """One reward component (see the module docstring). Give ``kind`` or ``plugin``, not both."""

    name: str | None = Field(None, description="column name (default: kind, or the plugin's function name)")
    kind: Kind | None = None
    plugin: str | None = Field(None, description="'module.path:function' of a user component, or 'entry-point:NAME' "
                               "(group fdc_mol.reward_components); docs/plugins.md")
    params: dict[str, Any] = Field(default_factory=dict, description="keyword arguments passed to the plugin")
    has_gradient: bool = Field(True, description="plugins: whether the function returns position gradients")
    units: str | None = Field(None, description="plugins: units of the value (default '1')")
    role: Literal["objective", "constraint", "gate", "weight"] = "objective"
    direction: Literal["maximize", "minimize"] = "maximize"
    transform: TransformConfig | None = None
    weight: float = Field(1.0, gt=0.0, description="aggregation weight (objective components)")
    level: Literal["gfn1", "gfn2"] | None = Field(None, description="xTB level (default: reward.level)")

    @model_validator(mode="after")
    def _check(self) -> ComponentConfig:
        if (self.kind is None) == (self.plugin is None):
            raise ValueError("a component needs exactly one of 'kind' or 'plugin'")
        if self.plugin is not None and ":" not in self.plugin:
            raise ValueError(f"plugin '{self.plugin}': expected 'module.path:function'")
        if self.kind is not None and (self.params or self.units is not None):
            raise ValueError(f"component '{self.label}': 'params' and 'units' are for plugins only")
        if self.role in ("objective", "constraint"):
            if not self.differentiable:
                raise ValueError(
                    f"component '{self.label}' has no position gradient, so it cannot be a gradient-carrying "
                    f"'{self.role}' term: use role 'gate' or 'weight'")
            if self.transform is not None and self.transform.kind == "step":
                raise ValueError(f"component '{self.label}': a step transform has zero gradient almost everywhere; "
                                 f"use it with role 'gate' or 'weight', or use sigmoid/clip for role '{self.role}'")
        if self.role == "gate" and (self.transform is None or self.transform.kind != "step"):
            raise ValueError(f"gate component '{self.label}' needs transform {{kind: step, low, high}}: the range "
                             "in which a molecule passes")
        return self

    @property
    def label(self) -> str:
        """The component's column name."""
        if self.name:
            return self.name
        return self.kind if self.kind is not None else str(self.plugin).rsplit(":", 1)[-1]

    @property
    def differentiable(self) -> bool:
        """Whether the component supplies a position gradient."""
        return self.kind in GRADIENT_KINDS if self.kind is not None else self.has_gradient

    @property
    def unit(self) -> str:
        return KIND_UNITS[self.kind] if self.kind is not None else (self.units or "1")


# -- transforms and aggregation --------------------------------------------------------------------------------
def apply_transform(t: TransformConfig | None, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Transformed values T(v) and derivatives dT/dv, both like ``v`` (NaN stays NaN)."""
    v = np.asarray(v, np.float64)
    if t is None:
        return v.copy(), np.ones_like(v)
    if t.kind in ("sigmoid", "reverse_sigmoid"):
        a = 10.0 * t.k / (t.low - t.high)
        m = 0.5 * (t.low + t.high)
        with np.errstate(over="ignore", invalid="ignore"):
            s = 1.0 / (1.0 + np.power(10.0, a * (v - m)))
        ds = -s * (1.0 - s) * a * math.log(10.0)
        return (s, ds) if t.kind == "sigmoid" else (1.0 - s, -ds)
    if t.kind == "step":
        inside = (v >= t.low) & (v <= t.high)
        out = np.where(np.isfinite(v), inside.astype(np.float64), np.nan)
        return out, np.where(np.isfinite(v), 0.0, np.nan)
    inside = (v > t.low) & (v < t.high)
    return np.clip(v, t.low, t.high), np.where(np.isfinite(v), inside.astype(np.float64), np.nan)


def aggregate(scores: np.ndarray, weights: np.ndarray, how: Literal["sum", "product"]) -> tuple[np.ndarray,
                                                                                            np.ndarray, list[str]]:
    """Aggregate objective scores (B, J) with weights (J,): r (B,), dr/ds (B, J) and a reason per molecule.

    sum: r = Σ w_j s_j / W; product: r = Π s_j^(w_j/W) (needs s_j > 0). NaN scores give NaN with a reason.
    """
    s = np.asarray(scores, np.float64)
    w = np.asarray(weights, np.float64) / float(np.sum(weights))
    reasons = [""] * s.shape[0]
    if how == "sum":
        r = s @ w
        dr = np.broadcast_to(w, s.shape).copy()
    else:
        bad = np.isfinite(s) & (s <= 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.where(bad, np.nan, np.log(np.where(s > 0, s, 1.0)))
            logs = np.where(np.isfinite(s), logs, np.nan)
            r = np.exp(logs @ w)
            dr = r[:, None] * w[None, :] / s
        for i in np.flatnonzero(bad.any(1)):
            reasons[i] = "product aggregation needs positive scores (use a sigmoid transform)"
    r = np.where(np.isfinite(s).all(1), r, np.nan)
    return r, dr, reasons


# -- plugins ---------------------------------------------------------------------------------------------------
@dataclass
class ComponentValues:
    """What a component (built-in or plugin) returns for B molecules.

    ``value`` (B,) float64 in the component's units, NaN for failures; ``grad`` per molecule (n_i, 3) float64
    d(value)/dx per Å (None for a failure), or None for the whole batch when not requested or not available;
    ``reason`` per molecule ("" when fine; a failure without a reason gets a generic one).
    """

    value: np.ndarray
    grad: list[np.ndarray | None] | None = None
    reason: list[str] | None = None
    energy: np.ndarray | None = None  # energy components: the total energy E (B,) in Eh behind the value


ENTRY_POINT_GROUP = "fdc_mol.reward_components"
ENTRY_POINT_PREFIX = "entry-point"  # not a valid module name, so 'entry-point:NAME' cannot be a module path


def load_plugin(path: str) -> Callable[..., Any]:
    """Import ``'module.path:function'``, or load ``'entry-point:NAME'`` from the installed packages' entry points of
    group ``fdc_mol.reward_components``; raise ValueError with one line naming the plugin on any problem."""
    if path.startswith(ENTRY_POINT_PREFIX + ":"):
        from importlib.metadata import entry_points

        name = path.split(":", 1)[1]
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not found:
            have = sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
            raise ValueError(f"plugin '{path}': no entry point '{name}' in group '{ENTRY_POINT_GROUP}' "
                             f"(installed: {', '.join(have) or 'none'})")
        try:
            fn = found[0].load()
        except Exception as err:  # noqa: BLE001 - any import problem, one line
            raise ValueError(f"plugin '{path}': entry point '{found[0].value}' cannot be loaded "
                             f"({_first_line(err)})") from None
        if not callable(fn):
            raise ValueError(f"plugin '{path}': entry point '{found[0].value}' is not callable")
        return fn
    mod_name, _, fn_name = path.partition(":")
    if not mod_name or not fn_name:
        raise ValueError(f"plugin '{path}': expected 'module.path:function'")
    try:
        mod = importlib.import_module(mod_name)
    except Exception as err:  # noqa: BLE001 - any import problem, one line
        raise ValueError(f"plugin '{path}': cannot import module '{mod_name}' ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from None
    fn = getattr(mod, fn_name, None)
    if fn is None or not callable(fn):
        raise ValueError(f"plugin '{path}': module '{mod_name}' has no callable '{fn_name}'")
    return fn


def _plugin_values(cfg: ComponentConfig, fn: Callable[..., Any], molecules: list[Any],
                   with_grad: bool) -> ComponentValues:
    """Call a plugin; an exception or malformed output gives NaN for every molecule with a one-line reason."""
    B = len(molecules)
    try:
        out = fn(molecules, with_grad=with_grad and cfg.has_gradient, **cfg.params)
        if isinstance(out, tuple):
            out = ComponentValues(*out)
        elif not isinstance(out, ComponentValues):
            out = ComponentValues(np.asarray(out, np.float64))
        value = np.asarray(out.value, np.float64).reshape(-1)
        if value.shape[0] != B:
            raise ValueError(f"returned {value.shape[0]} values for {B} molecules")
        grad = out.grad
        if with_grad and cfg.has_gradient:
            if grad is None or len(grad) != B:
                raise ValueError("has_gradient is true but it returned no gradient list of one entry per molecule")
            for m, g in zip(molecules, grad):
                if g is not None and np.shape(g) != (m.n_atoms, 3):
                    raise ValueError(f"returned a gradient of shape {np.shape(g)} for a molecule of {m.n_atoms} "
                                     "atoms")
        reason = list(out.reason) if out.reason is not None else [""] * B
        return ComponentValues(value, grad, reason)
    except Exception as err:  # noqa: BLE001 - a user function must not take the run down
        msg = f"plugin '{cfg.plugin}' raised {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        log.warning("reward component '%s': %s (its molecules get NaN)", cfg.label, msg)
        return ComponentValues(np.full(B, np.nan), None, [msg] * B)


# -- results ---------------------------------------------------------------------------------------------------
@dataclass
class ComponentResult(RewardResult):
    """A :class:`RewardResult` of an aggregated reward: ``value`` (B,) in the reward's units (not Hartree unless
    the objective is an energy); ``energy`` (B,) the total xTB energy E in Eh of the first xTB energy component
    (NaN when none); ``extras`` one column per component in its units (a constraint's column transformed);
    ``extra_grads`` {constraint name: gradients (n_i, 3) per Å of the constraint column, None for failures};
    ``units`` {column: units}."""

    extra_grads: dict[str, list[np.ndarray | None]] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)

    def sdf_props(self, i: int) -> dict[str, str]:
        """SD properties of molecule i: the reward, each component's value with its unit, the failure reason."""
        props = {"reward": repr(float(self.value[i])), "reward_method": self.method}
        if np.isfinite(self.energy[i]):
            props["energy_Eh"] = repr(float(self.energy[i]))
        for k, col in self.extras.items():
            u = self.units.get(k, "")
            props[f"{k}_{u}" if u and u != "1" else k] = repr(float(col[i]))
        if not self.ok[i]:
            props["reward_failure"] = self.reason[i]
        return props


# -- the reward ------------------------------------------------------------------------------------------------
def _first_line(err: BaseException) -> str:
    s = str(err).strip()
    return f"{type(err).__name__}: {s.splitlines()[0]}" if s else type(err).__name__


class ComponentReward:
    """The aggregated reward of ``reward.components`` (Reward protocol: ``__call__(molecules, with_grad)``).

    level / engine / executor / cache_dir / timeout_s: the reward section's settings for the xTB components;
    train_update: RewardSettings changes of the training gate (``for_training()``).
    """

    def __init__(self, components: Sequence[ComponentConfig], how: Literal["sum", "product"] = "sum",
                 level: str = "gfn1", engine: str | None = None, executor: Any = None, cache_dir: str | None = None,
                 timeout_s: float = 30.0, train_update: dict[str, Any] | None = None,
                 _parent: ComponentReward | None = None) -> None:
        from fdc_mol.rewards.reward import EnergyReward, make_reward

        self.components = list(components)
        names = [c.label for c in self.components]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"reward.components: duplicate component name(s) {dup}; set 'name'")
        if not any(c.role == "objective" for c in self.components):
            raise ValueError("reward.components: at least one component needs role 'objective'")
        self.how = how
        self.level = level
        self.train_update = dict(train_update or {})
        self.training = _parent is not None
        self.plugins = {c.label: load_plugin(c.plugin) for c in self.components if c.plugin is not None}
        self.gate_settings = RewardSettings(method=level if level != "mmff94" else "gfn1", timeout_s=timeout_s)
        if self.training:
            self.gate_settings = self.gate_settings.model_copy(update=self.train_update)
        # One EnergyReward per distinct setting (xtb_energy and composition_corrected_energy share one).
        self.energy_rewards: dict[str, Any] = {}
        shared_executor = executor
        for c in self.components:
            if c.kind not in _ENERGY_KINDS:
                continue
            key = self._energy_key(c)
            if key in self.energy_rewards:
                continue
            if _parent is not None:
                strict = _parent.energy_rewards[key]
                st = strict.settings.model_copy(update=self.train_update)
                self.energy_rewards[key] = EnergyReward(st, executor=strict.executor) if self.train_update \
                    else strict
                continue
            method = "mmff94" if c.kind == "mmff_energy" else (c.level or level)
            if method == "mmff94" and c.kind != "mmff_energy":
                raise ValueError(f"component '{c.label}': reward.level mmff94 is not an xTB level; set level: gfn1")
            extra = {"relax": "xtb"} if c.kind == "strain" else {}
            eng = None if method == "mmff94" else (engine if engine in ("tblite", "xtb") else None)
            rw = make_reward(method, engine=eng, executor=shared_executor, cache_dir=cache_dir, timeout_s=timeout_s,
                             **extra)
            self.energy_rewards[key] = rw
            if shared_executor is None or isinstance(shared_executor, str):
                shared_executor = rw.executor  # later energy rewards reuse this pool (not owned by them)
        self._refs: dict[str, np.ndarray] = {}
        self._train: ComponentReward | None = None
        self._parent = _parent

    @staticmethod
    def _energy_key(c: ComponentConfig) -> str:
        return f"{c.kind == 'strain'}|{'mmff94' if c.kind == 'mmff_energy' else (c.level or '')}"

    @property
    def method(self) -> str:
        parts = [f"{c.label}[{c.role}]" for c in self.components]
        return f"components {self.how}: " + ", ".join(parts)

    def for_training(self) -> ComponentReward:
        """The same reward with the training gate (bond-aware clash gate etc.) for energies, dxtb and QED."""
        if not self.train_update or self.training:
            return self
        if self._train is None:
            self._train = ComponentReward(self.components, self.how, self.level, train_update=self.train_update,
                                          timeout_s=self.gate_settings.timeout_s, _parent=self)
        return self._train

    def close(self) -> None:
        if self._parent is None:
            for rw in self.energy_rewards.values():
                rw.close()

    # -- raw values ------------------------------------------------------------------------------------------
    def _energy_values(self, c: ComponentConfig, molecules: list[Any], with_grad: bool,
                       cache: dict[str, RewardResult]) -> ComponentValues:
        key = self._energy_key(c)
        if key not in cache:
            cache[key] = self.energy_rewards[key](molecules, with_grad=with_grad)
        res = cache[key]
        e = np.asarray(res.energy, np.float64)
        grad = None
        if with_grad and res.grad is not None:
            grad = [None if g is None else -np.asarray(g) for g in res.grad]  # res.grad is d(−E)/dx
        if c.kind == "strain":
            e = np.asarray(res.extras.get("strain", np.full(len(molecules), np.nan)), np.float64)
        elif c.kind == "composition_corrected_energy":
            from fdc_mol.rewards.composition import _counts, load_element_references

            lvl = c.level or self.level
            if lvl not in self._refs:
                self._refs[lvl] = load_element_references(lvl)
            e = e - _counts(molecules) @ self._refs[lvl]
        return ComponentValues(e, grad, list(res.reason), energy=np.asarray(res.energy, np.float64))

    def _dxtb_values(self, molecules: list[Any], with_grad: bool, level: str,
                     names: tuple[str, ...]) -> dict[str, ComponentValues]:
        from fdc_mol.rewards.dxtb_props import xtb_properties
        from fdc_mol.rewards.gate import check_gate, spin_uhf

        B = len(molecules)
        vals = {k: np.full(B, np.nan) for k in names}
        grads: dict[str, list[np.ndarray | None]] = {k: [None] * B for k in names}
        reasons = [""] * B
        st = self.gate_settings.model_copy(update={"method": level})
        for i, m in enumerate(molecules):
            spec = spec_from_molecule(m)
            why = check_gate(spec, st)
            if why:
                reasons[i] = why
                continue
            uhf, _ = spin_uhf(spec, st)
            try:
                p = xtb_properties(spec.z, spec.x, spec.charge, uhf, method=level, names=names, with_grad=with_grad)
            except Exception as err:  # noqa: BLE001 - one molecule never takes the batch down
                reasons[i] = _first_line(err) if not isinstance(err, RuntimeError) else str(err)
                continue
            for k in names:
                vals[k][i] = p.values[k]
                if with_grad:
                    grads[k][i] = p.grads[k]
        return {k: ComponentValues(vals[k], grads[k] if with_grad else None, list(reasons)) for k in names}

    @staticmethod
    def _qed_values(molecules: list[Any]) -> ComponentValues:
        from rdkit import Chem, rdBase
        from rdkit.Chem import QED

        from fdc_mol.rewards.gate import spec_to_rdkit

        B = len(molecules)
        v, reasons = np.full(B, np.nan), [""] * B
        for i, m in enumerate(molecules):
            spec = spec_from_molecule(m)
            if spec.error:
                reasons[i] = spec.error
                continue
            try:
                with rdBase.BlockLogs():
                    mol = spec_to_rdkit(spec, sanitize=True)
                    v[i] = QED.qed(Chem.RemoveHs(mol))
            except Exception as err:  # noqa: BLE001
                reasons[i] = f"QED: RDKit failed: {_first_line(err)}"
        return ComponentValues(v, None, reasons)

    def raw_values(self, molecules: list[Any], with_grad: bool = True) -> dict[str, ComponentValues]:
        """Raw values (component units) and gradients (per Å) of every component, by component name."""
        out: dict[str, ComponentValues] = {}
        energy_cache: dict[str, RewardResult] = {}
        dxtb_levels: dict[str, list[str]] = {}
        for c in self.components:
            if c.kind in _DXTB_KINDS:
                dxtb_levels.setdefault(c.level or self.level, []).append(c.kind)
        dxtb: dict[str, dict[str, ComponentValues]] = {
            lvl: self._dxtb_values(molecules, with_grad, lvl if lvl != "mmff94" else "gfn1", tuple(sorted(set(ks))))
            for lvl, ks in dxtb_levels.items()}
        for c in self.components:
            need_grad = with_grad and c.differentiable and c.role in ("objective", "constraint")
            if c.kind in _ENERGY_KINDS:
                out[c.label] = self._energy_values(c, molecules, with_grad, energy_cache)
            elif c.kind in _DXTB_KINDS:
                out[c.label] = dxtb[c.level or self.level][c.kind]
            elif c.kind == "qed":
                out[c.label] = self._qed_values(molecules)
            else:
                out[c.label] = _plugin_values(c, self.plugins[c.label], molecules, need_grad)
        return out

    # -- the aggregated reward -------------------------------------------------------------------------------
    def __call__(self, molecules: list[Any], with_grad: bool = True) -> ComponentResult:
        """Aggregated rewards of ``molecules`` (see the module docstring); failures NaN with their reason."""
        B = len(molecules)
        raw = self.raw_values(molecules, with_grad)
        reasons = [""] * B

        def note(i: int, why: str) -> None:
            if not reasons[i]:
                reasons[i] = why

        for c in self.components:  # failures of any component, first one wins
            cv = raw[c.label]
            for i in np.flatnonzero(~np.isfinite(cv.value)):
                why = (cv.reason[i] if cv.reason is not None else "") or "no value"
                note(int(i), f"{c.label}: {why}")
        objective = [c for c in self.components if c.role == "objective"]
        scores, dscores = [], []
        for c in objective:
            t, dt = apply_transform(c.transform, raw[c.label].value)
            sign = 1.0 if c.direction == "maximize" else -1.0
            scores.append(sign * t)
            dscores.append(sign * dt)
        S = np.stack(scores, 1)
        r, dr, agg_reasons = aggregate(S, np.array([c.weight for c in objective]), self.how)
        for i, why in enumerate(agg_reasons):
            if why:
                note(i, why)
        factor = np.ones(B)
        for c in self.components:
            v = raw[c.label].value
            if c.role == "gate":
                lo, hi = c.transform.low, c.transform.high  # type: ignore[union-attr]
                for i in np.flatnonzero(np.isfinite(v) & ((v < lo) | (v > hi))):
                    note(int(i), f"gate {c.label}: {v[i]:.4g} {c.unit} outside [{lo:g}, {hi:g}]")
            elif c.role == "weight":
                t, _ = apply_transform(c.transform, v)
                t = t if c.direction == "maximize" else -t
                for i in np.flatnonzero(np.isfinite(t) & (t < 0)):
                    note(int(i), f"weight {c.label}: negative factor {t[i]:.4g}")
                factor = factor * t
        ok = np.array([not why for why in reasons], dtype=bool)
        value = np.where(ok, r * factor, np.nan)
        grad: list[np.ndarray | None] | None = None
        if with_grad:
            grad = []
            for i, m in enumerate(molecules):
                if not ok[i]:
                    grad.append(None)
                    continue
                g = np.zeros((m.n_atoms, 3))
                for j, c in enumerate(objective):
                    gj = raw[c.label].grad[i] if raw[c.label].grad is not None else None
                    if gj is None:
                        g = None
                        note(i, f"{c.label}: no gradient returned")
                        break
                    g = g + dr[i, j] * dscores[j][i] * np.asarray(gj, np.float64)
                grad.append(None if g is None else factor[i] * g)
            ok = np.array([not why for why in reasons], dtype=bool)
            value = np.where(ok, value, np.nan)
        extras: dict[str, np.ndarray] = {c.label: np.asarray(raw[c.label].value, np.float64) for c in self.components}
        extra_grads: dict[str, list[np.ndarray | None]] = {}
        for c in self.components:
            if c.role != "constraint":
                continue
            t, dt = apply_transform(c.transform, raw[c.label].value)
            extras[c.label] = t
            if with_grad:
                gl = raw[c.label].grad or [None] * B
                extra_grads[c.label] = [None if (g is None or not ok[i]) else dt[i] * np.asarray(g, np.float64)
                                        for i, g in enumerate(gl)]
        energy = np.full(B, np.nan)
        for c in self.components:
            if c.kind in ("xtb_energy", "composition_corrected_energy", "strain") and raw[c.label].energy is not None:
                energy = np.asarray(raw[c.label].energy, np.float64).copy()
                break
        return ComponentResult(
            value=value, energy=energy, grad=grad, ok=ok, reason=reasons, method=self.method, extras=extras,
            extra_grads=extra_grads, units={c.label: c.unit for c in self.components})
