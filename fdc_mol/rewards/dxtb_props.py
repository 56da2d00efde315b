"""xTB properties with position gradients from ``dxtb`` (differentiable GFN1/GFN2-xTB in PyTorch): the HOMO–LUMO
gap and the dipole moment of one molecule, by autograd through the self-consistent calculation.

Units: positions enter in Å (converted to Bohr only here); the gap is in eV and its gradient in eV/Å; the dipole
moment is in Debye and its gradient in D/Å.

The dipole is the point-charge (Mulliken monopole) dipole |Σ_A q_A (R_A − R̄)| of the self-consistent GFN charges,
not the full dipole with atomic dipole contributions: dxtb computes the latter only with its libcint integral
driver (``tad-libcint``), whose requirement tad-mctc ≥ 0.11 conflicts with dxtb 0.4.0's pin tad-mctc == 0.7.0.
For a neutral molecule it does not depend on the origin.

The gap is differentiable only where the HOMO and the LUMO are non-degenerate (symmetric molecules with a
degenerate π pair, e.g. acetonitrile, have a kink there; autograd then returns one of the one-sided
derivatives). Generated molecules are almost never exactly symmetric.

A fresh ``dxtb.Calculator`` is built for every evaluation: a reused calculator keeps state between calls and
its autograd gradients then disagree with finite differences (seen with dxtb 0.4.0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fdc_mol.rewards.base import ANGSTROM_PER_BOHR

__all__ = ["EV_PER_HARTREE", "E_ANGSTROM_PER_DEBYE", "XtbProperties", "xtb_properties"]

EV_PER_HARTREE = 27.211386245988  # CODATA 2018
E_ANGSTROM_PER_DEBYE = 0.20819434  # 1 D = 0.20819434 e·Å


@dataclass
class XtbProperties:
    """Properties of one molecule: ``values`` {name: float} and ``grads`` {name: (n, 3) float64 per Å}.

    Names: ``gap`` (eV), ``dipole`` (Debye), ``energy`` (dxtb total energy, Eh).
    """

    values: dict[str, float]
    grads: dict[str, np.ndarray]


def xtb_properties(z: np.ndarray, x_A: np.ndarray, charge: int = 0, uhf: int = 0, method: str = "gfn1",
                   names: tuple[str, ...] = ("gap", "dipole"), with_grad: bool = True) -> XtbProperties:
    """HOMO–LUMO gap (eV) and dipole moment (D) of one molecule with their gradients (per Å) from dxtb.

    z (n,) atomic numbers; x_A (n, 3) positions in Å; charge in e; uhf unpaired electrons. The HOMO is the
    highest orbital of the closed-shell occupation (n_el/2 orbitals; for uhf > 0 the alpha channel's). Raises
    RuntimeError with a readable reason when dxtb fails or returns non-finite numbers.
    """
    import dxtb
    import torch

    dd = {"dtype": torch.float64, "device": torch.device("cpu")}
    numbers = torch.as_tensor(np.asarray(z, np.int64))
    x = torch.tensor(np.asarray(x_A, np.float64), **dd, requires_grad=with_grad)
    par = {"gfn1": dxtb.GFN1_XTB, "gfn2": dxtb.GFN2_XTB}[method]
    try:
        calc = dxtb.Calculator(numbers, par, opts={"verbosity": 0}, **dd)
        with torch.set_grad_enabled(with_grad):
            res = calc.singlepoint(x / ANGSTROM_PER_BOHR, chrg=float(charge), spin=int(uhf))
            out: dict[str, torch.Tensor] = {}
            if "gap" in names:
                n_el = int(round(float(res.occupation.detach().sum())))
                n_homo = (n_el + int(uhf)) // 2
                emo = res.emo if res.emo.ndim == 1 else res.emo[0]
                if not 0 < n_homo < emo.shape[-1]:
                    raise RuntimeError(f"no HOMO–LUMO pair: {n_homo} occupied of {emo.shape[-1]} orbitals")
                out["gap"] = (emo[n_homo] - emo[n_homo - 1]) * EV_PER_HARTREE
            if "dipole" in names:
                q = res.charges.mono
                if q.shape[0] != numbers.shape[0]:
                    q = calc.ihelp.reduce_orbital_to_atom(q) if q.shape[0] == calc.ihelp.nao else \
                        calc.ihelp.reduce_shell_to_atom(q)
                mu = (q[:, None] * (x - x.mean(0))).sum(0) / E_ANGSTROM_PER_DEBYE
                out["dipole"] = torch.sqrt((mu * mu).sum() + 1e-30)
            if "energy" in names:
                out["energy"] = res.total.sum()
    except RuntimeError:
        raise
    except Exception as err:  # noqa: BLE001 - dxtb raises many types; report one line
        raise RuntimeError(f"dxtb {method} failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                           ) from None
    values = {k: float(v.detach()) for k, v in out.items()}
    bad = [k for k, v in values.items() if not np.isfinite(v)]
    if bad:
        raise RuntimeError(f"dxtb {method} returned non-finite {', '.join(bad)}")
    grads: dict[str, np.ndarray] = {}
    if with_grad:
        keys = list(out)
        for i, k in enumerate(keys):
            (g,) = torch.autograd.grad(out[k], x, retain_graph=i < len(keys) - 1)
            grads[k] = g.detach().numpy().astype(np.float64)
            if not np.isfinite(grads[k]).all():
                raise RuntimeError(f"dxtb {method}: non-finite gradient of {k}")
    return XtbProperties(values=values, grads=grads)
