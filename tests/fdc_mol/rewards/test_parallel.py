"""Executors, input order, hard timeouts, crash retries, and Dask on loopback."""

from __future__ import annotations

import faulthandler
import os
import signal
import time
from concurrent.futures import Executor, Future
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pytest

from fdc_mol.rewards import SerialExecutor, make_executor, make_reward
from fdc_mol.rewards import worker as worker_mod
from fdc_mol.rewards.parallel import LocalPool, parse_executor_spec


def test_parse_executor_spec() -> None:
    assert parse_executor_spec("serial") == ("serial", None)
    assert parse_executor_spec("local:3") == ("local", 3)
    assert parse_executor_spec("local")[1] >= 1
    assert parse_executor_spec("dask://127.0.0.1:8786") == ("dask", "tcp://127.0.0.1:8786")
    assert parse_executor_spec("dask://scheduler.example.org:8786/") == ("dask", "tcp://scheduler.example.org:8786")
    for bad in ("local:0", "local:x", "dask://host", "threads", ""):
        with pytest.raises(ValueError, match="executor spec"):
            parse_executor_spec(bad)
    assert isinstance(make_executor("serial"), SerialExecutor)
    with pytest.raises(ValueError, match="cannot connect to the Dask scheduler at tcp://127.0.0.1:9"):
        make_executor("dask://127.0.0.1:9", connect_timeout_s=2.0)


def _reference(mols, **kw):
    return make_reward("gfn2", executor="serial", watchdog=False, **kw)(mols)


def _assert_same(a, b) -> None:
    np.testing.assert_array_equal(a.ok, b.ok)
    np.testing.assert_allclose(a.energy, b.energy, rtol=0, atol=1e-10)
    for ga, gb in zip(a.grad, b.grad):
        np.testing.assert_allclose(ga, gb, rtol=0, atol=1e-9)


@pytest.mark.slow
def test_local_pool_two_workers_in_order_and_survives_killed_workers(qm9_molecules) -> None:
    mols = qm9_molecules[:24]
    ref = _reference(mols)
    with make_reward("gfn2", executor="local:2", chunk_size=3) as reward:
        _assert_same(reward(mols), ref)
        pool = reward.executor
        assert isinstance(pool, LocalPool) and pool.n_workers == 2
        pool.kill_workers()  # a crashed pool loses nothing: rebuilt, chunks retried
        time.sleep(0.3)
        _assert_same(reward(mols[::-1]), _reference(mols[::-1]))


class FlakyExecutor(Executor):
    """Serial executor whose first ``n_fail`` tasks fail as if their worker process died."""

    def __init__(self, n_fail: int) -> None:
        self.n_fail = n_fail
        self.inner = SerialExecutor()

    def submit(self, fn, /, *args, **kwargs) -> Future:  # noqa: ANN001, ANN002, ANN003
        if self.n_fail > 0:
            self.n_fail -= 1
            fut: Future = Future()
            fut.set_exception(BrokenProcessPool("a child process terminated abruptly"))
            return fut
        return self.inner.submit(fn, *args, **kwargs)


def test_crashed_task_is_retried_once_then_failed(qm9_molecules) -> None:
    mols = qm9_molecules[:6]
    ref = _reference(mols)
    res = make_reward("gfn2", executor=FlakyExecutor(2), chunk_size=2, watchdog=False)(mols)
    _assert_same(res, ref)  # two chunks crashed once each, retried, nothing lost
    res = make_reward("gfn2", executor=FlakyExecutor(100), chunk_size=2, watchdog=False)(mols)
    assert not res.ok.any() and np.isnan(res.value).all()
    assert all("worker failed twice" in r and "BrokenProcessPool" in r for r in res.reason)


def _patched_engine(monkeypatch, bad_n_atoms: int, action: str, marker: str | None = None) -> None:
    real = worker_mod._engine_function

    def make(spec, s):  # noqa: ANN001, ANN202
        if spec.n_atoms == bad_n_atoms:
            if action == "hang":
                time.sleep(60)
            elif action == "segfault" and (marker is None or not os.path.exists(marker)):
                if marker is not None:
                    open(marker, "w").close()
                faulthandler.disable()  # no traceback dump from the deliberately crashing child
                os.kill(os.getpid(), signal.SIGSEGV)
        return real(spec, s)

    monkeypatch.setitem(worker_mod.ENGINE_FACTORY, "make", make)


def test_hanging_engine_is_killed_at_the_timeout(qm9_molecules, monkeypatch) -> None:
    mols = qm9_molecules[:6]  # atom counts 5, 4, 3, 4, 3, 6
    ref = _reference(mols)
    _patched_engine(monkeypatch, bad_n_atoms=mols[2].n_atoms, action="hang")
    t0 = time.monotonic()
    res = make_reward("gfn2", executor="serial", timeout_s=1.0)(mols)
    elapsed = time.monotonic() - t0
    hung = [m.n_atoms == mols[2].n_atoms for m in mols]
    assert elapsed < 2 * 1.0 * sum(hung) + 3.0, elapsed
    for k, h in enumerate(hung):
        if h:
            assert not res.ok[k] and np.isnan(res.value[k]) and "timeout" in res.reason[k]
        else:
            assert res.ok[k] and res.energy[k] == pytest.approx(ref.energy[k], abs=1e-10)


def test_crashing_engine_is_retried_once(qm9_molecules, monkeypatch, tmp_path) -> None:
    mols = qm9_molecules[:6]
    ref = _reference(mols)
    n_bad = mols[0].n_atoms  # methane (5 atoms): only molecule 0
    _patched_engine(monkeypatch, n_bad, "segfault", marker=str(tmp_path / "crashed_once"))
    res = make_reward("gfn2", executor="serial")(mols)
    _assert_same(res, ref)  # crashed once, retried in a fresh child, fine
    _patched_engine(monkeypatch, n_bad, "segfault")  # crashes every time
    res = make_reward("gfn2", executor="serial")(mols)
    assert not res.ok[0] and "crashed twice" in res.reason[0] and "SIGSEGV" in res.reason[0]
    assert res.ok[1:].all()
    np.testing.assert_allclose(res.energy[1:], ref.energy[1:], rtol=0, atol=1e-10)


@pytest.mark.slow
def test_dask_local_cluster_on_loopback(qm9_molecules) -> None:
    distributed = pytest.importorskip("distributed")
    mols = qm9_molecules[:12]
    ref = _reference(mols)
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=2, processes=True, host="127.0.0.1", dashboard_address=None, silence_logs=50
    ) as cluster:
        port = cluster.scheduler_address.rsplit(":", 1)[1]
        with make_reward("gfn2", executor=f"dask://127.0.0.1:{port}", chunk_size=4) as reward:
            res = reward(mols[::-1])
            _assert_same(res, _reference(mols[::-1]))
            res = reward(mols)
            _assert_same(res, ref)


def test_unguarded_main_is_detected_from_the_workers_marker_file() -> None:
    """A spawned worker that finds an unguarded main script leaves a marker for its parent, so the parent falls back
    to serial evaluation even when the broken pool is reported before the worker's exit status is seen."""
    from fdc_mol.rewards.parallel import _unguarded_marker

    pool = LocalPool(1)
    try:
        assert not pool.unguarded_main()
        open(_unguarded_marker(os.getpid()), "w").close()  # what the worker writes before exiting
        assert pool.unguarded_main() and not os.path.exists(_unguarded_marker(os.getpid()))
        assert pool.unguarded_main()  # remembered
    finally:
        pool.shutdown()
    open(_unguarded_marker(os.getpid()), "w").close()
    LocalPool(1).shutdown()  # a new pool clears a stale marker left under this pid
    assert not os.path.exists(_unguarded_marker(os.getpid()))
