"""Worker side: evaluate a chunk of molecules, each engine call under a watchdog.

:func:`evaluate_chunk` is the task sent to any executor. With ``settings.watchdog`` (default) it
forks one child process per chunk that evaluates the molecules in order and streams each result
back through a pipe; the worker watches the clock per molecule. A molecule that runs past
``timeout_s`` gets its child killed (SIGKILL) and is marked failed; a child that crashes (segfault,
abort, OOM kill) has its current molecule retried once in a fresh child, then marked failed; the
rest of the chunk continues in a fresh child. Without the watchdog, timeouts are only checked
between engine calls (relaxation steps) and after each call.

This module imports only numpy at the top (no torch): the engines are imported on first use and
stay imported in the worker process for later tasks.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import NamedTuple

import numpy as np

from fdc_mol.rewards.base import MolSpec, RewardSettings
from fdc_mol.rewards.gate import check_gate, spin_uhf
from fdc_mol.rewards.xtb import EnergyFn, EngineError

__all__ = ["OneResult", "evaluate_chunk", "evaluate_one", "watch_parent"]


class OneResult(NamedTuple):
    """Result for one molecule: energy (Eh), dE/dx (n,3) Eh/Å, ok, reason, extras (Eh), transient.

    ``transient`` marks failures that depend on the machine rather than on the molecule (timeouts,
    crashes); they are not cached.
    """

    energy: float
    grad: np.ndarray | None
    ok: bool
    reason: str
    extras: dict
    transient: bool = False


class EngineTimeout(EngineError):
    """The per-molecule time limit passed."""


def _fail(reason: str, transient: bool = False) -> OneResult:
    return OneResult(float("nan"), None, False, reason, {}, transient)


def _with_deadline(fn: EnergyFn, deadline: float, timeout_s: float) -> EnergyFn:
    def wrapped(x: np.ndarray) -> tuple[float, np.ndarray]:
        if time.monotonic() > deadline:
            raise EngineTimeout(f"timeout: no result within timeout_s = {timeout_s:g} s")
        out = fn(x)
        if time.monotonic() > deadline:
            raise EngineTimeout(f"timeout: no result within timeout_s = {timeout_s:g} s")
        return out

    return wrapped


def _engine_function(spec: MolSpec, s: RewardSettings) -> EnergyFn:
    if s.method == "mmff94":
        from fdc_mol.rewards.rdkit_ff import make_mmff_function

        return make_mmff_function(spec)
    from fdc_mol.rewards.xtb import make_xtb_function

    uhf, _ = spin_uhf(spec, s)
    return make_xtb_function(spec.z, spec.x, spec.charge, uhf, s)


# Indirection so that tests can swap in a crashing or hanging engine (inherited by forked children).
ENGINE_FACTORY = {"make": _engine_function}


def evaluate_one(spec: MolSpec, s: RewardSettings, deadline: float | None = None) -> OneResult:
    """Gate, then energy and gradient (and relaxation if configured) for one molecule. Never raises."""
    if deadline is None:
        deadline = time.monotonic() + s.timeout_s
    try:
        reason = check_gate(spec, s)
        if reason:
            return _fail(reason)
        fn = _with_deadline(ENGINE_FACTORY["make"](spec, s), deadline, s.timeout_s)
        e, g = fn(spec.x)
        if not np.isfinite(e) or not np.isfinite(g).all():
            return _fail(f"{s.label} returned a non-finite energy or gradient")
        extras: dict = {}
        if s.relax is not None:
            try:
                if s.relax == "mmff":
                    from fdc_mol.rewards.rdkit_ff import mmff_relax_positions

                    e_rel, _ = fn(mmff_relax_positions(spec, s.relax_max_steps))
                else:
                    from fdc_mol.rewards.xtb import relax_with

                    _, e_rel = relax_with(fn, spec.x, s.relax_max_steps, s.relax_gtol)
            except EngineTimeout:
                raise
            except EngineError as err:
                return _fail(f"relaxation ({s.relax}) failed: {err}")
            extras = {"relaxed_energy": e_rel, "strain": e - e_rel}
        return OneResult(float(e), np.asarray(g, np.float64), True, "", extras)
    except EngineTimeout as err:
        return _fail(str(err), transient=True)
    except EngineError as err:
        return _fail(str(err))
    except Exception as err:  # noqa: BLE001 - never let one molecule take the batch down
        return _fail(f"unexpected error: {type(err).__name__}: {err}")


def _set_single_thread() -> None:
    """One OpenMP/BLAS thread, effective if set before the engines' libraries are first loaded."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"


def _preload(s: RewardSettings) -> None:
    """Import the engine modules once in this process, so forked children inherit them."""
    import sys

    if s.engine == "tblite" and "tblite.interface" not in sys.modules:
        if "tblite" not in sys.modules:
            _set_single_thread()
        import tblite.interface  # noqa: F401
    elif s.engine == "xtb" and "xtb.interface" not in sys.modules:
        if "xtb" not in sys.modules:
            _set_single_thread()
        try:
            import xtb.interface  # noqa: F401
        except ImportError:
            pass
    import rdkit.Chem  # noqa: F401


def evaluate_chunk(specs: list[MolSpec], s: RewardSettings) -> list[OneResult]:
    """Evaluate molecules in order (the executor task). Never raises for a molecule's sake."""
    _preload(s)
    if not s.watchdog or not hasattr(os, "fork"):
        return [evaluate_one(sp, s) for sp in specs]
    return _evaluate_isolated(specs, s)


def watch_parent(parent_pid: int, interval_s: float = 0.5) -> threading.Thread:
    """Start a daemon thread that ends this process (``os._exit(1)``) once ``parent_pid`` is no
    longer its parent (the parent died, even by SIGKILL, and the process was re-parented), so that
    no worker outlives a killed run. ``interval_s``: polling period, s."""

    def run() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(interval_s)

    t = threading.Thread(target=run, name="fdc-mol-parent-watch", daemon=True)
    t.start()
    return t


def loaded_openmp_libraries() -> list[str]:
    """Paths of the OpenMP runtimes (libgomp, libiomp, libomp) mapped into this process (Linux; [] elsewhere)."""
    try:
        with open("/proc/self/maps") as fh:
            paths = {line.split()[-1] for line in fh if len(line.split()) >= 6}
    except OSError:
        return []
    return sorted(p for p in paths if any(n in os.path.basename(p) for n in ("libgomp", "libiomp", "libomp")))


def single_thread_openmp() -> list[str]:
    """Set every loaded OpenMP runtime to one thread (``omp_set_num_threads(1)``); returns the libraries set.

    A forked child inherits the parent's OpenMP thread pool as bookkeeping without its threads. When the parent
    had run a parallel region on more than one thread (e.g. torch in the same process, whose libgomp tblite then
    shares) and the child opens a multi-threaded region (tblite's repulsion), libgomp waits forever on threads
    that do not exist (observed: the engine child stuck in futex_wait inside libgomp until the watchdog killed
    it). One thread never touches the pool. Environment variables are too late here: the runtime already read them.
    """
    import ctypes

    done = []
    for path in loaded_openmp_libraries():
        try:
            ctypes.CDLL(path).omp_set_num_threads(1)
            done.append(path)
        except (OSError, AttributeError):
            continue
    return done


def _child_main(specs: list[MolSpec], todo: list[int], s: RewardSettings, conn, parent_pid: int) -> None:  # noqa: ANN001
    try:
        single_thread_openmp()  # before any engine call: the inherited OpenMP pool has no threads
        watch_parent(parent_pid)  # the engine child dies with its worker
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for i in todo:
            conn.send((i, evaluate_one(specs[i], s)))
        conn.send(None)
        conn.close()
    finally:
        os._exit(0)


def _describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"killed by signal {name}"
    return f"exit status {os.WEXITSTATUS(status) if os.WIFEXITED(status) else status}"


def _evaluate_isolated(specs: list[MolSpec], s: RewardSettings) -> list[OneResult]:
    from multiprocessing import Pipe

    results: list[OneResult | None] = [None] * len(specs)
    attempts = [0] * len(specs)
    todo = list(range(len(specs)))
    while todo:
        reader, writer = Pipe(duplex=False)
        parent_pid = os.getpid()
        pid = os.fork()
        if pid == 0:  # child
            reader.close()
            _child_main(specs, todo, s, writer, parent_pid)
        writer.close()
        pos, t_last, restart = 0, time.monotonic(), None
        try:
            while pos < len(todo):
                i = todo[pos]
                remaining = s.timeout_s - (time.monotonic() - t_last)
                msg = None
                try:
                    if remaining > 0 and reader.poll(remaining):
                        msg = reader.recv()
                    else:
                        os.kill(pid, signal.SIGKILL)
                        results[i] = _fail(
                            f"timeout: engine did not finish within timeout_s = {s.timeout_s:g} s (killed)",
                            transient=True,
                        )
                        restart = pos + 1
                        break
                except (EOFError, OSError):
                    _, status = os.waitpid(pid, 0)
                    pid = -1
                    attempts[i] += 1
                    if attempts[i] >= 2:
                        results[i] = _fail(
                            f"engine process crashed twice ({_describe_exit(status)}); retried once", transient=True
                        )
                        restart = pos + 1
                    else:
                        restart = pos
                    break
                if msg is None:  # end-of-chunk marker before all results: treat as a crash of molecule i
                    results[i] = _fail("internal error: engine child ended before this molecule", transient=True)
                    restart = pos + 1
                    break
                j, res = msg
                results[j] = res
                pos += 1
                t_last = time.monotonic()
        finally:
            reader.close()
            if pid > 0:  # all results are in (or the child is abandoned): make sure it is gone
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                os.waitpid(pid, 0)
        todo = todo[restart:] if restart is not None else []
    return [r if r is not None else _fail("internal error: no result produced") for r in results]
