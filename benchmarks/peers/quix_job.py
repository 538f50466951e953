"""The peer engine Quix Streams: the peers' job (:mod:`benchmarks.peers.job`) as Quix applications, in their own virtualenv.

``benchmarks.run`` starts it like a stage (same arguments, same JSON line, measured by
``benchmarks.measure``) with the Python of ``benchmarks/peers/.venv-quix``::

    benchmarks/peers/.venv-quix/bin/python -m benchmarks.peers.quix_job quix --bootstrap … --topic … --events N \\
        --workdir /tmp/x --redis-url redis://127.0.0.1:6379/0 --prefix t

Two jobs, each an ``Application`` reading the topic from the beginning (consumer group of its own,
``auto_offset_reset="earliest"``) and stopping itself once it has seen every record: ``quix_bare`` counts per
user in Quix's state store (RocksDB), ``quix`` runs the peers' features and trigger with the user's state in
that store. Changed users' features go to Redis through a Quix ``BatchingSink``, which Quix flushes at each
checkpoint: every 1,000 messages here (``commit_every``). Changelog topics are off
(``use_changelog_topics=False``): the Bytewax stages run without recovery.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import redis
from quixstreams import Application, State
from quixstreams.models import TopicConfig
from quixstreams.sinks import BatchingSink, SinkBatch

from benchmarks.peers import job

#: tansu holds a consumer group's first JoinGroup for about half of ``session.timeout.ms`` (librdkafka's default
#: 45 s: 23 s before the first record; 6 s: 3.3 s; 1 s: 0.2 s, measured): a short session, so the peer starts
#: up about as fast as the Bytewax stages, which assign partitions without a group
GROUP_CONFIG = {"session.timeout.ms": 1000, "heartbeat.interval.ms": 300, "max.poll.interval.ms": 10000}


class RedisFeatures(BatchingSink):
    """Each changed user's newest features, one ``HSET`` + ``EXPIRE`` per user per checkpoint, in one pipeline."""

    def __init__(self, url: str, prefix: str):
        super().__init__()
        self.url = url
        self.prefix = prefix
        self.client: redis.Redis | None = None

    def setup(self) -> None:
        self.client = redis.Redis.from_url(self.url)

    def write(self, batch: SinkBatch) -> None:
        assert self.client is not None
        job.write_features(self.client, self.prefix, (item.value for item in batch))


def start(name: str, a: argparse.Namespace, run: job.Run) -> Callable[[], None]:
    """The Quix application of one job, reading the topic from its beginning; stopped by ``run.stop``."""
    app = Application(
        broker_address=a.bootstrap,
        consumer_group=f"{a.prefix}-{name}",
        auto_offset_reset="earliest",
        state_dir=str(a.workdir / "state"),
        use_changelog_topics=False,
        commit_every=job.FLUSH_EVERY,
        auto_create_topics=True,
        consumer_extra_config=GROUP_CONFIG,
    )
    run.stop = app.stop  # the loop ends after this message; the checkpoint (sinks, offsets, state) commits
    run.state_bytes = lambda: job.dir_bytes(a.workdir / "state")  # RocksDB's folder
    src = app.dataframe(app.topic(a.topic, value_deserializer="bytes", key_deserializer="bytes"))
    src = src.apply(run.seen)
    src = src.filter(lambda _v, key, _ts, _h: key is not None, metadata=True)
    src = src.apply(job.parse).filter(lambda ev: ev is not None)
    if name == "quix_bare":

        def count(_ev: dict[str, Any], state: State) -> int:
            n = state.get("n", 0) + 1
            state.set("n", n)
            return n

        src.apply(count, stateful=True)
        return app.run

    actions_topic = app.topic(
        f"{a.prefix}.actions", value_serializer="json", key_serializer="str",
        config=TopicConfig(num_partitions=3, replication_factor=1),
    )  # fmt: skip

    def update(ev: dict[str, Any], key: bytes, _ts: int, _headers: Any, state: State) -> dict[str, Any]:
        user = key.decode()
        run.users.add(key)
        st = state.get("s") or {}
        features, action = job.step(st, ev, user)
        state.set("s", st)
        return {"user": user, "ts": ev["ts"], "features": features, "action": action}

    out = src.apply(update, stateful=True, metadata=True)
    acts = out.filter(lambda r: r["action"] is not None).apply(lambda r: r["action"])
    acts = acts.update(lambda _r: setattr(run, "actions", run.actions + 1))
    acts.to_topic(actions_topic, key=lambda r: r["user_id"])
    out.apply(lambda r: (r["user"], r["ts"], r["features"])).sink(RedisFeatures(a.redis_url, a.prefix))
    return app.run


if __name__ == "__main__":
    sys.exit(job.main(None, "python -m benchmarks.peers.quix_job", __doc__, ["quix", "quix_bare"], start))
