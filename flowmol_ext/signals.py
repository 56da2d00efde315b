"""SIGTERM / SIGINT as an exception, so that a run stops cleanly and exits with 128 + signum.

:func:`install` (called by the ``fdc-mol`` entry point) makes SIGTERM and SIGINT raise
:class:`Interrupted`, a ``BaseException`` like ``KeyboardInterrupt`` (``except Exception`` does not
swallow it; ``finally`` blocks and context managers run, so worker pools are shut down). Inside
:func:`deferred` (pretraining wraps ``Trainer.fit`` in it) the first signal is only recorded; the
training loop checks :func:`pending` at the next batch boundary, saves a checkpoint and raises.
A second signal while deferred raises at once. A schedulers' SIGTERM therefore never exits 0.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = ["Interrupted", "deferred", "install", "pending", "restore", "take"]


class Interrupted(BaseException):
    """The process received ``signum``; ``exit_code`` is 128 + signum (143 for SIGTERM, 130 for SIGINT)."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        try:
            self.name = signal.Signals(self.signum).name
        except ValueError:
            self.name = f"signal {self.signum}"
        super().__init__(f"received {self.name}")


_state: dict = {"defer": 0, "pending": None}


def _handler(signum: int, frame: FrameType | None) -> None:
    if _state["defer"] and _state["pending"] is None:
        _state["pending"] = signum
        return
    raise Interrupted(signum)


def install(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> dict[int, object]:
    """Make ``signals`` raise :class:`Interrupted` in the main thread (no-op elsewhere). Returns the
    previous handlers (for :func:`restore`)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, _handler) for s in signals}


def restore(previous: dict[int, object]) -> None:
    """Put back the handlers :func:`install` returned."""
    for s, h in previous.items():
        if h is not None:
            signal.signal(s, h)


def pending() -> int | None:
    """The signal number received inside :func:`deferred` and not yet acted on, or None."""
    return _state["pending"]


def take() -> int | None:
    """Like :func:`pending`, and forget it (the caller acts on it, e.g. raises :class:`Interrupted`)."""
    sig, _state["pending"] = _state["pending"], None
    return sig


@contextmanager
def deferred() -> Iterator[None]:
    """Record the first SIGTERM/SIGINT instead of raising; the caller polls :func:`pending`."""
    _state["defer"] += 1
    try:
        yield
    finally:
        _state["defer"] -= 1
        sig = None if _state["defer"] else _state["pending"]
        if not _state["defer"]:
            _state["pending"] = None
    if sig is not None:  # only when the body finished normally: a signal arrived after its last check
        raise Interrupted(sig)
