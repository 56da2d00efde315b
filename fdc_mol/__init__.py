"""fdc-mol: Flow Density Control for 3D molecule generation (FlowMol-style generator, QM9)."""

from __future__ import annotations

__version__ = "0.1.0"
