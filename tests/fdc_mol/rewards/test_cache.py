"""Content-addressed cache: hits, key sensitivity, concurrent writers, surviving a kill."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sqlite3
import time

import numpy as np

from fdc_mol.rewards import make_reward
from fdc_mol.rewards.cache import EnergyCache
from fdc_mol.rewards.worker import OneResult


def test_cache_hits_are_identical_and_cheap(qm9_molecules, tmp_path) -> None:
    mols = qm9_molecules[:20]
    reward = make_reward("gfn2", executor="serial", cache_dir=tmp_path)
    t0 = time.perf_counter()
    first = reward(mols)
    t_miss = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = make_reward("gfn2", executor="serial", cache_dir=tmp_path)(mols)  # a new reward, same directory
    t_hit = time.perf_counter() - t0
    np.testing.assert_array_equal(first.energy, again.energy)
    for a, b in zip(first.grad, again.grad):
        np.testing.assert_array_equal(a, b)
    assert (again.extras["cached"] == 1.0).all() and (first.extras["cached"] == 0).all()
    assert t_hit < 0.5 * t_miss, (t_hit, t_miss)
    print(f"20 molecules: miss {t_miss * 1e3:.1f} ms, hit {t_hit * 1e3:.1f} ms")


def test_cache_key_rounding_method_and_failures(qm9_molecules, tmp_path) -> None:
    m = qm9_molecules[2]
    reward = make_reward("gfn1", executor="serial", watchdog=False, cache_dir=tmp_path)
    base = reward([m])
    tiny = type(m)(x=m.x.double() + 1e-9, a=m.a, c=m.c, bonds=m.bonds)  # same point on the 1e-6 Å grid
    moved = type(m)(x=m.x.double() + 1e-4, a=m.a, c=m.c, bonds=m.bonds)
    r = reward([tiny, moved])
    assert (tiny.x != m.x.double()).all()
    assert r.extras["cached"].tolist() == [1.0, 0.0]
    assert r.energy[0] == base.energy[0] and r.energy[1] != base.energy[0]
    other = make_reward("gfn2", executor="serial", watchdog=False, cache_dir=tmp_path)([m])
    assert other.extras["cached"][0] == 0.0 and other.energy[0] != base.energy[0]
    loose = make_reward("gfn1", executor="serial", watchdog=False, cache_dir=tmp_path, accuracy=0.1)([m])
    assert loose.extras["cached"][0] == 0.0
    # deterministic failures are cached with their reason; transient ones (timeouts, crashes) are not
    bad = type(m)(x=m.x.clone(), a=m.a, c=m.c, bonds=m.bonds)
    bad.x[1] = bad.x[0]
    f1 = reward([bad])
    f2 = reward([bad])
    assert f2.extras["cached"][0] == 1.0 and f2.reason == f1.reason and np.isnan(f2.value[0])
    cache = EnergyCache(tmp_path)
    n = len(cache)
    assert cache.put_many([("k-transient", OneResult(float("nan"), None, False, "timeout", {}, True))]) == 0
    assert len(cache) == n


def _writer(path: str, tag: str, n: int, delay: float) -> None:
    cache = EnergyCache(path)
    rng = np.random.default_rng(abs(hash(tag)) % 2**32)
    for k in range(n):
        g = rng.normal(size=(4, 3))
        cache.put_many([(f"{tag}-{k}", OneResult(-float(k), g, True, "", {"strain": 0.1 * k}))])
        if delay:
            time.sleep(delay)


def test_concurrent_writers_and_kill_leave_a_consistent_database(tmp_path) -> None:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), f"w{i}", 150, 0.0)) for i in range(2)]
    victim = ctx.Process(target=_writer, args=(str(tmp_path), "victim", 100000, 0.0))
    for p in [*procs, victim]:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    time.sleep(0.3)
    os.kill(victim.pid, signal.SIGKILL)  # killed in the middle of writing
    victim.join(10)
    con = sqlite3.connect(tmp_path / EnergyCache.FILENAME)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()
    cache = EnergyCache(tmp_path)
    hits = cache.get_many([f"w{i}-{k}" for i in range(2) for k in range(150)])
    assert len(hits) == 300
    h = hits["w1-7"]
    assert h.energy == -7.0 and h.grad.shape == (4, 3) and h.extras == {"strain": 0.1 * 7}
    n_victim = len(cache) - 300
    assert n_victim >= 1
    last = cache.get_many([f"victim-{n_victim - 1}"])
    assert last[f"victim-{n_victim - 1}"].energy == -float(n_victim - 1)
