"""Energy rewards (GFN1/GFN2-xTB via tblite or xtb-python, MMFF94 via RDKit): parallel, cached, robust.

``make_reward("gfn1")(molecules)`` returns a :class:`RewardResult` with r = −E (Hartree) and
d r/dx (Hartree/Å); failed molecules get NaN and a reason. See :mod:`fdc_mol.rewards.reward`.
"""

from fdc_mol.rewards.base import MolSpec, RewardResult, RewardSettings, spec_from_molecule
from fdc_mol.rewards.parallel import SerialExecutor, make_executor
from fdc_mol.rewards.reward import EnergyReward, make_molecular_reward, make_reward

__all__ = [
    "EnergyReward",
    "MolSpec",
    "RewardResult",
    "RewardSettings",
    "SerialExecutor",
    "make_executor",
    "make_molecular_reward",
    "make_reward",
    "spec_from_molecule",
]
