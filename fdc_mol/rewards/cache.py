"""Content-addressed energy cache: one SQLite database in WAL mode under ``cache_dir``.

Keys come from :meth:`MolSpec.cache_key` (elements, coordinates rounded to 1e-6 Å, charges, bonds,
method and result-relevant settings). SQLite transactions make writes atomic: concurrent writers
(several processes on one machine) serialise on the database lock, and a process killed mid-write
leaves the last committed state. Values: energy (Eh), dE/dx (n,3) Eh/Å, ok, reason, extras.
Transient failures (timeouts, crashes) are never stored.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from pathlib import Path

import numpy as np

from fdc_mol.rewards.worker import OneResult

__all__ = ["CacheError", "EnergyCache"]

log = logging.getLogger(__name__)

_SCHEMA = """CREATE TABLE IF NOT EXISTS energies (
    key TEXT PRIMARY KEY, energy REAL, grad BLOB, n_atoms INTEGER, ok INTEGER NOT NULL,
    reason TEXT NOT NULL, extras TEXT NOT NULL)"""


class CacheError(ValueError):
    """The cache file is unusable (not SQLite, corrupt); the message names it and says what to do."""


def _cache_error(path: Path, err: Exception) -> CacheError:
    return CacheError(f"{path}: energy cache is not a usable SQLite database ({err}); it is only a cache: move it "
                      "away or delete it, and the next run starts an empty one")


class EnergyCache:
    """SQLite (WAL) cache at ``<cache_dir>/energies.sqlite``; one connection per process."""

    FILENAME = "energies.sqlite"

    def __init__(self, cache_dir: str | os.PathLike) -> None:
        self.path = Path(cache_dir) / self.FILENAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._connect()

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            try:
                conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
                conn.execute("PRAGMA busy_timeout = 60000")
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    log.warning("energy cache %s: WAL mode unavailable (journal_mode=%s)", self.path, mode)
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.execute(_SCHEMA)
                conn.execute("SELECT key, energy, grad, n_atoms, ok, reason, extras FROM energies LIMIT 1").fetchall()
            except sqlite3.DatabaseError as err:
                raise _cache_error(self.path, err) from None
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def get_many(self, keys: list[str]) -> dict[str, OneResult]:
        """Look up keys; returns the hits only."""
        out: dict[str, OneResult] = {}
        conn = self._connect()
        uniq = list(dict.fromkeys(keys))
        for start in range(0, len(uniq), 500):
            part = uniq[start:start + 500]
            try:
                rows = conn.execute(
                    f"SELECT key, energy, grad, n_atoms, ok, reason, extras FROM energies "
                    f"WHERE key IN ({','.join('?' * len(part))})",
                    part,
                ).fetchall()
            except sqlite3.DatabaseError as err:
                raise _cache_error(self.path, err) from None
            for key, energy, grad, n, ok, reason, extras in rows:
                g = np.frombuffer(grad, dtype=np.float64).reshape(n, 3).copy() if grad is not None else None
                out[key] = OneResult(
                    float("nan") if energy is None else float(energy), g, bool(ok), reason, json.loads(extras)
                )
        return out

    def put_many(self, items: list[tuple[str, OneResult]]) -> int:
        """Store results in one transaction (transient failures skipped); returns the number stored."""
        rows = [
            (
                key, r.energy if r.ok else None,
                None if r.grad is None else np.ascontiguousarray(r.grad, np.float64).tobytes(),
                None if r.grad is None else int(r.grad.shape[0]), int(r.ok), r.reason, json.dumps(r.extras),
            )
            for key, r in items
            if not r.transient
        ]
        if not rows:
            return 0
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany("INSERT OR REPLACE INTO energies VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as err:
            raise _cache_error(self.path, err) from None
        return len(rows)

    def __len__(self) -> int:
        return int(self._connect().execute("SELECT COUNT(*) FROM energies").fetchone()[0])

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None
