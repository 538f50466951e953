"""The timing of one stage, shared by the Bytewax stages and the peer engines' jobs.

Standard library only: the peer jobs (``benchmarks/peers/``) run in their own
virtualenvs, without Bytewax or nudgeflow, and must measure exactly as the
Bytewax stages do so their figures sit in the same table.
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def rss_mb(field: str = "VmRSS") -> float:
    """Resident memory of this process in MB: ``VmRSS`` now or ``VmHWM``, its peak.

    Not ``getrusage().ru_maxrss``: Linux carries that across fork and exec, so
    a stage would report the harness's peak whenever the harness was bigger.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def measure(events: int, run: Callable[[], None], close: Callable[[], None] = lambda: None) -> tuple[dict[str, Any], float]:
    """Run a flow (``run``) and its final flushes (``close``), timed: the figures and the start's perf_counter.

    CPU is ``process_time``: every thread of this process (the engine, librdkafka, chDB, writers).
    """
    rss_start = rss_mb()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    c0 = time.process_time()
    w0 = time.perf_counter()
    run()
    w_flow = time.perf_counter()
    close()
    w1 = time.perf_counter()
    c1 = time.process_time()
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    res: dict[str, Any] = {
        "events": events,
        "wall_s": w1 - w0,
        "flow_s": w_flow - w0,
        "close_s": w1 - w_flow,
        "cpu_s": c1 - c0,
        "user_s": ru1.ru_utime - ru0.ru_utime,
        "sys_s": ru1.ru_stime - ru0.ru_stime,
        "rss_start_mb": rss_start,
        "max_rss_mb": rss_mb("VmHWM"),
        "ctx_switches_inv": ru1.ru_nivcsw - ru0.ru_nivcsw,
    }
    res["eps"] = events / res["wall_s"]
    res["us_cpu_per_event"] = res["cpu_s"] / events * 1e6
    return res, w0


def stage_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments every stage process takes: ``benchmarks.run`` starts nudgeflow's stages and the peers' alike."""
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--events", type=int, required=True, help="messages on the topic")
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--redis-url", required=True)
    p.add_argument("--prefix", required=True)
