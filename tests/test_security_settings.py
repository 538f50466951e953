"""Security settings reach the clients unchanged: Kafka SASL/TLS through ``kafka.add_config`` into
librdkafka, Redis AUTH/TLS through a ``rediss://`` URL into redis-py, ClickHouse user/TLS through an
``https://`` DSN into clickhouse-connect. The objects are built as the flow builds them; nothing
connects (librdkafka still validates every key when a client is created)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import clickhouse_connect.driver
import pytest
import redis

from connectors import kafka
from connectors.clickhouse import connect
from connectors.guard_store import RedisGuards
from connectors.model_store import RedisModelStore
from connectors.redis_store import FeatureReader, RedisFeatureSink
from flows.common import clickhouse_dsn, redis_url
from nudgeflow.settings import Settings, TriggersFile, load_settings

SECURE = """
source: {kind: kafka}
kafka:
  brokers: ["127.0.0.1:1"]
  add_config:
    security.protocol: SASL_SSL
    sasl.mechanism: SCRAM-SHA-512
    sasl.username: nudgeflow
    sasl.password: ${NF_T_KAFKA_PASSWORD}
    ssl.ca.location: probe
redis:
  url: "rediss://nudgeflow:${NF_T_REDIS_PASSWORD}@cache.internal:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/ssl/redis-ca.pem"
clickhouse:
  dsn: "https://writer:${NF_T_CH_PASSWORD}@ch.internal:8443?verify=true&ca_cert=/etc/ssl/ch-ca.pem"
"""
SASL = {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "nudgeflow",
        "sasl.password": "kafka-pw", "ssl.ca.location": "probe"}


@pytest.fixture
def secure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Settings, Path]:
    for var, secret in (("NF_T_KAFKA_PASSWORD", "kafka-pw"), ("NF_T_REDIS_PASSWORD", "redis-pw"),
                        ("NF_T_CH_PASSWORD", "ch-pw")):
        monkeypatch.setenv(var, secret)
    (tmp_path / "nf.yaml").write_text(SECURE)
    return load_settings(tmp_path / "nf.yaml")


def picked(have: dict[str, Any], want: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``have`` that ``want`` names, to compare with ``want``."""
    return {k: have.get(k) for k in want}


def recording(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[dict[str, Any]]:
    """Replace ``module.name`` by a wrapper that records the config or kwargs each instance is made with."""
    real, seen = getattr(module, name), []

    def make(*args: Any, **kwargs: Any) -> Any:
        seen.append(args[0] if args and isinstance(args[0], dict) else kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, make)
    return seen


def test_kafka_sasl_and_tls_reach_librdkafka_in_source_and_sinks(secure: tuple[Settings, Path],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    s, _ = secure
    consumers, producers = recording(monkeypatch, kafka, "Consumer"), recording(monkeypatch, kafka, "_Producer")
    part = kafka.source(s.kafka, stats_interval=10.0).build_part("in", f"0-{s.kafka.input_topics[0]}", None)
    part.close()
    kafka.KafkaOut(s.kafka, "nudgeflow.actions", s.shards).producer()
    assert picked(consumers[0], SASL | {"statistics.interval.ms": "10000"}) == SASL | {"statistics.interval.ms": "10000"}
    assert picked(producers[0], SASL) == SASL


def test_redis_auth_and_tls_reach_every_client(secure: tuple[Settings, Path]) -> None:
    s, _ = secure
    url, embedded = redis_url(s)
    assert embedded is None and url == s.redis.url  # passed on as written, secrets resolved
    clients: list[redis.Redis] = [
        RedisFeatureSink(s.redis, url).build("features", 0, 1).client,
        FeatureReader(url).client,
        RedisGuards(TriggersFile(), url, "nf").client,
        RedisModelStore(url, "nf").client,
    ]
    tls = {"username": "nudgeflow", "password": "redis-pw", "host": "cache.internal", "port": 6380,
           "ssl_cert_reqs": "required", "ssl_ca_certs": "/etc/ssl/redis-ca.pem"}
    for client in clients:
        pool = client.connection_pool
        assert pool.connection_class is redis.SSLConnection
        assert picked(pool.connection_kwargs, tls) == tls
        client.close()


def test_clickhouse_user_and_tls_reach_clickhouse_connect(secure: tuple[Settings, Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    s, base = secure
    made: list[dict[str, Any]] = []

    def client(*args: Any, **kwargs: Any) -> None:
        made.append(dict(zip(("interface", "host", "port", "username", "password"), args)) | kwargs)

    monkeypatch.setattr(clickhouse_connect.driver, "HttpClient", client)
    connect(clickhouse_dsn(s, base))
    want = {"interface": "https", "host": "ch.internal", "port": 8443, "username": "writer", "password": "ch-pw",
            "verify": "true", "ca_cert": "/etc/ssl/ch-ca.pem"}  # HttpClient coerces the DSN's "true"/"false"
    assert picked(made[0], want) == want
