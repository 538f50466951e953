"""The peer engine Faust (``faust-streaming``): the peers' job (:mod:`benchmarks.peers.job`) as Faust agents, in their own virtualenv.

``benchmarks.run`` starts it like a stage (same arguments, same JSON line, measured by
``benchmarks.measure``) with the Python of ``benchmarks/peers/.venv-faust``::

    benchmarks/peers/.venv-faust/bin/python -m benchmarks.peers.faust_job faust --bootstrap … --topic … --events N \\
        --workdir /tmp/x --redis-url redis://127.0.0.1:6379/0 --prefix t

Two jobs, each a Faust app (consumer group of its own, from the earliest offset) with one agent over the
topic, run by a ``faust.Worker`` that the job stops (SIGTERM to itself, as an operator would) once it has seen
every record: ``faust_bare`` counts per user in a Faust ``Table``, ``faust`` runs the peers' features and
trigger with the user's state in one. Tables are in memory (``store="memory://"``, as Bytewax keeps state);
Faust has no switch to turn a table's changelog off, so every update is also produced to the table's
changelog topic: that is what Faust state costs. The agent collects changed users' features and writes them to
Redis every 1,000 messages (a synchronous redis-py pipeline, as Quix's sink writes), and once more at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import faust
import orjson
import redis
from aiokafka.admin import AIOKafkaAdminClient

from benchmarks.peers import job

#: the consumer group's session: tansu holds a group's first JoinGroup for about half of it (see quix_job)
SESSION_S = 1.0
#: the producer's linger (s), as the harness produces the topic: Faust's default of 0 sends a request per
#: changelog record (20,000 events, measured: 282 µs CPU an event and the broker at 1.2 CPU s; 5 ms: 199, 0.3 s)
LINGER_S = 0.005


async def _partitions(bootstrap: str, topic: str) -> int:
    """How many partitions the topic has: a table must have as many (Faust co-partitions them)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (desc,) = await admin.describe_topics([topic])
        return len(desc["partitions"])
    finally:
        await admin.close()


def start(name: str, a: argparse.Namespace, run: job.Run) -> Callable[[], None]:
    """The Faust app of one job and the worker that runs it until ``run.stop``."""
    partitions = asyncio.run(_partitions(a.bootstrap, a.topic))
    app = faust.App(
        f"{a.prefix}-{name}",
        broker=f"kafka://{a.bootstrap}",
        store="memory://",
        datadir=str(a.workdir / "faust"),
        topic_partitions=partitions,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=SESSION_S,
        broker_heartbeat_interval=SESSION_S / 3,
        producer_linger=LINGER_S,
        web_enabled=False,
    )
    topic = app.topic(a.topic, key_serializer="raw", value_serializer="raw")
    table = app.Table("state", default=dict if name == "faust" else int, partitions=partitions)
    handle, end = _job(name, app, a, run, table)

    def stop() -> None:
        end()
        os.kill(os.getpid(), signal.SIGTERM)  # the worker's own shutdown: agents, tables, producer

    run.stop = stop
    run.state_bytes = lambda: sum(len(orjson.dumps(v)) for v in table.values())  # what its changelog carries

    @app.agent(topic)
    async def per_user(stream: Any) -> None:
        async for event in stream.events():
            key = event.key
            ev = job.parse(event.value) if key is not None else None
            if ev is not None:
                await handle(key, ev)
            run.seen(event.value)

    worker = faust.Worker(app, loglevel="WARNING", quiet=True, stdout=sys.stderr)  # its spinner: not on the JSON line

    def go() -> None:
        try:
            worker.execute_from_commandline()
        except SystemExit:
            pass

    return go


def _job(name: str, app: faust.App, a: argparse.Namespace, run: job.Run, table: Any) -> tuple[Any, Callable[[], None]]:
    """What the agent does with a parsed event of a user (``key``): count, or the features and the trigger;
    and what is left to do after the last record (write the features not yet written)."""
    if name == "faust_bare":

        async def count(key: bytes, _ev: dict[str, Any]) -> None:
            table[key] += 1

        return count, lambda: None

    actions = app.topic(f"{a.prefix}.actions", key_serializer="raw", value_serializer="json")
    client = redis.Redis.from_url(a.redis_url)
    changed: list[tuple[str, int, dict[str, Any]]] = []

    async def full(key: bytes, ev: dict[str, Any]) -> None:
        user = key.decode()
        run.users.add(key)
        st = table[key]
        features, action = job.step(st, ev, user)
        table[key] = st  # a Faust table sees a change by assignment (and produces it to its changelog)
        changed.append((user, ev["ts"], features))
        if action is not None:
            run.actions += 1
            await actions.send(key=key, value=action)
        if len(changed) >= job.FLUSH_EVERY:
            write()

    def write() -> None:
        job.write_features(client, a.prefix, changed)
        changed.clear()

    return full, write


if __name__ == "__main__":
    sys.exit(job.main(None, "python -m benchmarks.peers.faust_job", __doc__, ["faust", "faust_bare"], start))
