"""Session fixtures on real services: a Redis server and a tansu Kafka broker."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from connectors.embedded import ensure_redis
from connectors.guard_store import RedisGuards
from connectors.tansu import TansuBroker
from nudgeflow.settings import TriggersFile


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A live Redis: the local default if it answers, else one we start for the session."""
    server = ensure_redis()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def key_prefix(redis_url: str) -> Iterator[str]:
    """A unique key prefix; keys under it are deleted afterwards (the server may be shared)."""
    prefix = f"nftest{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                client.delete(*batch)
                batch.clear()
        if batch:
            client.delete(*batch)
    finally:
        client.close()


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
def guards_of(redis_url: str) -> Iterator:
    """Makes RedisGuards under fresh key prefixes, deleting the keys afterwards."""
    prefixes: list[str] = []

    def make(tf: TriggersFile, prefix: str | None = None) -> RedisGuards:
        if prefix is None:
            prefix = f"nftest{uuid.uuid4().hex[:12]}"
            prefixes.append(prefix)
        return RedisGuards(tf, redis_url, prefix)

    yield make
    r = redis.Redis.from_url(redis_url)
    for p in prefixes:
        keys = list(r.scan_iter(match=f"{p}*", count=1000))
        if keys:
            r.delete(*keys)
