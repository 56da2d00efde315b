"""glibc malloc settings: freed tensor memory is reused instead of being page-faulted in again."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHILD = r"""
import resource, sys
import torch
from flowmol_ext.batch import MolBatch, Molecule
from flowmol_ext.malloc import keep_freed_memory
from flowmol_ext.model.config import ModelConfig
from flowmol_ext.model.flow import FlowMol

applied = keep_freed_memory() if sys.argv[1] == "tuned" else False
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
mols = [Molecule(x=torch.randn(18, 3, generator=g), a=torch.randint(0, 5, (18,), generator=g),
                 c=torch.full((18,), 2), bonds=torch.zeros(0, 3, dtype=torch.long)) for _ in range(60)]
b = MolBatch.from_molecules(mols)
model = FlowMol(ModelConfig.small()).eval()
t = torch.full((60,), 0.5)
def forward():
    with torch.no_grad():
        model.predict(b.x, b.a, b.c, b.e, t, b.graph, apply_softmax=True, remove_com=True)
forward()  # warm-up: the first call faults its working set in either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    forward()
print(int(applied), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _clean_env(**env: str) -> dict[str, str]:
    """This process's environment without malloc settings (a dask LocalCluster's nanny, started by another test,
    puts MALLOC_TRIM_THRESHOLD_ into os.environ), plus ``env``."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "FDC_MOL_MALLOC"}
    return {**keep, **env}


def _faults(mode: str, **env: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True,
                         env=_clean_env(**env)).stdout.split()
    return bool(int(out[0])), int(out[1])


@pytest.mark.skipif(sys.platform != "linux", reason="glibc mallopt")
def test_keep_freed_memory_removes_the_page_faults_of_repeated_large_tensors() -> None:
    applied, tuned = _faults("tuned")
    _, default = _faults("default")
    assert applied
    # 60 molecules x 18 atoms, fully connected: 18,360 edges; an (E, 128) float activation is 9.4 MB. By default
    # glibc returns such blocks to the OS and every call faults them in again.
    assert default > 20_000
    assert tuned < default / 10  # reused from the heap after the warm-up call
    # Opting out, or glibc's own variables set by the user, leave the defaults alone.
    probe = "from flowmol_ext.malloc import keep_freed_memory; print(int(keep_freed_memory()))"
    for env in ({"FDC_MOL_MALLOC": "default"}, {"MALLOC_TRIM_THRESHOLD_": "131072"}, {}):
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                             env=_clean_env(**env)).stdout.strip()
        assert out == ("1" if not env else "0"), env
