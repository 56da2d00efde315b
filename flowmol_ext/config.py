"""Strict typed configs: unknown keys are rejected with the offending key named.

Every config file of the project is a YAML document validated by a :class:`StrictModel`
subclass. Errors are turned into one readable :class:`ConfigError` that lists each bad key with
its dotted path, what was wrong and the valid range, instead of pydantic's raw dump.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

T = TypeVar("T", bound="StrictModel")


class ConfigError(ValueError):
    """A config file or mapping that does not validate. The message names every bad key."""


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  - unknown key '{key}' (not a field of this section; check the spelling)")
        elif e["type"] == "missing":
            lines.append(f"  - missing required key '{key}'")
        else:
            lines.append(f"  - key '{key}': {e['msg']} (got {e.get('input')!r})")
    lines.append("  The fields of each section are listed in the configs/ examples and README.md.")
    return "\n".join(lines)


def validate_config(cls: type[T], data: dict[str, Any] | None, source: str = "<mapping>") -> T:
    """Validate a mapping against ``cls``; raise :class:`ConfigError` naming each bad key."""
    try:
        return cls.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(cls: type[T], path: str | Path, overrides: dict[str, Any] | None = None) -> T:
    """Read a YAML file into ``cls``. ``overrides`` is a nested mapping merged on top."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, got {type(data).__name__}")
    if overrides:
        data = deep_merge(data, overrides)
    return validate_config(cls, data, source=str(path))


def check_device(device: str | None, key: str = "device") -> str:
    """Resolve and check a torch device spec: None or ``"auto"`` -> ``"cuda"`` if available else
    ``"cpu"``; ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` are checked against this machine.
    Raises ``ValueError`` naming ``key`` (e.g. ``--device`` or ``device``) otherwise."""
    import re

    import torch

    spec = "auto" if device is None else str(device).strip().lower()
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return "cpu"
    m = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if m:
        if not torch.cuda.is_available():
            raise ValueError(f"{key}: '{device}' requested but no CUDA GPU is available "
                             "(torch.cuda.is_available() is False); use 'cpu' or 'auto'")
        if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
            raise ValueError(f"{key}: '{device}' but this machine has {torch.cuda.device_count()} CUDA device(s)")
        return spec
    if spec == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"{key}: 'mps' requested but Apple MPS is not available; use 'cpu' or 'auto'")
        return spec
    raise ValueError(f"{key}: unknown device '{device}'; valid: auto, cpu, cuda, cuda:N, mps")


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base``."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def dump_config(cfg: BaseModel, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    from flowmol_ext.io_utils import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
