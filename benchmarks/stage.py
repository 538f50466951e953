"""One benchmark stage, run to completion in this (fresh) process; prints one JSON line of figures.

``python -m benchmarks.run`` starts one of these per stage, so stages never
share memory, warmed-up caches or chDB state::

    python -m benchmarks.stage raw --bootstrap 127.0.0.1:9092 --topic t.events --events 200000 \\
        --workdir /tmp/x --redis-url redis://127.0.0.1:6379/0 --prefix t

Every stage reads the same Kafka topic from the beginning to its end
(``KafkaSource`` with ``tail=False``) through the same source settings
(``connectors.kafka.source``, batch size 1000), in one Bytewax worker
(``bytewax.testing.run_main``).

Adding a stage is one builder function registered in :data:`STAGES`: it gets
a :class:`StageContext` and returns a :class:`Built` (the flow, how many input
messages it read, what to close inside the timed region, what to report after).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bytewax.operators as op
import orjson
from bytewax.connectors.kafka import KafkaSource
from bytewax.dataflow import Dataflow
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.testing import cluster_main, run_main

from benchmarks.measure import measure, stage_arguments
from connectors import kafka
from nudgeflow.settings import KafkaConfig

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "config"
TRIGGERS = SHIPPED / "triggers.yaml"
#: the peers' job (``benchmarks/peers/job.py``) as nudgeflow's config: features, triggers and (no) models
PEER_JOB = Path(__file__).resolve().parent / "peers" / "nudgeflow"


@dataclass
class StageContext:
    """What every stage needs to know about the run."""

    bootstrap: str
    #: the input topic, already holding ``events`` messages
    topic: str
    events: int
    #: a private scratch folder (chDB data lives here)
    workdir: Path
    redis_url: str
    #: prefix of the output topics (``<prefix>.actions``, ``<prefix>.dlq``) and of Redis keys
    prefix: str
    batch_size: int = 1000

    def kafka_config(self) -> KafkaConfig:
        return KafkaConfig(brokers=[self.bootstrap], topics=[self.topic], tail=False, batch_size=self.batch_size)


@dataclass
class Built:
    """A stage ready to run."""

    flow: Dataflow
    #: input messages the flow read (checked against ``StageContext.events`` after the run)
    consumed: Callable[[], int]
    #: runs inside the timed region after the flow ends (final flushes)
    close: Callable[[], None] = lambda: None
    #: runs after timing: extra figures and checks for the JSON line
    report: Callable[[], dict[str, Any]] = dict
    #: runs last, untimed, even when the run failed
    cleanup: Callable[[], None] = lambda: None
    #: ``run_main`` options: the recovery store and epoch length when the stage runs with recovery
    options: dict[str, Any] = field(default_factory=dict)


# -- shared pieces


class _Count:
    __slots__ = ("n", "first", "last")

    def __init__(self) -> None:
        self.n = 0
        #: perf_counter of the first and the last non-empty batch
        self.first = 0.0
        self.last = 0.0

    def saw(self, batch: list[Any]) -> None:
        """Count a source batch and note when the first and the last records arrived."""
        if batch:
            self.last = time.perf_counter()
            if not self.n:
                self.first = self.last
        self.n += len(batch)


class _CountingPartition(StatelessSinkPartition[Any]):
    def __init__(self, count: _Count):
        self.count = count

    def write_batch(self, items: list[Any]) -> None:
        self.count.n += len(items)


class CountingSink(DynamicSink[Any]):
    """A sink that only counts what reaches it (one counter per worker, summed by ``n``)."""

    def __init__(self) -> None:
        self._counts: list[_Count] = []

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _CountingPartition:
        c = _Count()
        self._counts.append(c)
        return _CountingPartition(c)

    @property
    def n(self) -> int:
        return sum(c.n for c in self._counts)


def _orjson_values(read: _Count) -> Callable[[list[Any]], list[Any]]:
    """A ``flat_map_batch`` mapper: ``orjson.loads`` of each message value, counting messages read.

    Records that are not JSON (the simulator's ``malformed_json``) and consumer
    errors are dropped; ``try`` costs nothing in 3.11 until something raises.
    """
    loads = orjson.loads

    def parse(batch: list[Any]) -> list[Any]:
        read.saw(batch)
        out = []
        append = out.append
        for m in batch:
            try:
                append(loads(m.value))
            except (orjson.JSONDecodeError, AttributeError, TypeError):
                pass
        return out

    return parse


# -- the stages


def _bytewax_source(ctx: StageContext) -> KafkaSource:
    """Bytewax's KafkaSource as shipped, for the stages that measure Bytewax itself (the raw ceiling, the bare
    counter); nudgeflow's flows read through ``connectors.kafka.source``, which hands over raw records."""
    c = ctx.kafka_config()
    return KafkaSource(c.brokers, c.input_topics, tail=False, batch_size=c.batch_size, raise_on_errors=False)


def build_raw(ctx: StageContext) -> Built:
    """The ceiling: KafkaSource → orjson.loads of every value → a sink that counts."""
    read = _Count()
    sink = CountingSink()
    flow = Dataflow("bench_raw")
    msgs = op.input("kafka_in", flow, _bytewax_source(ctx))
    parsed = op.flat_map_batch("parse", msgs, _orjson_values(read))
    op.output("count", parsed, sink)
    return Built(flow, lambda: read.n, report=lambda: {"out": sink.n, **_marks(read)})


def build_parse(ctx: StageContext) -> Built:
    """The flows' Kafka source (raw records) → the real parse step of every flow (``operators.parse.Parser``:
    validated, normalised events and dead letters) → a sink that counts: what the features and full stages
    build on."""
    from nudgeflow.settings import EventsConfig
    from operators.parse import Parser

    read = _Count()
    sink = CountingSink()
    parser = Parser(EventsConfig())

    def parse(batch: list[Any]) -> list[Any]:
        read.saw(batch)
        return parser.parse_batch(batch)

    flow = Dataflow("bench_parse")
    op.output("count", op.flat_map_batch("parse", op.input("kafka_in", flow, kafka.source(ctx.kafka_config())), parse), sink)
    return Built(flow, lambda: read.n, report=lambda: {"out": sink.n, **_marks(read)})


def build_identity(ctx: StageContext) -> Built:
    """The parse stage plus the identity step (``flows.common.identity_step``: resolving every event, linking
    the ids records carry, the graph mirrored in Redis): identity_vs_parse is what identity costs an event."""
    import redis

    from flows.common import identity_step
    from nudgeflow.events import Link, Merge
    from operators.parse import Parser

    dep = _deployment(ctx, "bench_identity")
    read = _Count()
    sink = CountingSink()
    merges = CountingSink()
    parser = Parser(dep.settings.events)

    def parse(batch: list[Any]) -> list[Any]:
        read.saw(batch)
        return [parser.parse_batch(batch)]  # one item per batch, as the flows pass it (flows.common.Batches)

    flow = Dataflow("bench_identity")
    parsed = op.flat_map_batch("parse", op.input("kafka_in", flow, kafka.source(ctx.kafka_config())), parse)
    resolved, links = identity_step(parsed, dep, ctx.redis_url)
    items = op.flat_map_batch("items", resolved, lambda bs: [x for b in bs for x in b if type(x) is not Link])
    op.output("count", items, sink)
    op.output("merges", op.flat_map_batch("merged", items, lambda b: [x for x in b if type(x) is Merge]), merges)
    return Built(
        flow, lambda: read.n, report=lambda: {"out": sink.n, "merges": merges.n, **_marks(read)},
        cleanup=lambda: _delete_keys(redis.Redis.from_url(ctx.redis_url), f"{ctx.prefix}:*"),
    )


def _marks(read: _Count) -> dict[str, float]:
    """When the first and the last records arrived (perf_counter; the stage runner makes them relative)."""
    return {"first_record_at": read.first, "last_record_at": read.last}


def _user_key(d: dict[str, Any]) -> str:
    u = d.get("user_id")
    return u if type(u) is str else "?"  # the simulator's missing/mistyped user ids share one key


def _count(state: int | None, _value: Any) -> tuple[int, int]:
    n = (state or 0) + 1
    return n, n


def build_bare(ctx: StageContext) -> Built:
    """The bare Bytewax counter: raw + ``key_on`` user_id + ``stateful_map`` counting per user."""
    read = _Count()
    sink = CountingSink()
    flow = Dataflow("bench_bare")
    msgs = op.input("kafka_in", flow, _bytewax_source(ctx))
    parsed = op.flat_map_batch("parse", msgs, _orjson_values(read))
    keyed = op.key_on("user", parsed, _user_key)
    counts = op.stateful_map("per_user", keyed, _count)
    op.output("out", counts, sink)
    return Built(flow, lambda: read.n, report=lambda: {"out": sink.n, **_marks(read)})


def _deployment(ctx: StageContext, name: str, recovery_s: float | None = None, identity: bool = True,
                compact: bool = True, configs: Path = SHIPPED) -> Any:
    """A nudgeflow deployment reading the stage's topic, with the features, triggers and models of ``configs``
    (the shipped ones), Redis keys and output topics (``<prefix>.actions``, ``<prefix>.dlq``) under the stage's
    prefix and chDB in its workdir; ``compact=False``: idle shoppers' state is never compacted
    (``features.compact_after: null``)."""
    from connectors.tansu import create_topics
    from nudgeflow.configload import deployment
    from nudgeflow.settings import Settings

    create_topics(ctx.bootstrap, [f"{ctx.prefix}.actions", f"{ctx.prefix}.dlq"], partitions=3)
    settings = Settings.model_validate({
        "name": name,
        "source": {"kind": "kafka"},
        "kafka": ctx.kafka_config().model_dump() | {"topic_prefix": ctx.prefix},
        "features": {"definitions": str(configs / "features.yaml")} | ({} if compact else {"compact_after": None}),
        "redis": {"url": ctx.redis_url, "key_prefix": ctx.prefix, "ttl": "1h"},
        "clickhouse": {"chdb_path": str(ctx.workdir / "chdb"), "database": "nfbench"},
        "actions": {"kind": "kafka"},
        "dlq": {"kind": "kafka"},
        "triggers": str(configs / "triggers.yaml"),
        "models": str(configs / "models.yaml"),  # the shipped triggers read scores; the feature flow runs no models
        "recovery": None if recovery_s is None else {"dir": str(ctx.workdir / "recovery"), "snapshot_interval": recovery_s},
        "identity": {"enabled": identity},
    })
    if recovery_s is not None:
        from bytewax.recovery import init_db_dir

        (ctx.workdir / "recovery").mkdir(parents=True, exist_ok=True)
        init_db_dir(ctx.workdir / "recovery", 1)
    return deployment(settings, ctx.workdir)


def _redis_commands(url: str) -> int:
    """Commands the Redis server has processed so far (``INFO stats``)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        return int(client.info("stats")["total_commands_processed"])
    finally:
        client.close()


def _redis_report(ctx: StageContext, commands_before: int) -> dict[str, Any]:
    """Users published, Redis commands per input record and the bytes Redis keeps per user hash."""
    import redis

    client = redis.Redis.from_url(ctx.redis_url)
    try:
        # the counting itself (SCAN, MEMORY USAGE) comes after this reading
        commands = _redis_commands(ctx.redis_url) - commands_before - 1
        keys = [k for _, k in zip(range(200), client.scan_iter(match=f"{ctx.prefix}:u:*", count=1000))]
        sizes = [client.memory_usage(k) or 0 for k in keys]
    finally:
        client.close()
    return {
        "redis_users": _count_keys(redis.Redis.from_url(ctx.redis_url), f"{ctx.prefix}:u:*"),
        "redis_cmds_per_event": commands / ctx.events,
        "redis_bytes_per_user": sum(sizes) / len(sizes) if sizes else 0.0,
    }


def _state_report(logics: list[Any]) -> dict[str, Any]:
    """Users held in the feature step's state and what they cost: pickled (what recovery stores) and in memory,
    the shards' compression dictionaries included; how many of them are compacted (idle past
    ``features.compact_after``), and what one costs compacted and held as objects (the mix at the end of a run
    depends on when it stopped: users changed since the last publication are never compacted)."""
    import pickle

    from operators.features import Frozen

    users = [u for lg in logics for u in lg.state.users.values()]
    if not users:
        return {"state_users": 0}
    pickled = sum(len(pickle.dumps(lg.state.users, protocol=pickle.HIGHEST_PROTOCOL)) for lg in logics)
    sizes = [(type(u) is Frozen, _deep_size(u)) for u in users]
    # the shards' compression dictionaries are state too (a few KB a shard, whatever its users)
    dictionaries = sum(len(lg.state.zdict or b"") for lg in logics)
    in_memory = sum(size for _, size in sizes) + dictionaries
    pickled += dictionaries
    hot = [size for frozen, size in sizes if not frozen]
    cold = [size for frozen, size in sizes if frozen]
    return {
        "state_users": len(users),
        "state_compacted": len(cold),
        "state_dictionary_bytes": dictionaries,
        "state_mem_bytes_per_hot_user": sum(hot) / len(hot) if hot else 0.0,
        "state_mem_bytes_per_compacted_user": sum(cold) / len(cold) if cold else 0.0,
        "state_bytes_per_user": pickled / len(users),
        "state_mem_bytes_per_user": in_memory / len(users),
        "state_mb_per_100k_users": in_memory / len(users) * 100_000 / 1e6,
    }


def _deep_size(obj: Any, seen: set[int] | None = None) -> int:
    """``sys.getsizeof`` of an object and everything it holds (slotted objects, containers)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        size += sum(_deep_size(k, seen) + _deep_size(v, seen) for k, v in obj.items())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        size += sum(_deep_size(x, seen) for x in obj)
    elif hasattr(obj, "__slots__"):
        size += sum(_deep_size(getattr(obj, k), seen) for k in obj.__slots__ if hasattr(obj, k))
    return size


def build_features(ctx: StageContext, recovery_s: float | None = None, identity: bool = True,
                   compact: bool = True) -> Built:
    """The feature store alone (``flows/features.py``) in Kafka mode: parse, identity, features, Redis, dead
    letters; with ``recovery_s``, Bytewax recovery snapshots every shard each ``recovery_s`` seconds (SQLite);
    ``identity=False``: without the identity step (what it costs the feature store); ``compact=False``: idle
    shoppers kept as objects (what compacting them costs and saves)."""
    import redis

    from flows.features import build

    flow, rt = build(_deployment(ctx, "bench_features", recovery_s, identity, compact))
    before = _redis_commands(ctx.redis_url)
    dlq: list[int] = []

    def dead_letters() -> int:
        if not dlq:
            dlq.append(_topic_size(ctx.bootstrap, f"{ctx.prefix}.dlq"))
        return dlq[0]

    def report() -> dict[str, Any]:
        out = _redis_report(ctx, before) | _state_report(rt.feature_logics)
        out["accepted"] = sum(lg.state.accepted for lg in rt.feature_logics)
        out["kafka_dlq"] = dead_letters()
        return out

    return Built(
        flow, lambda: sum(lg.state.accepted for lg in rt.feature_logics) + dead_letters(), close=rt.close,
        report=report, cleanup=lambda: _delete_keys(redis.Redis.from_url(ctx.redis_url), f"{ctx.prefix}:*"),
        options=rt.bytewax_options(),
    )


def build_full(ctx: StageContext, identity: bool = True, recovery_s: float | None = None,
               configs: Path = SHIPPED) -> Built:
    """The main job of ``flows/main.py`` as shipped (features, the models of ``config/models.yaml``, the
    triggers of ``config/triggers.yaml``, guards) in Kafka mode; ``rt.close()`` (final ClickHouse flush) timed;
    ``identity=False``: without the identity step (what it costs the whole job); ``recovery_s``: with Bytewax
    recovery, epochs of that length (snapshots, and the ClickHouse rows stored at each epoch's end);
    ``configs``: another folder's features, triggers and models (:data:`PEER_JOB`: the peers' job)."""
    import redis

    from connectors.clickhouse import connect
    from flows.common import clickhouse_dsn
    from flows.main import build

    dep = _deployment(ctx, "bench_full", recovery_s, identity=identity, configs=configs)
    s, database = dep.settings, dep.settings.clickhouse.database
    flow, rt = build(dep)
    counts: dict[str, int] = {}
    before = _redis_commands(ctx.redis_url)

    def tables() -> dict[str, int]:
        if not counts:
            ch = connect(clickhouse_dsn(s, ctx.workdir))
            try:
                for t in ("events", "dlq", "actions"):
                    counts[t] = int(ch.query(f"SELECT count() FROM {database}.{t}").result_rows[0][0])
            finally:
                ch.close()
        return counts

    def report() -> dict[str, Any]:
        rows = tables()
        out: dict[str, Any] = {f"ch_{t}": n for t, n in rows.items()}
        out["ch_inserted"] = rt.writer.inserted
        out["ch_insert_failures"] = rt.writer.failures
        out["kafka_actions"] = _topic_size(ctx.bootstrap, f"{ctx.prefix}.actions")
        out["kafka_dlq"] = _topic_size(ctx.bootstrap, f"{ctx.prefix}.dlq")
        out["idle_looks"] = sum(lg.state.looked for lg in rt.feature_logics)  # extra items past the feature step
        return out | _redis_report(ctx, before) | _state_report(rt.feature_logics)

    def cleanup() -> None:
        _delete_keys(redis.Redis.from_url(ctx.redis_url), f"{ctx.prefix}:*")

    # every record gets exactly one answer: an events row or a dead letter
    return Built(flow, lambda: tables()["events"] + tables()["dlq"], close=rt.close, report=report, cleanup=cleanup,
                 options=rt.bytewax_options())


#: name → builder, in the order ``benchmarks.run`` runs them. Adding a stage is one function here.
STAGES: dict[str, Callable[[StageContext], Built]] = {
    "raw": build_raw,
    "parse": build_parse,
    "identity": build_identity,
    "bare": build_bare,
    "features": build_features,
    "features_noid": lambda ctx: build_features(ctx, identity=False),
    "features_nocompact": lambda ctx: build_features(ctx, compact=False),
    # the cost of Bytewax recovery's snapshots, by epoch length (README: Recovery)
    "features_rec1s": lambda ctx: build_features(ctx, recovery_s=1.0),
    "features_rec10s": lambda ctx: build_features(ctx, recovery_s=10.0),
    "full": build_full,
    "full_noid": lambda ctx: build_full(ctx, identity=False),
    "full_rec10s": lambda ctx: build_full(ctx, recovery_s=10.0),
    # the peers' job (benchmarks/peers/job.py) run by nudgeflow's main flow: the like-for-like of quix and faust
    "peerjob": lambda ctx: build_full(ctx, identity=False, configs=PEER_JOB),
}


# -- helpers for reports


def _topic_size(bootstrap: str, topic: str) -> int:
    """Messages in a topic, by reading it (tansu's high watermarks lag behind what it serves)."""
    from connectors.tansu import read_topic

    return len(read_topic(bootstrap, topic, timeout_s=120, idle_s=2.0))


def _count_keys(client: Any, pattern: str) -> int:
    try:
        return sum(1 for _ in client.scan_iter(match=pattern, count=1000))
    finally:
        client.close()


def _delete_keys(client: Any, pattern: str) -> None:
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                client.delete(*batch)
                batch.clear()
        if batch:
            client.delete(*batch)
    finally:
        client.close()


# -- the child process


def run_stage(name: str, ctx: StageContext, cluster: tuple[list[str], int] | None = None) -> dict[str, Any]:
    """Build, run and measure one stage; the figures as a dict (``ok`` False if it lost records).

    With ``cluster`` (the addresses of every process, this one's index) the flow runs as one process of a
    Bytewax cluster (``cluster_main``, what ``nudgeflow run --processes N`` starts); ``consumed`` is then this
    process's share and ``ok`` is left to the harness, which sums the shares.
    """
    from flows.common import tune_collector

    t = time.perf_counter()
    built = STAGES[name](ctx)
    tune_collector()  # as a flow's process does once built (every stage alike)
    build_s = time.perf_counter() - t
    try:

        def run() -> None:
            if cluster is None:
                run_main(built.flow, **built.options)
            else:
                cluster_main(built.flow, cluster[0], cluster[1], **built.options)

        res, w0 = measure(ctx.events, run, built.close)
        res = {"stage": name, **res, "build_s": build_s}
        for k, v in built.report().items():
            if k.endswith("_at"):  # a perf_counter reading: seconds since flow start
                res[k[:-3] + "_s"] = v - w0
            else:
                res[k] = v
        res["consumed"] = built.consumed()
        res["ok"] = res["consumed"] == ctx.events if cluster is None else None
        return res
    finally:
        built.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stage", description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=list(STAGES))
    stage_arguments(p)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--addresses", default=None, help="run as one process of a Bytewax cluster: host:port;host:port…")
    p.add_argument("--process-id", type=int, default=0, help="this process's index in --addresses")
    a = p.parse_args(argv)
    a.workdir.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(a.bootstrap, a.topic, a.events, a.workdir, a.redis_url, a.prefix, a.batch_size)
    res = run_stage(a.stage, ctx, None if a.addresses is None else (a.addresses.split(";"), a.process_id))
    res["pid"] = os.getpid()
    sys.stdout.write(json.dumps(res) + "\n")
    sys.stdout.flush()
    return 0 if res["ok"] is not False else 1


if __name__ == "__main__":
    sys.exit(main())
