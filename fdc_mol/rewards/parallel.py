"""Executors for reward evaluation and the chunked, crash-tolerant dispatcher.

``make_executor(spec)`` understands ``"serial"`` (in this process), ``"local"`` / ``"local:N"`` (a
process pool of N workers, default: the CPUs this process may use; each worker runs one OpenMP
thread) and ``"dask://host:port"`` (a Dask distributed client's executor). Any other
``concurrent.futures.Executor`` works too. :func:`run_chunks` submits chunks of molecules, collects
results in input order, and retries a chunk whose worker crashed once before marking it failed.

Worker lifetime: a local pool's workers poll their parent's pid (every 0.5 s) and exit when the
parent is gone (SIGKILLed or killed by a signal it did not handle), so no orphan keeps computing;
:meth:`LocalPool.shutdown` without waiting terminates the workers (clean shutdown on SIGTERM).

Scripts without an ``if __name__ == "__main__":`` guard: the pool's workers are *spawned* and
re-import the main script; a script that evaluates rewards at import time would start pools
recursively. A worker detects that and exits with :data:`UNGUARDED_MAIN_EXIT`; the parent then
warns once and evaluates in its own process (serial) instead. See docs/rewards.md.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, wait
from concurrent.futures import ThreadPoolExecutor as _ThreadPoolExecutor

from fdc_mol.rewards.base import MolSpec, RewardSettings
from fdc_mol.rewards.worker import OneResult, evaluate_chunk, watch_parent

__all__ = ["LocalPool", "SerialExecutor", "executor_workers", "make_executor", "parse_executor_spec", "run_chunks"]

log = logging.getLogger(__name__)


class SerialExecutor(Executor):
    """Runs each task at submit time in the calling process (no parallelism, no pickling)."""

    def submit(self, fn: Callable, /, *args, **kwargs) -> Future:  # noqa: ANN002, ANN003
        fut: Future = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as err:  # noqa: BLE001 - delivered through the future
            fut.set_exception(err)
        return fut


UNGUARDED_MAIN_EXIT = 87  # exit status of a spawned worker that found the main script re-entering the pool

_UNGUARDED_HELP = (
    "this script evaluates rewards at import time, without `if __name__ == \"__main__\":`; the local process "
    "pool's workers are spawned and re-import the script, so they cannot start. Put the script's code under "
    "that guard to use the pool, or pass executor=\"serial\" (see docs/rewards.md)"
)


def _init_local_worker(parent_pid: int | None = None) -> None:
    """Process-pool initializer: one OpenMP/BLAS thread; Ctrl-C is handled by the parent only; exit
    when the parent dies."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if parent_pid is not None:
        watch_parent(parent_pid)


def _bootstrapping_worker() -> bool:
    """True inside a spawned process that is still importing the parent's main script."""
    import multiprocessing as mp

    return bool(getattr(mp.current_process(), "_inheriting", False))


def _unguarded_marker(parent_pid: int) -> str:
    """Path of the file a spawned worker leaves for ``parent_pid`` when the main script has no guard."""
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"fdc-mol-unguarded-main-{parent_pid}")


def _remove_unguarded_marker(pid: int) -> bool:
    """Remove this process's unguarded-main marker; True if there was one."""
    try:
        os.remove(_unguarded_marker(pid))
        return True
    except OSError:
        return False


class LocalPool(ProcessPoolExecutor):
    """A process pool (spawn start method) whose workers run one OpenMP thread each and exit with
    their parent."""

    def __init__(self, max_workers: int) -> None:
        import multiprocessing as mp

        if _bootstrapping_worker():
            # We are a spawned worker re-running an unguarded main script: starting a pool here would
            # recurse. Tell the user and let the parent fall back to serial evaluation. The marker file
            # tells the parent even when the pool reports the break before this exit status is seen.
            print(f"fdc-mol reward worker: {_UNGUARDED_HELP}", file=sys.stderr, flush=True)
            try:
                open(_unguarded_marker(os.getppid()), "w").close()
            except OSError:
                pass
            os._exit(UNGUARDED_MAIN_EXIT)
        _remove_unguarded_marker(os.getpid())  # a stale marker of an earlier process with this pid
        self.n_workers = int(max_workers)
        self._all_processes: list = []
        super().__init__(max_workers=self.n_workers, mp_context=mp.get_context("spawn"),
                         initializer=_init_local_worker, initargs=(os.getpid(),))

    def _spawn_process(self) -> None:
        super()._spawn_process()
        # Under load the first workers can exit (unguarded main script) while later ones are still being
        # spawned: remember that before dropping finished processes from the list.
        self._saw_unguarded = getattr(self, "_saw_unguarded", False) or any(
            p.exitcode == UNGUARDED_MAIN_EXIT for p in self._all_processes)
        self._all_processes = [p for p in self._all_processes if p.exitcode is None]
        self._all_processes.extend(p for p in self._processes.values() if p not in self._all_processes)

    def unguarded_main(self) -> bool:
        """True if a worker exited because the main script has no ``__main__`` guard."""
        if _remove_unguarded_marker(os.getpid()):
            self._saw_unguarded = True
        if getattr(self, "_saw_unguarded", False):
            return True
        for p in self._all_processes:
            if not p.is_alive() and p.exitcode == UNGUARDED_MAIN_EXIT:  # is_alive() reaps a dead child
                return True
        return False

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Shut down; without ``wait``, also terminate (SIGTERM) the workers instead of letting them
        finish their current task (what a SIGTERMed parent needs)."""
        procs = list((getattr(self, "_processes", None) or {}).values())
        super().shutdown(wait=wait, cancel_futures=cancel_futures)
        if not wait:
            for p in procs:
                try:
                    p.terminate()
                except Exception:  # noqa: BLE001 - already gone
                    pass

    def kill_workers(self) -> None:
        """SIGKILL every worker process (used when a worker hangs outside the per-molecule watchdog)."""
        for p in list((getattr(self, "_processes", None) or {}).values()):
            try:
                p.kill()
            except Exception:  # noqa: BLE001
                pass


def _available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


_SPEC_HELP = "valid executor specs: 'serial', 'local', 'local:N' (N >= 1 workers), 'dask://host:port'"


def parse_executor_spec(spec: str) -> tuple[str, str | int | None]:
    """Parse a spec into ("serial", None), ("local", n_workers) or ("dask", "tcp://host:port").

    Raises ``ValueError`` naming the spec and the valid forms.
    """
    if not isinstance(spec, str):
        raise ValueError(f"executor spec must be a string, got {type(spec).__name__}; {_SPEC_HELP}")
    s = spec.strip()
    if s == "serial":
        return "serial", None
    if s == "local":
        return "local", _available_cpus()
    m = re.fullmatch(r"local:(\d+)", s)
    if m:
        n = int(m.group(1))
        if n < 1:
            raise ValueError(f"executor spec '{spec}': the worker count must be >= 1; {_SPEC_HELP}")
        return "local", n
    m = re.fullmatch(r"dask://([^:/\s]+|\[[0-9a-fA-F:]+\]):(\d+)/?", s)
    if m:
        return "dask", f"tcp://{m.group(1)}:{m.group(2)}"
    raise ValueError(f"unknown executor spec '{spec}'; {_SPEC_HELP}")


def make_executor(spec: str, connect_timeout_s: float = 20.0) -> Executor:
    """Build an executor from a spec string (see module docstring). Raises ``ValueError`` on bad specs.

    ``connect_timeout_s``: how long to try reaching a Dask scheduler, s.
    """
    kind, arg = parse_executor_spec(spec)
    if kind == "serial":
        return SerialExecutor()
    if kind == "local":
        return LocalPool(int(arg))
    try:
        from distributed import Client
    except ImportError:
        raise ValueError(f"executor spec '{spec}' needs dask.distributed: pip install 'fdc-mol[dask]'") from None
    try:
        client = Client(arg, timeout=f"{connect_timeout_s}s", set_as_default=False)
    except Exception as err:  # noqa: BLE001 - OSError / TimeoutError from distributed
        raise ValueError(f"cannot connect to the Dask scheduler at {arg}: {err}") from None
    return client.get_executor(pure=False)


def executor_workers(executor: Executor) -> int:
    """Number of tasks the executor runs at once (best effort; 1 if unknown)."""
    if isinstance(executor, SerialExecutor):
        return 1
    if isinstance(executor, (ProcessPoolExecutor, _ThreadPoolExecutor)):
        return int(getattr(executor, "_max_workers", 1) or 1)
    client = getattr(executor, "_client", None)
    if client is not None:
        try:
            workers = client.scheduler_info().get("workers", {})
            return max(1, sum(int(w.get("nthreads", 1)) for w in workers.values()))
        except Exception:  # noqa: BLE001
            return 1
    return 1


def shutdown_executor(executor: Executor) -> None:
    """Shut an executor down (and close its Dask client, if any)."""
    client = getattr(executor, "_client", None)
    try:
        executor.shutdown(wait=False, cancel_futures=True)
    except TypeError:
        executor.shutdown(wait=False)
    if client is not None:
        client.close()


def run_chunks(
    executor: Executor,
    chunks: list[list[MolSpec]],
    settings: RewardSettings,
    rebuild: Callable[[], Executor] | None = None,
) -> tuple[list[list[OneResult]], Executor]:
    """Evaluate chunks on ``executor``; results per chunk in input order.

    A chunk whose task fails (worker crashed or killed, pool broken, task past its deadline of
    ``2 * len(chunk) * timeout_s + 60`` s) is resubmitted once; if it fails again, its molecules are
    marked failed. ``rebuild`` makes a fresh executor after a failure (for owned local pools); the
    executor in use at the end is returned.
    """
    results: list[list[OneResult] | None] = [None] * len(chunks)
    attempts = [0] * len(chunks)
    todo = list(range(len(chunks)))
    while todo:
        futures: dict[int, Future] = {}
        errors: dict[int, str] = {}
        for ci in todo:
            try:
                futures[ci] = executor.submit(evaluate_chunk, chunks[ci], settings)
            except Exception as err:  # noqa: BLE001 - broken / shut-down executor
                errors[ci] = f"{type(err).__name__}: {err}"
        limit = max((2 * len(chunks[ci]) * settings.timeout_s + 60.0 for ci in futures), default=0.0)
        t0 = time.monotonic()
        if futures:
            wait(list(futures.values()), timeout=limit)
        for ci, fut in futures.items():
            if not fut.done():
                fut.cancel()
                errors[ci] = f"task did not finish within {time.monotonic() - t0:.0f} s"
                continue
            try:
                results[ci] = fut.result()
            except Exception as err:  # noqa: BLE001 - BrokenProcessPool, KilledWorker, CancelledError ...
                errors[ci] = f"{type(err).__name__}: {err}"
        todo = []
        if errors and isinstance(executor, LocalPool) and executor.unguarded_main():
            log.warning("reward evaluation: %s; evaluating in this process instead (serial, slower)",
                        _UNGUARDED_HELP)
            shutdown_executor(executor)
            executor = SerialExecutor()
            todo = sorted(errors)  # not counted as attempts: nothing ran
            continue
        if errors:
            log.warning("reward evaluation: %d task(s) failed (%s); retrying once", len(errors),
                        next(iter(errors.values())))
            if rebuild is not None:
                if isinstance(executor, LocalPool):
                    executor.kill_workers()
                shutdown_executor(executor)
                executor = rebuild()
        for ci, msg in errors.items():
            attempts[ci] += 1
            if attempts[ci] < 2:
                todo.append(ci)
            else:
                reason = f"worker failed twice, molecule not evaluated ({msg})"
                results[ci] = [OneResult(float("nan"), None, False, reason, {}, True) for _ in chunks[ci]]
    return [r if r is not None else [] for r in results], executor
