"""flowmol_ext: a DGL-free, pure-torch re-implementation of the FlowMol v2.0 (CTMC) generator.

This package knows nothing of FDC. Public entry points:
- :class:`flowmol_ext.batch.MolBatch`, the flat batch that every part exchanges;
- :func:`flowmol_ext.load_pretrained`, the one-line model loader (our model directories and the
  official FlowMol v2.0 ``qm9_ctmc`` Lightning checkpoint).
"""

from __future__ import annotations

__version__ = "0.1.0"

ATOM_TYPES: tuple[str, ...] = ("C", "H", "N", "O", "F")
CHARGES: tuple[int, ...] = (-2, -1, 0, 1, 2, 3)
BOND_ORDERS: tuple[int, ...] = (0, 1, 2, 3)  # none, single, double, triple (kekulized)
CHARGE_OFFSET = 2  # charge index = formal charge + 2


def load_pretrained(name_or_path, **kwargs):  # noqa: ANN001, ANN201 - thin lazy re-export
    """Load a model by registry name (``"qm9_small"``), model directory, or official checkpoint.

    See :func:`flowmol_ext.pretrained.load_pretrained`.
    """
    from flowmol_ext.pretrained import load_pretrained as _load

    return _load(name_or_path, **kwargs)
