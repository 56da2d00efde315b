"""Start-of-run logging: versions, device, seed and the resolved config, as every command does."""

from __future__ import annotations

import getpass
import json
import logging
import platform
import socket
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("fdc_mol")


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def versions() -> dict[str, str]:
    """Versions of the interpreter and the main dependencies that are importable."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    from importlib import metadata

    for dist in ("fdc-mol", "torch", "pytorch-lightning", "rdkit", "tblite", "xtb", "numpy", "scipy", "pydantic"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def describe_device(device: str | None = None) -> str:
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda})"
    return f"cpu ({torch.get_num_threads()} torch threads)"


def start_run(
    command: str,
    *,
    seed: int | None,
    config: Any = None,
    device: str | None = None,
    run_dir: Path | None = None,
) -> dict[str, Any]:
    """Log what this run is (user, host, versions, device, seed, resolved config) and save it in run_dir."""
    info: dict[str, Any] = {
        "command": command,
        "argv": sys.argv,
        "user": getpass.getuser(),
        "host": socket.gethostname(),
        "versions": versions(),
        "device": describe_device(device),
        "seed": seed,
    }
    resolved = config.model_dump(mode="json") if hasattr(config, "model_dump") else config
    log.info("fdc-mol %s | seed %s | device %s", command, seed, info["device"])
    log.info("versions: %s", json.dumps(info["versions"]))
    if resolved is not None:
        log.info("resolved config: %s", json.dumps(resolved))
    if run_dir is not None:
        from flowmol_ext.io_utils import atomic_write_text

        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "run_info.json", json.dumps({**info, "config": resolved}, indent=2))
    return info
