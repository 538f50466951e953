"""Model snapshots in Redis: the learner publishes, every scoring worker fetches the newest.

One hash per model, ``<prefix>:model:<name>``: ``version``, ``examples``,
``positives`` (absent in hashes written before it was), ``river`` (the River
version that pickled it), ``blob`` and ``updated_ms``, written in one HSET so a
reader never sees a half-updated model. A fetch asks for every model's ``version``
in one round trip first and downloads the blobs only of those that are newer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from bytewax.outputs import DynamicSink, StatelessSinkPartition

from connectors.redis_client import redis_client, send_commands
from connectors.redis_retry import TRANSIENT, until_redis_answers
from operators.models import Snapshot

log = logging.getLogger(__name__)


def model_key(prefix: str, name: str) -> str:
    return f"{prefix}:model:{name}"


class RedisModelStore:
    """Publish and fetch :class:`Snapshot` objects."""

    def __init__(self, url: str, prefix: str):
        self.client = redis_client(url)
        self.prefix = prefix

    def publish(self, snap: Snapshot) -> None:
        """Write a snapshot unless a newer version is there already (a replay never goes back)."""
        key = model_key(self.prefix, snap.name)
        have = self.client.hget(key, "version")
        if have is not None and int(have) >= snap.version:
            return
        fields = {"version": snap.version, "examples": snap.examples, "river": snap.river, "blob": snap.blob,
                  "updated_ms": int(time.time() * 1000)}
        if snap.positives is not None:
            fields["positives"] = snap.positives
        self.client.hset(key, mapping=fields)

    def fetch(self, name: str, newer_than: int = 0) -> Snapshot | None:
        """The stored snapshot if its version is above ``newer_than``; None otherwise or when absent."""
        newer = self.fetch_newer({name: newer_than})
        return newer[0] if newer else None

    def fetch_newer(self, have: Mapping[str, int]) -> list[Snapshot]:
        """The stored snapshots of the models named whose version is above the one given: every version in
        one round trip (a scorer asks each ``refresh_every``, a replay in small batches once a batch), then
        the newer ones' blobs. Empty while Redis is away: scoring goes on with the models it has."""
        names = list(have)
        try:
            versions = send_commands(self.client, [("HGET", model_key(self.prefix, n), "version") for n in names])
            newer = [n for n, v in zip(names, versions) if isinstance(v, bytes) and int(v) > have[n]]
            hashes = send_commands(self.client, [("HGETALL", model_key(self.prefix, n)) for n in newer]) if newer else []
        except TRANSIENT as e:
            log.warning("cannot fetch models %s: %s", ", ".join(names), e)
            return []
        return [snap for n, h in zip(newer, hashes) if (snap := _snapshot(n, h)) is not None]


def _snapshot(name: str, h: Any) -> Snapshot | None:
    """A snapshot from its hash, as HGETALL answers it: a flat list of fields and values on one server, a
    dict through a cluster's pipeline (None for a hash gone since its version was read)."""
    if isinstance(h, list):
        h = dict(zip(h[::2], h[1::2]))
    if not isinstance(h, dict) or b"blob" not in h:
        return None
    positives = int(h[b"positives"]) if b"positives" in h else None
    return Snapshot(name, int(h[b"version"]), int(h[b"examples"]), h[b"river"].decode(), h[b"blob"], positives)


class _ModelPartition(StatelessSinkPartition[Snapshot]):
    def __init__(self, store: RedisModelStore):
        self.store = store

    def write_batch(self, items: list[Snapshot]) -> None:
        newest: dict[str, Snapshot] = {}
        for s in items:
            if s.name not in newest or s.version > newest[s.name].version:
                newest[s.name] = s
        for s in newest.values():
            until_redis_answers(f"publishing model {s.name} v{s.version}", lambda s=s: self.store.publish(s))


class RedisModelSink(DynamicSink[Snapshot]):
    """Bytewax sink publishing the newest snapshot of each model in a batch."""

    def __init__(self, url: str, prefix: str):
        self.url = url
        self.prefix = prefix

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _ModelPartition:
        return _ModelPartition(RedisModelStore(self.url, self.prefix))
