"""The per-run visual report: top-molecule grid, component distributions and a self-contained HTML page, opened
in a real headless browser (Debian's chromium; `make setup` installs it) and checked by its screenshot."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fdc_mol.io import write_sdf
from fdc_mol.report import FIXED_GRAPH_COLUMN, plot_distributions, plot_run, top_molecule_grid, write_html_report

from .rewards.conftest import molecule_from_xyz, qm9_rows

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _find_browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    if Path("/usr/bin/chromium").is_file():
        return "/usr/bin/chromium"
    pytest.fail("no headless browser found (looked for chromium, chromium-browser, google-chrome on PATH): install "
                "it with `apt-get install -y chromium` (Debian/Ubuntu; `make setup` does this when apt-get is "
                "available)")


def _fake_run(tmp_path: Path) -> tuple[Path, list[dict]]:
    """Two iterations of 12 real QM9 molecules with a component column that moves (gap_eV +1 eV)."""
    run = tmp_path / "run"
    mols = [molecule_from_xyz(e, x) for e, x, _ in qm9_rows(12)]
    rows = []
    for k in (0, 1):
        gap = np.linspace(6.0, 9.0, len(mols)) + k
        props = [{"iteration": k, "reward_Eh": float(g), "reward": float(g), "gap_eV": float(g),
                  "xtb_energy_Eh": -5.0 - 0.1 * i, "reward_method": "components"} for i, g in enumerate(gap)]
        props[0]["reward"] = props[0]["reward_Eh"] = float("nan")
        props[0]["reward_failure"] = "gap: overlapping atoms"
        write_sdf(run / "samples" / f"iteration_{k:03d}.sdf", mols, props)
        np.savez(run / "samples" / f"iteration_{k:03d}_ode.npz", rewards=gap,
                 fixed_graph_rewards=np.linspace(6.0, 9.0, len(mols)) + 0.5 * k)
        rows.append({"iteration": k, "n": len(mols), "mean_reward": float(gap[1:].mean()), "sq_beta": float(gap[-3:]
                     .mean()), "validity": 1.0, "molecule_stability": 0.9})
    (run / "config.yaml").write_text("reward:\n  components:\n  - kind: gap\n")
    return run, rows


def test_grid_distributions_and_self_contained_html(tmp_path: Path) -> None:
    from PIL import Image

    run, rows = _fake_run(tmp_path)
    plot_run(run, rows, 0.75)
    grid = top_molecule_grid(run, n_top=4, extra_field="gap_eV")
    assert grid is not None and Image.open(grid).size == (4 * 210, 2 * 180)  # one row per iteration
    _, summary = plot_distributions(run)
    by = {(s["iteration"], s["column"]): s for s in summary}
    assert by[(1, "gap_eV")]["mean"] - by[(0, "gap_eV")]["mean"] == pytest.approx(1.0)
    assert by[(0, "reward")]["n"] == 11  # the failed molecule (NaN) is left out
    assert by[(1, FIXED_GRAPH_COLUMN)]["mean"] - by[(0, FIXED_GRAPH_COLUMN)]["mean"] == pytest.approx(0.5)
    page = write_html_report(run, rows, title="test run")
    text = page.read_text()
    assert text.count("data:image/png;base64,") == 3
    assert not re.search(r"""src=['"](?!data:)""", text)  # nothing loaded from outside the page
    assert "<td>1</td>" in text and "gap_eV" in text and "kind: gap" in text


@pytest.mark.slow
def test_html_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    from PIL import Image

    browser = _find_browser()
    run, rows = _fake_run(tmp_path)
    plot_run(run, rows, 0.75)
    page = write_html_report(run, rows, title="browser check")
    shot = tmp_path / "shot.png"
    w, h = 1100, 1500
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={shot}",
           f"--window-size={w},{h}", page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert shot.is_file(), f"no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
    img = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert img.shape == (h, w, 3)
    non_white = (img.min(axis=2) < 245).mean()
    assert non_white > 0.05, f"screenshot nearly blank ({non_white:.3%} non-white pixels)"
    assert img.std() > 20.0
    # colour from the embedded plots (matplotlib/viridis lines, RDKit atom colours), not only black text
    colourful = (img.max(axis=2) - img.min(axis=2) > 60).mean()
    assert colourful > 0.001, f"no coloured pixels ({colourful:.4%}): the embedded images did not render"
