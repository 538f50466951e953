"""The service helpers start real servers: Redis (embedded fallback) and tansu (Kafka)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from confluent_kafka.admin import AdminClient, ConfigResource

from connectors.embedded import EmbeddedRedis, ensure_redis, free_port, ping
from connectors.tansu import TansuBroker, create_topics, produce, read_topic


def _wait_until(cond: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return bool(cond())


# --- Redis -----------------------------------------------------------------


def test_redis_fallback_starts_a_real_server(tmp_path: Path) -> None:
    dead_url = f"redis://127.0.0.1:{free_port()}/0"
    assert not ping(dead_url)

    server = ensure_redis(dead_url, data_dir=tmp_path)
    try:
        assert server.started
        assert server.url != dead_url
        assert server.process is not None and server.process.poll() is None
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        client.set("k", "v")
        assert client.get("k") == b"v"
        client.close()
        assert server.log_path is not None and server.log_path.parent == tmp_path
    finally:
        proc = server.process
        server.stop()
    assert proc is not None and proc.poll() is not None
    assert not ping(server.url)
    server.stop()  # idempotent


def test_redis_reuses_a_live_server() -> None:
    with ensure_redis(None) as owner:
        assert owner.started
        reused = ensure_redis(owner.url)
        assert isinstance(reused, EmbeddedRedis)
        assert not reused.started and reused.url == owner.url and reused.process is None
        reused.stop()  # must not touch someone else's server
        assert ping(owner.url)
    assert not ping(owner.url)


def test_redis_session_fixture(redis_client: redis.Redis, key_prefix: str) -> None:
    redis_client.set(f"{key_prefix}:a", 1)
    assert redis_client.get(f"{key_prefix}:a") == b"1"


def test_started_redis_dies_with_python() -> None:
    code = (
        "import json, os; from connectors.embedded import ensure_redis; "
        "s = ensure_redis(None); print(json.dumps([s.url, s.process.pid]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    url, _pid = json.loads(out.stdout.strip().splitlines()[-1])
    assert _wait_until(lambda: not ping(url)), "atexit did not stop the server"


# --- tansu (Kafka) -----------------------------------------------------------


def test_tansu_roundtrip_keyed_messages(kafka: TansuBroker, topic_prefix: str) -> None:
    topic = f"{topic_prefix}events"
    kafka.create_topics([topic], partitions=3)

    sent = [(f"user-{i % 17}".encode(), f"event-{i}".encode()) for i in range(300)]
    assert produce(kafka.bootstrap, topic, sent) == 300

    msgs = read_topic(kafka.bootstrap, topic, timeout_s=20.0)
    assert len(msgs) == 300
    assert sorted((m.key(), m.value()) for m in msgs) == sorted(sent)
    assert {m.partition() for m in msgs} == {0, 1, 2}
    # Same key, same partition (and per-partition order kept).
    part_of: dict[bytes, set[int]] = {}
    for m in msgs:
        part_of.setdefault(m.key(), set()).add(m.partition())
    assert all(len(p) == 1 for p in part_of.values())
    for p in range(3):
        offsets = [m.offset() for m in msgs if m.partition() == p]
        assert offsets == sorted(offsets)


def test_tansu_read_topic_max_messages(kafka: TansuBroker, topic_prefix: str) -> None:
    topic = f"{topic_prefix}few"
    create_topics(kafka.bootstrap, [topic])
    produce(kafka.bootstrap, topic, [b"a", b"b", b"c", b"d"])
    assert [m.value() for m in read_topic(kafka.bootstrap, topic, max_messages=2)] == [b"a", b"b"]
    create_topics(kafka.bootstrap, [f"{topic_prefix}empty"])
    assert read_topic(kafka.bootstrap, f"{topic_prefix}empty", idle_s=0.5) == []
    with pytest.raises(RuntimeError, match="cannot read topic"):
        read_topic(kafka.bootstrap, f"{topic_prefix}missing", timeout_s=5)


def test_tansu_topic_configs_are_described(kafka: TansuBroker, topic_prefix: str) -> None:
    default_topic, custom_topic = f"{topic_prefix}default", f"{topic_prefix}custom"
    kafka.create_topics([default_topic], partitions=3)
    kafka.create_topics([custom_topic], config={"retention.ms": "3600000", "cleanup.policy": "delete"})

    admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
    meta = admin.list_topics(timeout=10).topics
    assert len(meta[default_topic].partitions) == 3
    for topic, want in [
        (default_topic, {"retention.ms": "-1", "cleanup.policy": "delete"}),
        (custom_topic, {"retention.ms": "3600000", "cleanup.policy": "delete"}),
    ]:
        (fut,) = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, topic)]).values()
        got = {name: entry.value for name, entry in fut.result(timeout=10).items()}
        for key, value in want.items():
            assert got.get(key) == value, (topic, got)


def test_tansu_create_topics_is_idempotent(kafka: TansuBroker, topic_prefix: str) -> None:
    topic = f"{topic_prefix}again"
    kafka.create_topics([topic], partitions=3)
    kafka.create_topics([topic], partitions=3)
    create_topics(kafka.bootstrap, [topic, f"{topic_prefix}new"], partitions=3)
    meta = AdminClient({"bootstrap.servers": kafka.bootstrap}).list_topics(timeout=10).topics
    assert len(meta[topic].partitions) == 3
    assert len(meta[f"{topic_prefix}new"].partitions) == 3


def test_tansu_unsupported_storage_fails_clearly(tmp_path: Path) -> None:
    broker = TansuBroker(storage=f"sqlite://{tmp_path}/tansu.db", log_path=tmp_path / "t.log")
    with pytest.raises(RuntimeError, match="FeatureNotEnabled"):
        broker.start()
    assert broker.process is None


def test_tansu_refuses_a_busy_port(kafka: TansuBroker) -> None:
    with pytest.raises(RuntimeError, match="already in use"):
        TansuBroker(port=kafka.port).start()
