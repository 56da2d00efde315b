"""environment.yml (conda users) must list a counterpart of every dependency in pyproject.toml."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]

# The one place where pip names map to conda-forge names (identity when absent).
PIP_TO_CONDA: dict[str, list[str]] = {
    "torch": ["pytorch"],
    "tblite": ["tblite-python"],
    "xtb": ["xtb-python"],
    "openbabel-wheel": ["openbabel"],
    "dask[distributed]": ["dask", "distributed"],
}


def _name(req: str) -> str:
    req = req.split(";")[0].strip()
    m = re.match(r"^([A-Za-z0-9_.\-]+(\[[A-Za-z0-9_,\-]+\])?)", req)
    assert m, req
    return m.group(1).lower()


def _conda_names() -> set[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    names = set()
    for dep in env["dependencies"]:
        if isinstance(dep, str):
            names.add(re.split(r"[<>=! ]", dep, maxsplit=1)[0].lower())
    return names


def _pyproject_requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs.extend(extra)
    return reqs


def missing_counterparts(conda: set[str], requirements: list[str]) -> list[str]:
    missing = []
    for req in requirements:
        name = _name(req)
        for conda_name in PIP_TO_CONDA.get(name, [name]):
            if conda_name not in conda:
                missing.append(f"{name} -> {conda_name}")
    return missing


def test_every_pyproject_dependency_has_a_conda_counterpart() -> None:
    missing = missing_counterparts(_conda_names(), _pyproject_requirements())
    assert not missing, f"environment.yml lacks: {missing}"


def test_environment_pins_python_311_and_installs_the_project() -> None:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps
    pip_section = next(d for d in deps if isinstance(d, dict))
    assert "-e ." in pip_section["pip"]
    assert env["channels"] == ["conda-forge"]


def test_mapping_detects_missing_packages() -> None:
    """The check can fail: without rdkit and tblite-python the comparison names both."""
    conda = _conda_names() - {"rdkit", "tblite-python"}
    assert missing_counterparts(conda, _pyproject_requirements()) == ["rdkit -> rdkit", "tblite -> tblite-python"]
