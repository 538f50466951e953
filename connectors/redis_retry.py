"""Writes to Redis that wait for it: an outage holds the flow back instead of losing a write or skipping a guard.

Bytewax has no way to retry a batch later, and dropping a feature write or a
guard check is never right, so a step that talks to Redis retries with
exponential backoff (0.2 s doubling to 10 s) until Redis answers; the
flow's input waits meanwhile (backpressure). A Redis that restarts from its
append-only file answers again with its data; ``tests/test_faults.py`` kills
one mid-stream.

A SIGINT ends the wait (:mod:`connectors.stopping`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import redis
from redis.exceptions import ClusterDownError, SlotNotCoveredError, TryAgainError

from connectors.stopping import STOPPING, StoppedWaiting

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_FIRST_S = 0.2
RETRY_MAX_S = 10.0

#: what a Redis that is away answers: a lost connection (BusyLoadingError, a restart, is one too) or a
#: cluster that is reorganising (slots uncovered while a replica takes over, keys being moved)
TRANSIENT = (redis.ConnectionError, redis.TimeoutError, ClusterDownError, TryAgainError, SlotNotCoveredError)


def until_redis_answers(what: str, attempt: Callable[[], T], on_failure: Callable[[], None] | None = None) -> T:
    """``attempt()`` until it does not fail for a lost connection; ``on_failure`` counts each failure.

    Raises :class:`~connectors.stopping.StoppedWaiting` when the process is stopping and Redis is still away."""
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
