"""Example reward-component plugin for fdc-mol (docs/plugins.md): the radius of gyration of the heavy atoms.

Use it in a finetune config (with ``docs/examples`` on ``PYTHONPATH``, or copy the file into your package)::

    reward:
      components:
        - plugin: "plugin_example:radius_of_gyration"
          units: "Å"
          direction: minimize          # compact molecules
          params: {heavy_only: true}

The protocol: ``fn(molecules, with_grad, **params)`` gets a list of :class:`flowmol_ext.batch.Molecule`
(``x`` (n, 3) float32 Å, ``a`` (n,) atom-type index over [C, H, N, O, F], ``c`` charge index, ``bonds`` (k, 3))
and returns a :class:`fdc_mol.rewards.components.ComponentValues`: ``value`` (B,) float64 in the component's
units (NaN for a molecule it cannot score), ``grad`` a list of (n_i, 3) d(value)/dx per Å (or None per
molecule) when ``with_grad`` is true, and ``reason`` one string per molecule ("" when fine).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fdc_mol.rewards.components import ComponentValues

H_INDEX = 1  # index of H in flowmol_ext.ATOM_TYPES = [C, H, N, O, F]


def radius_of_gyration(molecules: list[Any], with_grad: bool = False, heavy_only: bool = True) -> ComponentValues:
    """R_g = sqrt(mean_i |x_i − x̄|²) over the (heavy) atoms, Å; gradient dR_g/dx_i = (x_i − x̄)/(n R_g) per atom
    counted (0 for the others), dimensionless (Å/Å). A molecule with fewer than 2 counted atoms gets NaN."""
    values = np.full(len(molecules), np.nan)
    grads: list[np.ndarray | None] = []
    reasons = []
    for b, m in enumerate(molecules):
        x = m.x.detach().cpu().numpy().astype(np.float64)
        a = m.a.detach().cpu().numpy()
        use = a != H_INDEX if heavy_only else np.ones(len(a), bool)
        n = int(use.sum())
        if n < 2:
            grads.append(None)
            reasons.append(f"{n} counted atom(s), need 2")
            continue
        d = x[use] - x[use].mean(0)
        rg = float(np.sqrt((d * d).sum(1).mean()))
        values[b] = rg
        g = np.zeros_like(x)
        g[use] = d / (n * rg)
        grads.append(g)
        reasons.append("")
    return ComponentValues(values, grads if with_grad else None, reasons)


def broken(molecules: list[Any], with_grad: bool = False) -> ComponentValues:
    """A plugin that always raises (used by the tests to show the error handling)."""
    raise RuntimeError("example failure inside the plugin")
