"""Session fixtures on real services: a Redis server and a tansu Kafka broker."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from connectors.embedded import ensure_redis, start_redis_cluster
from connectors.guard_store import RedisGuards
from connectors.tansu import TansuBroker
from nudgeflow.settings import Settings, TriggersFile
from tests.helpers import delete_keys, kafka_settings


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A live Redis: the local default if it answers, else one we start for the session."""
    server = ensure_redis()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """A live Redis Cluster of three primaries, started for the session (``redis+cluster://`` URL)."""
    cluster = start_redis_cluster()
    try:
        yield cluster.url
    finally:
        cluster.stop()


@pytest.fixture(params=["server", "cluster"])
def any_redis_url(request: pytest.FixtureRequest) -> str:
    """One Redis server, then a Redis Cluster: a test that takes it must pass on both."""
    return request.getfixturevalue("redis_url" if request.param == "server" else "redis_cluster_url")


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def key_prefix(request: pytest.FixtureRequest, redis_url: str) -> Iterator[str]:
    """A unique key prefix; keys under it are deleted afterwards (the server may be shared), on the cluster
    when the test runs there."""
    prefix = f"nftest{uuid.uuid4().hex[:12]}"
    yield prefix
    delete_keys(request.getfixturevalue("any_redis_url") if "any_redis_url" in request.fixturenames else redis_url,
                prefix)


@pytest.fixture(scope="session")
def kafka() -> Iterator[TansuBroker]:
    """A real Kafka-compatible broker (tansu, in-memory) for the whole session."""
    broker = TansuBroker().start()
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture
def topic_prefix() -> str:
    """A unique topic-name prefix so tests sharing the broker never collide."""
    return f"nftest-{uuid.uuid4().hex[:12]}-"


@pytest.fixture(scope="session")
def chdb_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's one chDB data folder: chDB opens a single folder per process."""
    return tmp_path_factory.mktemp("chdb")


@pytest.fixture
def ch_database() -> str:
    """A fresh database name per test inside the shared chDB folder."""
    return f"nftest_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def journey_settings(kafka: TansuBroker, any_redis_url: str, key_prefix: str, topic_prefix: str, chdb_path: Path,
                     ch_database: str, tmp_path: Path) -> Callable[[str, str], Settings]:
    """The main flow for a scripted journey, on one Redis server and on a Redis Cluster: ``(name, triggers)``
    writes the triggers (YAML) to a file and gives settings reading ``<topic prefix><name>.events`` from one
    partition, so the journey is read in the order it is written."""

    def make(name: str, triggers: str) -> Settings:
        (tmp_path / "triggers.yaml").write_text(triggers)
        return kafka_settings(kafka, topic_prefix + name, any_redis_url, key_prefix, chdb_path, ch_database,
                              tmp_path / "triggers.yaml", partitions=1)

    return make


@pytest.fixture
def guards_of(any_redis_url: str) -> Iterator:
    """Makes RedisGuards under fresh key prefixes, deleting the keys afterwards; on one server and on a cluster."""
    prefixes: list[str] = []

    def make(tf: TriggersFile, prefix: str | None = None) -> RedisGuards:
        if prefix is None:
            prefix = f"nftest{uuid.uuid4().hex[:12]}"
            prefixes.append(prefix)
        return RedisGuards(tf, any_redis_url, prefix)

    yield make
    for p in prefixes:
        delete_keys(any_redis_url, p)
