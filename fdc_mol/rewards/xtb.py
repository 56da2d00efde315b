"""GFN1/GFN2-xTB adapters: tblite (default) and xtb-python (libxtb 6.5.1; Python < 3.12 only).

Positions enter in Å and leave in Å; the engines work in Bohr, and the conversion happens only here.
Energies are in Hartree, gradients dE/dx in Hartree/Å. Engine failures raise :class:`EngineError`
with a readable reason.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from fdc_mol.rewards.base import ANGSTROM_PER_BOHR, HARTREE_PER_KELVIN, RewardSettings

__all__ = ["EngineError", "make_xtb_function", "relax_with"]

_TBLITE_METHOD = {"gfn1": "GFN1-xTB", "gfn2": "GFN2-xTB"}

EnergyFn = Callable[[np.ndarray], tuple[float, np.ndarray]]


class EngineError(RuntimeError):
    """An engine could not produce an energy (SCF not converged, bad geometry, missing parameters)."""


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    # libxtb reports a stack "-2- ...; -1- <root cause>": keep the root cause.
    return lines[-1] if lines else type(err).__name__


def _tblite_fn(z: np.ndarray, x_A: np.ndarray, charge: int, uhf: int, s: RewardSettings) -> EnergyFn:
    from tblite.interface import Calculator

    calc = Calculator(
        _TBLITE_METHOD[s.method], z, x_A / ANGSTROM_PER_BOHR, charge=float(charge), uhf=int(uhf),
        logger=_silent, color=False,
    )
    calc.set("verbosity", 0)
    calc.set("accuracy", float(s.accuracy))
    calc.set("max-iter", int(s.max_iterations))
    calc.set("temperature", float(s.electronic_temperature) * HARTREE_PER_KELVIN)
    state: dict = {"res": None, "x": x_A}

    def energy_grad(x: np.ndarray) -> tuple[float, np.ndarray]:
        if x is not state["x"]:  # the calculator already holds x_A
            calc.update(positions=np.asarray(x, np.float64) / ANGSTROM_PER_BOHR)
            state["x"] = x
        try:
            res = calc.singlepoint(state["res"], copy=True) if state["res"] is not None else calc.singlepoint()
        except Exception as err:  # noqa: BLE001 - TBLiteRuntimeError and friends
            state["res"] = None
            raise EngineError(f"tblite {_TBLITE_METHOD[s.method]} failed: {_first_line(err)}") from None
        state["res"] = res
        return float(res.get("energy")), np.asarray(res.get("gradient"), np.float64) / ANGSTROM_PER_BOHR

    return energy_grad


def _xtb_python_fn(z: np.ndarray, x_A: np.ndarray, charge: int, uhf: int, s: RewardSettings) -> EnergyFn:
    try:
        from xtb.interface import Calculator
        from xtb.libxtb import VERBOSITY_MUTED
        from xtb.utils import get_method
    except ImportError as err:  # pragma: no cover - only on Python >= 3.12
        raise EngineError(f"xtb-python is not importable ({err}); it has wheels for Python < 3.12 only") from None

    calc = Calculator(get_method(_TBLITE_METHOD[s.method]), z, x_A / ANGSTROM_PER_BOHR, float(charge), int(uhf))
    calc.set_verbosity(VERBOSITY_MUTED)
    calc.set_accuracy(float(s.accuracy))
    calc.set_max_iterations(int(s.max_iterations))
    calc.set_electronic_temperature(float(s.electronic_temperature))

    def energy_grad(x: np.ndarray) -> tuple[float, np.ndarray]:
        calc.update(np.asarray(x, np.float64) / ANGSTROM_PER_BOHR)
        try:
            res = calc.singlepoint()
        except Exception as err:  # noqa: BLE001 - XTBException
            raise EngineError(f"xtb-python {_TBLITE_METHOD[s.method]} failed: {_first_line(err)}") from None
        return float(res.get_energy()), np.asarray(res.get_gradient(), np.float64) / ANGSTROM_PER_BOHR

    return energy_grad


def make_xtb_function(z: np.ndarray, x_A: np.ndarray, charge: int, uhf: int, s: RewardSettings) -> EnergyFn:
    """Return ``f(x_A) -> (energy Eh, gradient (n,3) Eh/Å)`` for one molecule (calculator reused)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    z = np.ascontiguousarray(z, dtype=np.int32 if s.engine == "xtb" else np.int64)
    try:
        if s.engine == "tblite":
            return _tblite_fn(z, x_A, charge, uhf, s)
        if s.engine == "xtb":
            return _xtb_python_fn(z, x_A, charge, uhf, s)
    except EngineError:
        raise
    except Exception as err:  # noqa: BLE001 - calculator construction errors
        raise EngineError(f"{s.engine} setup failed: {_first_line(err)}") from None
    raise EngineError(f"engine '{s.engine}' does not run xTB methods")


def relax_with(fn: EnergyFn, x0_A: np.ndarray, max_steps: int, gtol_A: float) -> tuple[np.ndarray, float]:
    """Minimise ``fn`` from ``x0_A`` (Å) with L-BFGS-B; return relaxed positions (Å) and energy (Eh)."""
    from scipy.optimize import minimize

    shape = x0_A.shape

    def f(flat: np.ndarray) -> tuple[float, np.ndarray]:
        e, g = fn(flat.reshape(shape))
        return e, g.reshape(-1)

    out = minimize(f, x0_A.reshape(-1), jac=True, method="L-BFGS-B",
                   options={"maxiter": max_steps, "gtol": gtol_A, "ftol": 1e-12})
    e, _ = fn(out.x.reshape(shape))
    return out.x.reshape(shape), float(e)


def _silent(_msg: str) -> None:
    """tblite logger that drops all output."""
