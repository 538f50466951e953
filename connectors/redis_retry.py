"""Writes to Redis that wait for it: an outage holds the flow back instead of losing a write or skipping a guard.

Bytewax has no way to retry a batch later, and dropping a feature write or a
guard check is never right, so a step that talks to Redis retries with
exponential backoff (0.2 s doubling to 10 s) until Redis answers; the
flow's input waits meanwhile (backpressure). A Redis that restarts from its
append-only file answers again with its data; ``tests/test_faults.py`` kills
one mid-stream.

A worker waiting here is inside a step, where Bytewax's own SIGINT handling
(between activations) never reaches it, so :func:`stop_waiting_on_interrupt`
makes a SIGINT end the wait too: the step fails with :class:`StoppedWaiting`
and the worker stops (with recovery on, the next run resumes from the last
snapshot, as after any crash).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from typing import TypeVar

import redis
from redis.exceptions import ClusterDownError, SlotNotCoveredError, TryAgainError

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_FIRST_S = 0.2
RETRY_MAX_S = 10.0

#: what a Redis that is away answers: a lost connection (BusyLoadingError, a restart, is one too) or a
#: cluster that is reorganising (slots uncovered while a replica takes over, keys being moved)
TRANSIENT = (redis.ConnectionError, redis.TimeoutError, ClusterDownError, TryAgainError, SlotNotCoveredError)

#: set by a SIGINT (see :func:`stop_waiting_on_interrupt`): a wait for Redis gives up
STOPPING = threading.Event()


class StoppedWaiting(RuntimeError):
    """The process was asked to stop while a step waited for Redis."""


def stop_waiting_on_interrupt() -> None:
    """Make SIGINT also end every wait for Redis, then do what it did before (Bytewax stops its workers on
    the ``KeyboardInterrupt`` of Python's default handler). Only the main thread may set a handler: called
    from elsewhere it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGINT)
    if getattr(previous, "stops_waits", False):
        return

    def handler(signum: int, frame: object) -> None:
        STOPPING.set()
        if callable(previous):
            previous(signum, frame)

    handler.stops_waits = True  # type: ignore[attr-defined]
    signal.signal(signal.SIGINT, handler)


def until_redis_answers(what: str, attempt: Callable[[], T], on_failure: Callable[[], None] | None = None) -> T:
    """``attempt()`` until it does not fail for a lost connection; ``on_failure`` counts each failure.

    Raises :class:`StoppedWaiting` when the process is stopping (:data:`STOPPING`) and Redis is still away."""
    delay = RETRY_FIRST_S
    while True:
        try:
            return attempt()
        except TRANSIENT as e:
            if on_failure is not None:
                on_failure()
            log.warning("%s failed, retrying in %.1fs: %s", what, delay, e)
            if STOPPING.wait(delay):  # logged here too: a worker thread's error reaches the log as a bare panic
                log.error("%s: stopped while waiting for Redis (%s)", what, e)
                raise StoppedWaiting(f"{what}: stopped while waiting for Redis ({e})") from e
            delay = min(delay * 2, RETRY_MAX_S)
