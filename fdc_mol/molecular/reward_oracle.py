"""Bridge from a molecular reward (:class:`~fdc_mol.rewards.EnergyReward` or any object with the Reward
protocol) to the utilities' :data:`~fdc_mol.fdc.utilities.RewardOracle` on flat position tensors."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fdc_mol.fdc.flow import Trajectory
from fdc_mol.fdc.utilities import OracleOutput
from flowmol_ext.batch import Molecule
from flowmol_ext.graph import remove_com

__all__ = ["molecules_of", "reward_oracle"]


def molecules_of(traj: Trajectory, x: Tensor | None = None) -> list[Molecule]:
    """The final molecules of a molecular trajectory, with positions ``x`` (N, 3) Å if given, else traj.x1."""
    final = traj.context["final"]
    return final.replace(x=(traj.x1 if x is None else x).detach()).to_molecules()


def reward_oracle(reward: Any, *, grad_clip_per_atom: float | None = None,
                  log: list[dict[str, Any]] | None = None):  # noqa: ANN201
    """``oracle(x (N,3), traj) -> (values (B,) float32, grads (N,3) float32 in reward units per Å)``.

    Failed molecules get NaN values and zero gradients (utilities leave NaN out of quantiles and gradients).
    grad_clip_per_atom: clip each atom's gradient vector to this norm (reward units per Å): the terminal
    gradient of xTB energies is dominated by a few atoms (clashes, stretched bonds). Records
    ``traj.extras['n_scored']`` (molecules with a finite reward) for the AM step's log, and appends each
    call's RewardResult to ``log`` when given. A reward whose result has ``extra_grads`` (constraint columns of
    :class:`~fdc_mol.rewards.components.ComponentReward`) gives an :class:`~fdc_mol.fdc.utilities.OracleOutput`
    that also carries those columns {name: (values (B,), grads (N,3))}, clipped and projected like the reward's.
    """
    if grad_clip_per_atom is not None and not grad_clip_per_atom > 0:
        raise ValueError(f"grad_clip_per_atom must be > 0 or None, got {grad_clip_per_atom}")

    def oracle(x: Tensor, traj: Trajectory) -> tuple[Tensor, Tensor]:
        mols = molecules_of(traj, x)
        res = reward(mols, with_grad=True)
        if log is not None:
            log.append({"result": res, "molecules": mols})
        vals = torch.as_tensor(res.value, dtype=torch.float32, device=x.device)
        grads = []
        for m, g in zip(mols, res.grad or [None] * len(mols)):
            grads.append(torch.zeros(m.n_atoms, 3) if g is None else torch.as_tensor(g, dtype=torch.float32))
        grad = torch.cat(grads).to(x.device) if grads else torch.zeros_like(x)
        grad = torch.nan_to_num(grad)
        if grad_clip_per_atom is not None:
            norm = grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            grad = grad * (grad_clip_per_atom / norm).clamp(max=1.0)
        traj.extras["n_scored"] = int(torch.isfinite(vals).sum())
        grad = remove_com(grad, traj.group, traj.n)
        extra_grads = getattr(res, "extra_grads", None)
        if not extra_grads:
            return vals, grad
        columns = {}
        for name, glist in extra_grads.items():
            cv = torch.as_tensor(res.extras[name], dtype=torch.float32, device=x.device)
            gc = torch.cat([torch.zeros(m.n_atoms, 3) if g is None else torch.as_tensor(g, dtype=torch.float32)
                            for m, g in zip(mols, glist)]).to(x.device) if mols else torch.zeros_like(x)
            gc = torch.nan_to_num(gc)
            if grad_clip_per_atom is not None:
                norm = gc.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                gc = gc * (grad_clip_per_atom / norm).clamp(max=1.0)
            columns[name] = (cv, remove_com(gc, traj.group, traj.n))
        return OracleOutput(vals, grad, columns)

    return oracle
