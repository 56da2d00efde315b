"""Reward worker processes never outlive their parent, and a script without a ``__main__`` guard
still gets its rewards (serial fallback with a warning) instead of NaN for every molecule."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

SCRIPT_HEAD = """
import os, sys, time
from fdc_mol.rewards import make_reward
from tests.fdc_mol.rewards.conftest import molecule_from_xyz, qm9_rows
mols = [molecule_from_xyz(e, x) for e, x, _ in qm9_rows(4)]
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"  # zombies are dead
    except FileNotFoundError:
        return False


def _start_pool_script(tmp_path: Path, tail: str) -> tuple[subprocess.Popen, list[int]]:
    script = tmp_path / "pool.py"
    script.write_text(SCRIPT_HEAD + textwrap.dedent("""
        if __name__ == "__main__":
            reward = make_reward("mmff94", executor="local:2", chunk_size=1)
            res = reward(mols)
            assert res.ok.all(), res.reason
            print("WORKERS", *reward.executor._processes.keys(), flush=True)
    """) + textwrap.indent(textwrap.dedent(tail), "    "))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("WORKERS"), line + proc.stderr.read()
    pids = [int(p) for p in line.split()[1:]]
    assert pids and all(_alive(p) for p in pids)
    if "READY" in tail:  # wait until the tail code (e.g. installing signal handlers) has run
        assert proc.stdout.readline().startswith("READY")
    return proc, pids


def _wait_gone(pids: list[int], timeout_s: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return []
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_workers_exit_when_the_parent_is_killed(tmp_path: Path, sig: int) -> None:
    # the parent has no SIGTERM handler here: it dies at once, like a SIGKILL
    proc, pids = _start_pool_script(tmp_path, "time.sleep(300)\n")
    os.kill(proc.pid, sig)
    proc.wait(timeout=30)
    left = _wait_gone(pids)
    for p in left:  # do not leave them behind if the test fails
        os.kill(p, signal.SIGKILL)
    assert not left, f"workers {left} outlived their parent"


def test_sigterm_with_handler_shuts_the_pool_down_and_exits_143(tmp_path: Path) -> None:
    proc, pids = _start_pool_script(tmp_path, """
        from flowmol_ext import signals
        signals.install()
        try:
            with reward:
                # READY inside the try: the test's SIGTERM may land while print() returns
                print("READY", flush=True)
                time.sleep(300)
        except signals.Interrupted as err:
            sys.exit(err.exit_code)
    """)
    os.kill(proc.pid, signal.SIGTERM)
    rc = proc.wait(timeout=30)
    assert rc == 143, proc.stderr.read()[-3000:]
    left = _wait_gone(pids, timeout_s=3.0)
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left


def test_script_without_main_guard_gets_rewards_and_a_clear_warning(tmp_path: Path) -> None:
    script = tmp_path / "unguarded.py"
    script.write_text(SCRIPT_HEAD + textwrap.dedent("""
        reward = make_reward("mmff94", executor="local:2", chunk_size=1)
        res = reward(mols)
        print("OK", bool(res.ok.all()), res.reason)
        reward.close()
    """))
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "OK True" in proc.stdout, proc.stdout + proc.stderr
    assert 'if __name__ == "__main__":' in proc.stderr and "serial" in proc.stderr


FORKED_AFTER_OPENMP = r"""
import os, sys, time
os.environ["OMP_NUM_THREADS"] = "2"
import torch
torch.set_num_threads(2)
x = torch.randn(1500, 1500)
for _ in range(3):
    (x @ x).sum()  # OpenMP parallel regions on 2 threads in this process (torch's libgomp, which tblite shares)
sys.path.insert(0, sys.argv[1])
from conftest import qm9_rows, molecule_from_xyz
from fdc_mol.rewards import make_reward
mols = [molecule_from_xyz(e, xyz) for e, xyz, _ in qm9_rows(28)[20:28]]
res = make_reward("gfn1", executor="serial", timeout_s=10.0)(mols)  # each chunk in a forked watchdog child
print("OK", int(res.ok.sum()), len(mols), [r for r in res.reason if r][:1])
"""


def test_forked_engine_child_after_multithreaded_openmp_in_the_parent_does_not_hang(tmp_path: Path) -> None:
    """Regression: a watchdog child forked from a process whose libgomp had run 2-thread regions hung in tblite's
    first parallel region (futex wait on pool threads that do not exist after fork) until the timeout killed it,
    so every molecule of ``executor: serial`` came back as a timeout. The child now sets OpenMP to one thread."""
    script = tmp_path / "forked.py"
    script.write_text(FORKED_AFTER_OPENMP)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(script), str(Path(__file__).parent)], env=env, capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "OK 8 8 []" in out.stdout, out.stdout + out.stderr[-2000:]


def test_single_thread_openmp_sets_every_loaded_runtime() -> None:
    import ctypes

    import torch  # noqa: F401  (loads torch's libgomp)

    from fdc_mol.rewards.worker import loaded_openmp_libraries, single_thread_openmp

    libs = loaded_openmp_libraries()
    assert any("gomp" in p or "omp" in p for p in libs)
    before = [ctypes.CDLL(p).omp_get_max_threads() for p in libs]
    try:
        assert single_thread_openmp() == libs
        assert all(ctypes.CDLL(p).omp_get_max_threads() == 1 for p in libs)
    finally:
        for p, n in zip(libs, before):
            ctypes.CDLL(p).omp_set_num_threads(n)
