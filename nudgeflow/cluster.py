"""Several processes of one flow on this machine: Bytewax's own cluster runtime, for ``nudgeflow run --processes N``.

``-w`` worker threads share one GIL, so processes are how a flow uses more
cores. Each process runs the same flow with its index and the addresses of
all of them (what ``python -m bytewax.run … -i I -a "h1:p1;h2:p2"`` does);
Bytewax spreads the Kafka partitions over every worker of every process and
routes keyed state between them. On several machines, start one
``nudgeflow run --process-id I --addresses …`` per machine instead.

What a cluster must share is shared: Redis (an embedded one is started here,
once, and handed to every process) and ClickHouse (chDB lives inside one
process and opens its folder alone, so a cluster writing ClickHouse needs a
server, ``clickhouse.dsn``).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import FrameType


def loopback_addresses(n: int) -> list[str]:
    """``n`` free ``127.0.0.1:port`` addresses for the processes to listen on."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [f"127.0.0.1:{s.getsockname()[1]}" for s in socks]
    finally:
        for s in socks:
            s.close()


def run_processes(config: Path, processes: int, workers: int, flow: str, redis_url: str, metrics_port: int = 0) -> int:
    """Run ``processes`` local processes of one flow until all end; the first failure's exit code, else 0.

    SIGINT and SIGTERM are passed on to every process; when one process fails the others are stopped,
    as a cluster missing a member cannot make progress. With ``metrics_port`` (0: none) process ``i`` serves
    its metrics on ``metrics_port + i``: each counts what it reads and decides.
    """
    addresses = ";".join(loopback_addresses(processes))
    base = [
        sys.executable, "-m", "nudgeflow.cli", "run", "--config", str(config), "--workers", str(workers),
        "--flow", flow, "--no-summary", "--addresses", addresses, "--redis-url", redis_url,
    ]  # fmt: skip
    ports = lambda i: ["--metrics-port", str(metrics_port + i)] if metrics_port else []  # noqa: E731
    procs = [subprocess.Popen([*base, "--process-id", str(i), *ports(i)]) for i in range(processes)]

    def forward(signum: int, _frame: FrameType | None) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        rc = 0
        pending = list(procs)
        while pending:
            for p in list(pending):
                try:
                    code = p.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    continue
                pending.remove(p)
                if code != 0 and rc == 0:
                    rc = code
                    forward(signal.SIGTERM, None)
        return rc
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
