"""The identity graph's Redis side: its mirror, its merge history, and hand-overs of merged users' state.

Keys (``<p>`` is the deployment's key prefix):

- ``<p>:id:canon``: a hash, linked id -> canonical id, for every id that resolves to another one. The
  shop's services resolve through it (``FeatureReader``), and a restart without recovery rebuilds the graph
  from it (:func:`load_graph`).
- ``<p>:id:seq``: the number of the newest merge written.
- ``<p>:id:history``: a stream, one entry per merge (seq, ts, src, dst, canonical, kind, moved), with entry id
  ``<seq>-1``: a replay after a crash writes the same merges again, and Redis refuses the entries it already
  has, so each merge is in the history once.
- ``<p>:handoff:<step>:<seq>``: one step's released state of merge ``seq``, waiting for the process that
  absorbs it (:class:`RedisHandoff`), kept ``identity.handoff_ttl``.

Bytewax state is the source of truth and Redis its mirror. A replay rewrites merges already written, in
order: ids may resolve to an older canonical in between, and the end state is the same.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
import redis
from bytewax.outputs import DynamicSink, StatelessSinkPartition

from connectors.redis_client import Client, flat, mget, redis_client, send_commands
from connectors.redis_retry import until_redis_answers
from nudgeflow.events import Link
from nudgeflow.settings import IdentityConfig
from operators.identity import IdentityGraph

log = logging.getLogger(__name__)


def canon_key(prefix: str) -> str:
    """The hash of linked id -> canonical id.

    >>> canon_key("nf")
    'nf:id:canon'
    """
    return f"{prefix}:id:canon"


def seq_key(prefix: str) -> str:
    """The number of the newest merge written."""
    return f"{prefix}:id:seq"


def history_key(prefix: str) -> str:
    """The stream of merges, one entry per ``seq``."""
    return f"{prefix}:id:history"


def _replayed(result: object) -> bool:
    """Whether a reply is Redis refusing a history entry it already has."""
    return isinstance(result, redis.ResponseError) and "equal or smaller" in str(result)


class _IdentityPartition(StatelessSinkPartition[Link]):
    def __init__(self, sink: IdentitySink, client: Client):
        self.sink = sink
        self.client = client
        self.canon = canon_key(sink.prefix)
        self.seq = seq_key(sink.prefix)
        self.history = history_key(sink.prefix)

    def write_batch(self, items: list[Link]) -> None:
        merged = [link for link in items if link.outcome == "merged"]
        if not merged:
            return
        canon: dict[str, str] = {}
        for link in merged:  # in merge order: a later merge re-points what an earlier one moved
            canon.update(dict.fromkeys(link.moved, link.canonical))
        entries = [
            (f"{link.seq}-1", {
                "seq": link.seq, "ts": link.ts, "src": link.src, "dst": link.dst, "canonical": link.canonical,
                "kind": link.kind, "moved": orjson.dumps(link.moved),
            })
            for link in merged
        ]

        commands: list[tuple[Any, ...]] = [("HSET", self.canon, *flat(canon))]
        commands += [("XADD", self.history, entry_id, *flat(fields)) for entry_id, fields in entries]
        commands.append(("SET", self.seq, max(link.seq for link in merged)))

        def counted() -> None:
            self.sink.failures += 1

        results = until_redis_answers(f"identity write of {len(merged)} merges",
                                      lambda: send_commands(self.client, commands), counted)
        errors = [r for r in results if isinstance(r, Exception) and not _replayed(r)]
        if errors:
            raise errors[0]

    def close(self) -> None:
        self.client.close()


class IdentitySink(DynamicSink[Link]):
    """Mirrors merged links into Redis, one round trip per batch; repeats and rejections write nothing."""

    def __init__(self, url: str, prefix: str):
        self.url = url
        self.prefix = prefix
        #: failed writes of its partitions (each retried until Redis answers)
        self.failures = 0

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _IdentityPartition:
        return _IdentityPartition(self, redis_client(self.url))


def load_graph(url: str, prefix: str, cfg: IdentityConfig | None = None) -> IdentityGraph:
    """The graph the Redis mirror describes: what a restart without recovery resolves with."""
    client = redis_client(url, decode_responses=True)

    def read() -> tuple[dict[str, str], int]:
        canon = dict(client.hscan_iter(canon_key(prefix), count=10_000))
        return canon, int(client.get(seq_key(prefix)) or 0)

    try:
        canon, seq = until_redis_answers("identity graph load", read)
    finally:
        client.close()
    log.info("identity graph loaded from Redis: %d linked ids, %d merges", len(canon), seq)
    return IdentityGraph.from_canon(canon, seq, cfg)


class RedisHandoff:
    """Hands a merged user's released state from the shard that held it to the one that absorbs it.

    Within this process a hand-over is kept in memory and taken from there (once: a shard absorbs each
    merge once), so no shard waits on a round trip for a neighbour. For shards in other processes the
    hand-overs also go to Redis, gathered from every step and shard of the process into one round trip at
    most every ``FLUSH_S`` (and whenever a logic wakes or ends with some unsent): a cross-process absorb
    waits that much longer, no batch pays a round trip of its own. Redis is read with GET, not GETDEL,
    and the TTL cleans up. A crash loses nothing: a step's snapshot flushes first (``operators.merge.snapshot``),
    so unsent hand-overs are of releases after the last snapshot, which the restarted flow replays,
    putting them again. Awaited hand-overs are looked for in
    Redis at most every ``FLUSH_S`` too: an absorb usually arrives before its release by a few shards of
    the same batch, and asking Redis each time would cost every batch a round trip for nothing.
    """

    FLUSH_S = 0.05

    def __init__(self, url: str, prefix: str, ttl_s: float):
        self.client = redis_client(url)
        self.prefix = prefix
        self.ttl_ms = int(ttl_s * 1000)
        #: this process's hand-overs not taken yet: key -> blob
        self.local: dict[str, bytes] = {}
        #: hand-overs not yet written to Redis
        self.unsent: list[tuple[str, bytes]] = []
        self.next_flush = 0.0
        self.next_get = 0.0
        #: failed round trips to Redis (each retried until Redis answers)
        self.failures = 0

    def key(self, step: str, seq: int) -> str:
        """The key of step ``step``'s hand-over of merge ``seq``."""
        return f"{self.prefix}:handoff:{step}:{seq}"

    def put_many(self, step: str, parts: list[tuple[int, bytes]]) -> None:
        """A batch's hand-overs: at once for this process, with the next flush for Redis."""
        for seq, blob in parts:
            key = self.key(step, seq)
            self.local[key] = blob
            self.unsent.append((key, blob))
        self.flush(due_only=True)

    def flush(self, due_only: bool = False) -> None:
        """Write the unsent hand-overs to Redis (``due_only``: only if ``FLUSH_S`` has passed since the last)."""
        if not self.unsent:  # the common case: every shard of every step asks once per batch
            return
        now = time.monotonic()
        if due_only and now < self.next_flush:
            return
        parts, self.unsent = self.unsent, []
        self.next_flush = now + self.FLUSH_S

        commands = [("SET", key, blob, "PX", self.ttl_ms) for key, blob in parts]
        replies = until_redis_answers(f"{len(parts)} hand-overs", lambda: send_commands(self.client, commands),
                                      self._counted)
        errors = [r for r in replies if isinstance(r, Exception)]
        if errors:
            raise errors[0]

    def pending(self) -> bool:
        """Whether some hand-overs still wait for a flush (a logic should wake for it)."""
        return bool(self.unsent)

    def get_many(self, step: str, seqs: list[int]) -> list[bytes | None]:
        """The hand-overs of merges ``seqs`` (None where not put yet): from memory, else one round trip (at
        most every ``FLUSH_S``; until then what is not in memory is not there yet)."""
        self.flush(due_only=True)
        keys = [self.key(step, seq) for seq in seqs]
        found = [self.local.pop(k, None) for k in keys]
        missing = [k for k, blob in zip(keys, found) if blob is None]
        now = time.monotonic()
        if missing and now >= self.next_get:
            self.next_get = now + self.FLUSH_S
            theirs = iter(until_redis_answers(
                f"{len(missing)} hand-overs of {step}", lambda: mget(self.client, missing), self._counted
            ))
            found = [blob if blob is not None else next(theirs) for blob in found]
        return found

    def _counted(self) -> None:
        self.failures += 1

    def close(self) -> None:
        self.client.close()
