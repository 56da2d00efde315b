"""Model directories (ours) and official FlowMol v2.0 ``qm9_ctmc`` checkpoint import.

A model directory holds ``config.yaml`` (``model``: the :class:`ModelConfig`; ``metadata``: free-form
extras such as ``n_atoms_hist``, the training atom-count histogram indexed by atom count) and
``model.pt`` (the state_dict only, loaded with ``weights_only=True``).

Official checkpoints (a Lightning ``.ckpt`` or its run directory holding ``config.yaml`` and
``checkpoints/last.ckpt``) load by key mapping: our modules keep the official parameter names, so
the mapping is the identity minus the zero-element ``dummy_param`` tensors of the rate-0 dropout.
"""

from __future__ import annotations

import pathlib
import pickle
from pathlib import Path
from typing import Any

import torch
import yaml

from flowmol_ext.config import ConfigError, validate_config
from flowmol_ext.io_utils import atomic_torch_save, atomic_write_text
from flowmol_ext.model.config import ModelConfig
from flowmol_ext.model.flow import FlowMol

PRETRAINED_DIR = Path(__file__).parent / "pretrained_models"
# qm9_small: the default name; it points at the newest base trained with the independent coupling (a base for
# adjoint matching). The other names never move, so a config that records a result names one of them:
# qm9_small_16000: phase 6 (16,000 steps); ODE/SDE validity up ~1 point, molecule stability down ~1 point against
#   qm9_small_10000, both inside the intervals, so not the default;
# qm9_small_10000: 10,000 steps since the coupling change (phases 3-5), the default since 2026-11-30 (second session);
# qm9_small_4900: 4,900 steps (phases 3-4), the default before it and the base of the FDC results recorded before;
# qm9_small_indep800: the first 800 independent-coupling steps; qm9_small_ot: the earlier model trained with
# OT-aligned noise (its memoryless SDE is off-distribution; ODE sampling only).
REGISTRY: dict[str, Path] = {"qm9_small": PRETRAINED_DIR / "qm9_small_10000",
                             "qm9_small_10000": PRETRAINED_DIR / "qm9_small_10000",
                             "qm9_small_16000": PRETRAINED_DIR / "qm9_small_16000",
                             "qm9_small_4900": PRETRAINED_DIR / "qm9_small_4900",
                             "qm9_small_indep800": PRETRAINED_DIR / "qm9_small_indep800",
                             "qm9_small_ot": PRETRAINED_DIR / "qm9_small_ot"}
CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.pt"
FORMAT = "fdc-mol/flowmol-model-dir/1"

# Atom-count histogram of the FlowMol QM9 training split (data/qm9/train_data_n_atoms_histogram.pt,
# identical in FlowMol v0.1/v2.0/HEAD): counts for n = 3..27 and 29 atoms, indexed here by atom count.
_QM9_TRAIN_SIZES = list(range(3, 28)) + [29]
_QM9_TRAIN_COUNTS = [1, 3, 3, 9, 16, 50, 132, 358, 799, 1632, 2960, 5102, 7700, 10332, 12691, 12970, 13531, 9194,
                     9889, 3324, 4765, 538, 1397, 42, 270, 26]
QM9_TRAIN_N_ATOMS_HIST: list[int] = [0] * 30
for _n, _c in zip(_QM9_TRAIN_SIZES, _QM9_TRAIN_COUNTS):
    QM9_TRAIN_N_ATOMS_HIST[_n] = _c


# ---- key mapping ---------------------------------------------------------------------------------
def map_official_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official FlowMol LightningModule state_dict -> ours.

    Identity on names (``vector_field.…``); the zero-element ``…dropout.vector_dropout.dummy_param``
    tensors are dropped. Anything else is passed through so that :func:`load_weights` reports it.
    """
    out = {}
    for k, v in state_dict.items():
        if k.endswith(".dummy_param") and v.numel() == 0:
            continue
        out[k] = v
    return out


def load_weights(model: FlowMol, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load ``state_dict``; a ValueError names every missing, unexpected or mis-shaped key."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items() if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:

        def fmt(items: list[str]) -> str:
            return ", ".join(items[:12]) + (f" … (+{len(items) - 12} more)" if len(items) > 12 else "")

        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {fmt(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {fmt(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches: {fmt(shapes)}")
        raise ValueError(f"weights in {source} do not fit the model config: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)


# ---- our model directories -------------------------------------------------------------------------
def _yaml_safe(obj: Any, where: str = "metadata") -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _yaml_safe(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_yaml_safe(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "tolist"):  # numpy arrays / scalars
        return obj.tolist()
    raise ValueError(f"{where}: value of type {type(obj).__name__} cannot be stored in config.yaml")


def save_model_dir(model: FlowMol, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``config.yaml`` (model config + ``model.metadata`` updated by ``extra``) and ``model.pt``.

    Both files are written atomically; the weights first, so a directory with a config is complete.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"model directory path {path} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    metadata = {**model.metadata, **(extra or {})}
    doc = {"format": FORMAT, "model": model.cfg.model_dump(mode="json"), "metadata": _yaml_safe(metadata)}
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    atomic_torch_save(state, path / WEIGHTS_FILE)
    atomic_write_text(path / CONFIG_FILE, yaml.safe_dump(doc, sort_keys=False))
    return path


def is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


def _looks_corrupt(err: BaseException) -> bool:
    text = str(err).lower()
    return any(w in text for w in ("truncated", "ran out of input", "invalid load key", "unpickling stack underflow",
                                   "pickle data was truncated"))


def _corrupt(path: Path, err: BaseException) -> ValueError:
    size = path.stat().st_size if path.is_file() else 0
    what = "empty" if size == 0 else "truncated or corrupt"
    return ValueError(f"{path}: {what} weights file ({size} bytes; {type(err).__name__}: {_first_line(err)}); "
                      "re-export the model directory or copy the file again")


def _torch_load(path: Path, weights_only: bool) -> Any:
    """``torch.load`` on CPU; an empty, truncated or corrupt file raises one ``ValueError`` naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, OSError) as err:
        raise _corrupt(path, err) from None


def load_model_dir(path: str | Path, device: torch.device | str = "cpu") -> FlowMol:
    """Load one of our model directories (``config.yaml`` + ``model.pt``) in eval mode."""
    path = Path(path)
    if not is_model_dir(path):
        raise FileNotFoundError(f"{path} is not a model directory (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        doc = yaml.safe_load((path / CONFIG_FILE).read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path / CONFIG_FILE} is not valid YAML: {err}") from None
    if not isinstance(doc, dict) or "model" not in doc:
        raise ConfigError(f"{path / CONFIG_FILE} has no 'model' section")
    cfg = validate_config(ModelConfig, doc["model"], source=f"{path / CONFIG_FILE} (section 'model')")
    model = FlowMol(cfg, metadata=doc.get("metadata") or {})
    state = _torch_load(path / WEIGHTS_FILE, weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path / WEIGHTS_FILE} does not hold a state_dict (got {type(state).__name__})")
    load_weights(model, state, str(path / WEIGHTS_FILE))
    return model.to(device).eval()


# ---- official checkpoints ----------------------------------------------------------------------------
def _resolve_official(path: Path) -> tuple[Path, Path | None]:
    """(checkpoint file, run config.yaml or None) for a run directory or a .ckpt file."""
    if path.is_dir():
        ckpt = path / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            raise FileNotFoundError(f"{path} is not an official FlowMol run directory: {ckpt} is missing")
        cfg = path / "config.yaml"
        return ckpt, cfg if cfg.is_file() else None
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    cfg = path.parent.parent / "config.yaml" if path.parent.name == "checkpoints" else path.parent / "config.yaml"
    return path, cfg if cfg.is_file() else None


def load_official_checkpoint(
    path: str | Path, device: torch.device | str = "cpu", weights_only: bool = True
) -> FlowMol:
    """Load an official FlowMol v2.0 CTMC checkpoint (``.ckpt`` or run directory) into our model.

    The config comes from the checkpoint's ``hyper_parameters`` (or the run's ``config.yaml``).
    ``weights_only=False`` unpickles arbitrary objects: use it only for files you trust.
    """
    ckpt_path, run_cfg = _resolve_official(Path(path))
    try:
        with torch.serialization.safe_globals([pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath]):
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as err:
        if _looks_corrupt(err):
            raise _corrupt(ckpt_path, err) from None
        raise ValueError(
            f"cannot load {ckpt_path} with weights_only=True: {_first_line(err)}. If you trust the file, call "
            "load_official_checkpoint(..., weights_only=False)"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise _corrupt(ckpt_path, err) from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{ckpt_path} does not hold a checkpoint dict (got {type(ckpt).__name__})")
    hp = ckpt.get("hyper_parameters")
    if isinstance(hp, dict) and "vector_field_config" in hp:
        official_cfg, cfg_source = hp, f"{ckpt_path} (hyper_parameters)"
    elif run_cfg is not None:
        official_cfg, cfg_source = yaml.safe_load(run_cfg.read_text()) or {}, str(run_cfg)
    else:
        raise ValueError(f"{ckpt_path} has no hyper_parameters and no config.yaml was found next to it")
    try:
        cfg = ModelConfig.from_official(official_cfg)
    except ConfigError as err:
        raise ConfigError(f"{cfg_source}: {err}") from None
    vf = official_cfg.get("vector_field_config") or official_cfg.get("vector_field") or {}
    metadata = {
        "source": "official FlowMol v2.0 checkpoint",
        "checkpoint": str(ckpt_path),
        "epoch": ckpt.get("epoch"),
        "global_step": ckpt.get("global_step"),
        "stochasticity": vf.get("stochasticity"),
        "hc_thresh": vf.get("high_confidence_threshold"),
        # the histogram file lives in the FlowMol checkout, not in the checkpoint: use the QM9 train one
        "n_atoms_hist": list(QM9_TRAIN_N_ATOMS_HIST),
    }
    state = ckpt["state_dict"] if "state_dict" in ckpt else ckpt
    model = FlowMol(cfg, metadata=metadata)
    load_weights(model, map_official_state_dict(state), str(ckpt_path))
    return model.to(device).eval()


# ---- one entry point -----------------------------------------------------------------------------------
def load_pretrained(name_or_path: str | Path, device: torch.device | str = "cpu") -> FlowMol:
    """Load a model by registry name (``"qm9_small"``), model directory, official run directory or ``.ckpt``.

    Returns the model in eval mode on ``device``; ``model.metadata`` holds the stored extras
    (e.g. ``n_atoms_hist`` for drawing molecule sizes).
    """
    if isinstance(name_or_path, str) and name_or_path in REGISTRY:
        d = REGISTRY[name_or_path]
        if not is_model_dir(d):
            raise FileNotFoundError(
                f"pretrained model {name_or_path!r} is not shipped in this checkout (expected a model directory "
                f"at {d}); train one with `fdc-mol pretrain` or pass a model directory / official checkpoint path"
            )
        return load_model_dir(d, device)
    path = Path(name_or_path)
    if is_model_dir(path):
        return load_model_dir(path, device)
    official_run = path.is_dir() and (path / "checkpoints" / "last.ckpt").is_file()
    if official_run or (path.is_file() and path.suffix == ".ckpt"):
        return load_official_checkpoint(path, device)
    if path.exists():
        raise ValueError(
            f"{path} is neither a model directory ({CONFIG_FILE} + {WEIGHTS_FILE}), an official run directory "
            "(config.yaml + checkpoints/last.ckpt) nor a .ckpt file"
        )
    raise ValueError(f"unknown model {str(name_or_path)!r}: not a registry name ({', '.join(REGISTRY)}) nor a path")
