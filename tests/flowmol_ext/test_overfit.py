"""Overfit test: the model memorises three small molecules and samples them back valid.

Exercises the whole generator path on CPU in CI time: OT-aligned prior, conditional path, network,
masked losses, Adam, then the ODE + CTMC sampler and the RDKit chemistry.
"""

from __future__ import annotations

import pytest
import torch
from rdkit import Chem
from rdkit.Chem import AllChem

from flowmol_ext.batch import MolBatch
from flowmol_ext.chem import from_rdkit
from flowmol_ext.metrics import canonical_smiles, is_valid
from flowmol_ext.model.config import ModelConfig
from flowmol_ext.model.flow import FlowMol
from flowmol_ext.model.interpolants import aligned_prior
from flowmol_ext.model.sampler import SamplerConfig, sample_molecules

SMILES = ["C=O", "OC=O", "CC#N"]  # 4, 5 and 6 atoms: one molecule per size


def _molecule(smi: str):  # noqa: ANN202
    m = Chem.AddHs(Chem.MolFromSmiles(smi))
    AllChem.EmbedMolecule(m, randomSeed=7)
    AllChem.MMFFOptimizeMolecule(m)
    Chem.Kekulize(m, clearAromaticFlags=True)
    mol = from_rdkit(m)
    mol.x = mol.x - mol.x.mean(0)
    return mol


@pytest.mark.slow
def test_small_model_memorises_and_samples_back_valid_molecules() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    mols = [_molecule(s) for s in SMILES]
    ref = {m.n_atoms: Chem.CanonSmiles(s) for m, s in zip(mols, SMILES)}
    model = FlowMol(ModelConfig(n_hidden_scalars=64, n_vec_channels=8, n_hidden_edge_feats=32, n_molecule_updates=3,
                                rbf_dim=16, n_cp_feats=2))
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    batch = MolBatch.from_molecules(mols * 8)
    gen = torch.Generator().manual_seed(0)
    first = last = None
    for _step in range(1000):
        x0 = aligned_prior(batch, gen)
        loss = model.training_loss(batch, x0, generator=gen).total
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_value_(model.parameters(), 1.0)
        opt.step()
        first = float(loss) if first is None else first
        last = float(loss)
    assert last < 0.5 * first, (first, last)
    model.eval()
    cfg = SamplerConfig(steps=50, position_sampler="ode", hc_thresh=0.9)
    hits = 0
    total = 0
    for n, smi in ref.items():
        for m in sample_molecules(model, 8, cfg, n_atoms=n, seed=n, progress=False):
            total += 1
            hits += int(is_valid(m) and canonical_smiles(m) == smi)
    # At 1,000 steps 17/24 samples are exact valid copies (most misses have the right skeleton and a wrong
    # H count). 600 steps gave 9/24, and fewer than 5 of 12 after a float-rounding change: too brittle.
    assert hits >= 12, f"only {hits}/{total} sampled molecules are valid copies of the training molecules"
