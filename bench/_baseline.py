"""Today's (pre-issue-16) code, importable side by side with the working tree, for interleaved timing.

The modules of ``flowmol_ext`` (package root, batch, config, graph, io_utils, model/*) and of
``fdc_mol/fdc`` (flow, adjoint_matching, flowmol_flow) are read with ``git show <commit>:<path>``
from the baseline commit (default ``aac49eb``, the head before the speed work), written into a
temporary directory under the package names ``_base_flowmol_ext`` and ``_base_fdc`` (imports
rewritten), and imported from there. Nothing in the working tree is touched.

    from bench._baseline import load_baseline
    base = load_baseline()                 # SimpleNamespace of the old modules
    old_model = base.flow.FlowMol(base.config.ModelConfig(**cfg.model_dump()))
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

BASELINE_COMMIT = "aac49eb"
REPO = Path(__file__).resolve().parents[1]
_FLOWMOL_FILES = ["__init__.py", "batch.py", "config.py", "graph.py", "io_utils.py", "model/__init__.py",
                  "model/config.py", "model/ctmc.py", "model/flow.py", "model/gvp.py", "model/interpolants.py",
                  "model/loss.py", "model/sampler.py", "model/vector_field.py"]
_FDC_FILES = ["flow.py", "adjoint_matching.py", "flowmol_flow.py"]
_CACHE: dict[str, SimpleNamespace] = {}


def _git_show(commit: str, path: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:{path}"], check=True, capture_output=True,
                          text=True).stdout


def load_baseline(commit: str = BASELINE_COMMIT) -> SimpleNamespace:
    """Materialise and import the baseline modules of ``commit``; returns them by short name.

    Fields: ``graph``, ``batch``, ``config`` (model config), ``flow`` (FlowMol), ``gvp``,
    ``vector_field``, ``sampler``, ``ctmc``, ``am`` (adjoint_matching), ``fdc_flow`` (fdc flow
    protocol), ``flowmol_flow`` (FlowMolFlow), and ``commit``.
    """
    if commit in _CACHE:
        return _CACHE[commit]
    root = Path(tempfile.mkdtemp(prefix=f"fdc_baseline_{commit}_"))
    tag = re.sub(r"\W", "_", commit)
    fm, fdc = f"_base_flowmol_ext_{tag}", f"_base_fdc_{tag}"
    for rel in _FLOWMOL_FILES:
        src = _git_show(commit, f"flowmol_ext/{rel}") if rel != "model/__init__.py" else ""
        dst = root / fm / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(re.sub(r"\bflowmol_ext\b", fm, src))
    (root / fdc).mkdir()
    (root / fdc / "__init__.py").write_text("")
    for rel in _FDC_FILES:
        src = _git_show(commit, f"fdc_mol/fdc/{rel}")
        (root / fdc / rel).write_text(re.sub(r"\bflowmol_ext\b", fm, src))
    sys.path.insert(0, str(root))
    try:
        mods = {name: importlib.import_module(f"{fm}.{name}") for name in ("graph", "batch")}
        mods.update({name: importlib.import_module(f"{fm}.model.{name}")
                     for name in ("config", "flow", "gvp", "vector_field", "sampler", "ctmc")})
        mods["am"] = importlib.import_module(f"{fdc}.adjoint_matching")
        mods["fdc_flow"] = importlib.import_module(f"{fdc}.flow")
        mods["flowmol_flow"] = importlib.import_module(f"{fdc}.flowmol_flow")
    finally:
        sys.path.remove(str(root))
    ns = SimpleNamespace(commit=commit, root=root, **mods)
    _CACHE[commit] = ns
    return ns


def baseline_model(model, commit: str = BASELINE_COMMIT):  # noqa: ANN001, ANN201
    """A baseline-code FlowMol with the same config, weights and metadata as ``model`` (same device)."""
    base = load_baseline(commit)
    data = model.cfg.model_dump()
    if data.get("distortion", {}).get("p", 0.0) > 0:
        raise ValueError("the baseline has no train-time distortion; compare with distortion.p = 0")
    # options added after the baseline commit (all off here) are not fields of its config
    cfg = base.config.ModelConfig(**{k: v for k, v in data.items() if k in base.config.ModelConfig.model_fields})
    old = base.flow.FlowMol(cfg, metadata=dict(model.metadata))
    old.load_state_dict(model.state_dict(), strict=True)
    dev = next(model.parameters()).device
    return old.to(dev).train(model.training)
