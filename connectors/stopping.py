"""A stop request that every wait for an outside service honours: a SIGINT ends those waits.

A step that waits for Redis (``connectors/redis_retry.py``) or for the
ClickHouse writer (an epoch's rows, ``connectors/clickhouse.py``) is inside a
step, where Bytewax's own SIGINT handling (between activations) never reaches
it while the service is away. :func:`stop_waiting_on_interrupt` makes a SIGINT
set :data:`STOPPING` as well; the waits check it and fail with
:class:`StoppedWaiting`, so the worker stops (with recovery on, the next run
resumes from the last snapshot, as after any crash).
"""

from __future__ import annotations

import signal
import threading

#: set by a SIGINT (see :func:`stop_waiting_on_interrupt`): a wait for a service gives up
STOPPING = threading.Event()


class StoppedWaiting(RuntimeError):
    """The process was asked to stop while a step waited for a service that is away."""


def stop_waiting_on_interrupt() -> None:
    """Make SIGINT also end every wait for a service, then do what it did before (Bytewax stops its workers
    on the ``KeyboardInterrupt`` of Python's default handler). Only the main thread may set a handler:
    called from elsewhere it does nothing."""
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
