"""Wiring shared by the flows: inputs, the feature step, outputs, and what a built flow holds open.

Steps live in ``operators/`` and connectors in ``connectors/``; these functions
only put them together so each flow module stays a short list of stages.
"""

from __future__ import annotations

import gc
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, NamedTuple

import bytewax.operators as op
from bytewax.connectors.stdio import StdOutSink
from bytewax.dataflow import Dataflow, Stream
from bytewax.recovery import RecoveryConfig

from connectors import kafka
from connectors.clickhouse import ClickHouseSink, ClickHouseWriter, DurableClickHouseSink, Row
from connectors.csvlog import CsvMapper, CsvSource
from connectors.embedded import EmbeddedRedis, ensure_redis
from connectors.files import JsonlSource, jsonl_sink
from connectors.metrics import Failing, FlowMetrics
from connectors.simulator import SimulatorSource
from connectors.stopping import stop_waiting_on_interrupt
from connectors.webhook import WebhookSender
from nudgeflow import logs
from nudgeflow.configload import Deployment, load_deployment
from connectors.identity_store import IdentitySink, RedisHandoff, load_graph
from nudgeflow.events import IDLE, DeadLetter, Decision, Event, Link, Merge
from nudgeflow.settings import Reloadable, Settings, SinkConfig, TriggersFile
from operators.features import Enriched, FeatureEngine, FeatureLogic, UserFeatures
from operators.identity import IdentityEngine, IdentityLogic
from operators.parse import Parser
from operators.shards import numeric, shard_names, shard_of

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What a built flow holds open: close it after the run to flush and stop embedded servers."""

    settings: Settings
    base: Path
    redis_url: str
    writer: ClickHouseWriter | None = None
    redis: EmbeddedRedis | None = None
    #: this process's feature-step logics (one per shard it runs), for state size and counts
    feature_logics: list[FeatureLogic] = field(default_factory=list)
    #: what ``/metrics`` serves (None: ``metrics.port`` is 0)
    metrics: FlowMetrics | None = None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.metrics is not None:
            self.metrics.close()

    def bytewax_options(self) -> dict[str, Any]:
        """``cli_main`` keyword arguments for the recovery settings (epoch length, store)."""
        rec = self.settings.recovery
        if rec is None:
            return {}
        db = _resolve(self.base, rec.dir)
        if not recovery_store_exists(db):
            raise FileNotFoundError(f"recovery store {db} is not initialised: run `nudgeflow recovery init`")
        return {
            "epoch_interval": timedelta(seconds=rec.snapshot_interval),
            "recovery_config": RecoveryConfig(db, backup_interval=timedelta(seconds=rec.backup_interval)),
        }


def recovery_store_exists(db: Path) -> bool:
    return db.is_dir() and any(db.glob("part-*.sqlite3"))


SHARD_KEYS_FILE = "shard-keys"
"""Beside a recovery store's partitions: which shard names (:mod:`operators.shards`) its state is keyed by."""
BALANCED_KEYS = "balanced-1"


def shard_keys(s: Settings, base: Path) -> tuple[str, ...]:
    """The shard names of a deployment: balanced ones (:func:`operators.shards.shard_names`), unless it resumes
    from a recovery store made before them, whose state is keyed ``"0"`` … (a store says which in
    :data:`SHARD_KEYS_FILE`; one without that file predates balanced names)."""
    if s.recovery is not None:
        db = _resolve(base, s.recovery.dir)
        marker = db / SHARD_KEYS_FILE
        if marker.is_file():
            kind = marker.read_text().strip()
            if kind != BALANCED_KEYS:
                raise ValueError(f"{marker}: shard keys {kind!r} are not known to this nudgeflow ({BALANCED_KEYS!r})")
        elif recovery_store_exists(db):
            log.warning("recovery store %s predates balanced shard keys: its shards keep the names 0 … %d",
                        db, s.shards - 1)
            return numeric(s.shards)
    return shard_names(s.shards)


def init_recovery_store(s: Settings, base: Path, share: tuple[int, int] = (0, 1)) -> Path | None:
    """Create the recovery store ``recovery.dir`` names; its folder, or None when it already existed.

    ``share`` is (this process's index, processes) for a cluster whose processes keep their stores apart
    (containers or machines with a volume each): a process keeps the partitions whose index is its own
    modulo the processes, so the cluster holds each partition once. Bytewax resumes when the processes
    together have every partition (each one records the count); a process may have a partition's file
    only once, or two copies would each miss the other's snapshots.
    """
    from bytewax.recovery import init_db_dir

    assert s.recovery is not None
    index, processes = share
    count = s.recovery.partitions
    if processes > count:
        raise ValueError(f"recovery.partitions is {count}: a cluster of {processes} processes with a store each "
                         f"needs at least {processes}, one per process")
    db = _resolve(base, s.recovery.dir)
    if recovery_store_exists(db):
        return None
    db.mkdir(parents=True, exist_ok=True)
    (db / SHARD_KEYS_FILE).write_text(BALANCED_KEYS + "\n")
    with tempfile.TemporaryDirectory(dir=db) as tmp:
        init_db_dir(Path(tmp), count)
        for i in range(index, count, processes):
            os.replace(Path(tmp) / f"part-{i}.sqlite3", db / f"part-{i}.sqlite3")
    return db


def _resolve(base: Path, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else base / p


def clickhouse_dsn(s: Settings, base: Path) -> str:
    """The server DSN, or chDB's folder (relative to the config file) as a ``chdb://`` DSN."""
    if s.clickhouse.dsn:
        return s.clickhouse.dsn
    path = _resolve(base, s.clickhouse.chdb_path).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"chdb://{path}"


def output(
    step: str, s: Settings, sink_cfg: SinkConfig, suffix: str, base: Path, stream: Stream[Any],
    as_line: Callable[[Any], str], as_message: Callable[[Any], Any], shards: Sequence[str],
) -> Stream[DeadLetter] | None:
    """Send a stream to a sink of the config: Kafka topic ``<prefix>.<suffix>``, stdout, a JSONL file or
    a webhook; a webhook or Kafka returns what it could not deliver, as dead letters for the flow's DLQ.
    ``shards``: the flow's shard names (:attr:`FeatureStreams.shards`), which a Kafka sink keys by."""
    if sink_cfg.kind == "webhook":
        assert sink_cfg.webhook is not None  # SinkConfig ensures it
        return op.flat_map_batch(step, stream, WebhookSender(sink_cfg.webhook).deliver_batch)
    if sink_cfg.kind == "kafka":
        out = kafka.KafkaOut(s.kafka, s.topic(sink_cfg, suffix), shards)
        keyed = op.flat_map_batch(f"{step}_msg", stream, lambda b: out.keyed([as_message(x) for x in b]))
        return op.map(f"{step}_failed", op.stateful_batch(step, keyed, out.logic), lambda kv: kv[1])
    if sink_cfg.kind == "stdout":
        op.output(step, op.map(f"{step}_line", stream, as_line), StdOutSink())
    else:
        # Bytewax's FileSink is one partition, routed to by a constant key: a batch's lines go as one item (as
        # one item a line, each cost ~17 µs in Bytewax's partitioned sink, benchmarks/RESULTS.md 2026-12-07)
        lines = op.flat_map_batch(f"{step}_lines", stream, lambda b: [("", "\n".join([as_line(x) for x in b]))])
        op.output(step, lines, jsonl_sink(_resolve(base, sink_cfg.path or "")))
    return None


def redis_url(s: Settings) -> tuple[str, EmbeddedRedis | None]:
    """The Redis to use: the configured one, or (embedded mode) a local server started if it does not answer."""
    embedded = ensure_redis(s.redis.url or None) if s.redis.embedded else None
    return (embedded.url if embedded else s.redis.url), embedded


Batches = Stream[list[Any]]
"""A stream whose items are whole source batches (lists). Every item that crosses from one Bytewax step to the
next costs a conversion there and back; steps that do not need items one by one (parse, identity, keying,
picking out dead letters) pass one list per batch and each consumer takes what it needs from it."""


def parsed_input(flow: Dataflow, dep: Deployment, metrics: FlowMetrics | None = None) -> Batches:
    """The configured source, parsed: events and refusals, one list per source batch (counted when ``metrics``)."""
    s = dep.settings
    parser = Parser(s.events)
    parse: Callable[[list[Any]], list[Event | DeadLetter]]
    if s.source.kind == "kafka":
        msgs = op.input("kafka_in", flow, kafka.source(s.kafka, s.metrics.kafka_lag_interval if metrics else 0.0))
        parse = parser.parse_batch
    elif s.source.kind == "csv":
        assert s.source.csv is not None and dep.csv_mapping is not None  # settings and deployment() ensure both
        mapper = CsvMapper(dep.csv_mapping)
        msgs = op.input("in", flow, CsvSource([dep.resolve(p) for p in s.source.csv.paths], dep.csv_mapping))
        parse = lambda b: mapper.parse_batch(parser, b)
    else:
        src = SimulatorSource(s.source.simulator) if s.source.kind == "simulator" else JsonlSource(
            [dep.resolve(p) for p in s.source.file.paths], tail=s.source.file.tail
        )
        msgs, parse = op.input("in", flow, src), parser.parse_batch
    counted = parse if metrics is None else metrics.counting(parse)
    return op.flat_map_batch("parse", msgs, lambda b: [counted(b)])


def start_metrics(s: Settings, url: str, writer: ClickHouseWriter | None) -> FlowMetrics | None:
    """The flow's metrics, served on ``metrics.port`` from now on; None when it is 0 (nothing is counted),
    or when the port is taken (the flow runs unobserved rather than not at all)."""
    if not s.metrics.port:
        return None
    metrics = FlowMetrics(url, writer)
    if writer is not None:
        metrics.watch("clickhouse", writer)
    try:
        metrics.serve(s.metrics.host, s.metrics.port)
    except OSError as e:
        log.error("metrics: cannot listen on %s:%d (%s); this process serves no metrics", s.metrics.host, s.metrics.port, e)
        return None
    return metrics


def metered(
    metrics: FlowMetrics | None, dead: Stream[DeadLetter], decisions: Stream[Decision] | None = None,
    feature_logics: list[FeatureLogic] | None = None, **failing: Failing,
) -> None:
    """Count dead letters and decisions (sinks on a branch: the flow never waits on them), report the feature
    step's state size, and each connector's failed attempts as ``sink_errors_total{sink=<keyword>}``."""
    if metrics is None:
        return
    if feature_logics is not None:  # filled as Bytewax builds them: the list itself, not a copy
        metrics.feature_logics = feature_logics
    op.output("dlq_metrics", dead, metrics.dead_letter_sink())
    if decisions is not None:
        op.output("decisions_metrics", decisions, metrics.decision_sink())
    for sink, connector in failing.items():
        metrics.watch(sink, connector)


TableOutput = Callable[[str, Stream[Any], str, list[str], Callable[[Any], Row]], None]
"""``out(step_id, stream, table, columns, to_row)``: a stream's items into a ClickHouse table, as rows."""


def table_output(writer: ClickHouseWriter, durable: bool) -> TableOutput:
    """How a flow writes ClickHouse tables through ``writer``. ``durable`` (recovery on): through
    :class:`DurableClickHouseSink`, so no epoch is recorded before its rows are stored (at each epoch's
    end the worker waits for the writer: what the writer holds is then inserted at once)."""

    def out(step_id: str, up: Stream[Any], table: str, columns: list[str], to_row: Callable[[Any], Row]) -> None:
        if durable:
            keyed = op.flat_map_batch(f"{step_id}_table", up, lambda batch: [(table, batch)])
            op.output(step_id, keyed, DurableClickHouseSink(writer, table, columns, to_row))
        else:
            op.output(step_id, up, ClickHouseSink(writer, table, columns, to_row))

    return out


Builder = Callable[[Deployment], tuple[Dataflow, Runtime]]
DEFAULT_CONFIG = "config/local.yaml"


def from_file(build: Builder, path: str | os.PathLike[str], redis_url: str | None = None,
              metrics_port: int | None = None) -> tuple[Dataflow, Runtime]:
    """Build a flow from a deployment config file, logging as it says (the CLI and ``python -m bytewax.run``
    both come here); ``redis_url`` replaces its Redis (a cluster's shared one), ``metrics_port`` its
    ``metrics.port`` (a local cluster's process's own)."""
    dep = load_deployment(path)
    logs.configure(dep.settings)
    if redis_url:
        dep.settings.redis = dep.settings.redis.model_copy(update={"url": redis_url, "embedded": False})
    if metrics_port is not None:
        dep.settings.metrics = dep.settings.metrics.model_copy(update={"port": metrics_port})
    built = build(dep)
    tune_collector()
    stop_waiting_on_interrupt()
    return built


def flow_attribute(build: Builder) -> Callable[[str], Any]:
    """A module ``__getattr__`` serving ``<module>:flow`` to ``python -m bytewax.run``, built from
    ``$NUDGEFLOW_CONFIG`` on first access (importing the module alone starts nothing)."""

    def getattr_(name: str) -> Any:
        if name == "flow":
            flow, _rt = from_file(build, os.environ.get("NUDGEFLOW_CONFIG", DEFAULT_CONFIG))
            return flow
        raise AttributeError(name)

    return getattr_


def by_type(step_id: str, up: Stream[Any], cls: type, keyed: bool = False) -> Stream[Any]:
    """The items of one type, from a stream of ``(key, item)`` pairs (``keyed``: keep the pairs) or of items.

    One Python call per batch: ``op.branch`` and ``op.filter`` call back into Python for every item,
    which costs more than the test itself.
    """
    if keyed:
        return op.flat_map_batch(step_id, up, lambda b: [kv for kv in b if type(kv[1]) is cls])
    return op.flat_map_batch(step_id, up, lambda b: [kv[1] for kv in b if type(kv[1]) is cls])


class FeatureStreams(NamedTuple):
    #: ``(shard, Enriched)``: each accepted event with the features downstream reads (empty when none does);
    #: not the looks at quiet shoppers (``idle``), which only ``ordered`` carries
    enriched: Stream[tuple[str, Enriched]]
    #: every feature of each changed user, once per batch
    published: Stream[UserFeatures]
    #: refusals from parsing, identity and the feature step (too late, duplicate, bad links)
    dead: Stream[DeadLetter]
    #: the logics Bytewax builds for the step, as it builds them
    logics: list[FeatureLogic]
    #: ``(shard, Enriched | Merge)``: what later per-user steps read (events and looks), merges where they stand
    ordered: Stream[tuple[str, Enriched | Merge]]
    #: every judged identity link (empty without the identity step)
    links: Stream[Link] | None
    #: where per-user steps hand merged users over (None without the identity step)
    handoff: RedisHandoff | None
    #: the shard names every per-user step keys by (:func:`shard_keys`)
    shards: tuple[str, ...]


GC_THRESHOLDS = (10_000, 2, 100)
"""Python collects young objects every 700 allocations by default, and every few of those passes
escalate into scanning the whole feature state: 2.3 µs per event with 13k shoppers (17 % of the
feature step), growing with the state. The state holds no reference cycles, so collecting rarely
loses nothing. A young pass scans what survived since the last one (mostly new shoppers' state), so
its pause grows with the first threshold: 20–38 ms at 50,000, 5–12 ms at 10,000, and the second
threshold of 2 keeps the gen-1 passes at 15–17 ms (gen-1 passes of 127 ms were the ClickHouse
writer's rows, gone since it buffers columns). Total collection time is within 20 % of (50,000, 20)
(``benchmarks/RESULTS.md``, 2026-12-06)."""


def tune_collector() -> None:
    """Set :data:`GC_THRESHOLDS`, collect, and move everything alive (modules, configs, clients, compiled
    triggers: ~200k objects) out of the collector's sight (``gc.freeze``), so that a full collection
    later scans the flow's state alone. Called once a flow is built, before it runs (:func:`from_file`)."""
    gc.set_threshold(*GC_THRESHOLDS)
    gc.collect()
    gc.freeze()


def identity_step(parsed: Batches, dep: Deployment, url: str) -> tuple[Batches, Stream[Link]]:
    """Resolve every event to its canonical shopper (:mod:`operators.identity`) and mirror the graph in Redis:
    batches of events, dead letters, merges and links (consumers take the types they want), and the links.

    One key for the whole step: merges need one total order of links, and resolving costs a dict lookup
    per event (``benchmarks``: the ``identity`` stage), far below any per-user step.
    """
    s = dep.settings
    engine = IdentityEngine(s.identity)
    recover = s.recovery is not None
    load = lambda: load_graph(url, s.redis.key_prefix, s.identity)  # noqa: E731
    # one item per upstream batch, into and out of the step (see IdentityLogic)
    keyed = op.map("identity_key", parsed, lambda b: ("ids", b))
    out = op.stateful_batch("identity", keyed, lambda resume: IdentityLogic(engine, resume, load, recover))
    links = op.flat_map_batch("links", out, lambda b: [x for kv in b for x in kv[1] if type(x) is Link])
    op.output("identity_redis", links, IdentitySink(url, s.redis.key_prefix))
    return op.map("identity_resolved", out, lambda kv: kv[1]), links


def shard_batches(batches: list[list[Any]], names: Sequence[str]) -> list[tuple[str, list[Event | Merge]]]:
    """The events of upstream batches grouped by shard, one item a shard, in their order, each merge among
    them where it stands (:func:`merge_sides`); dead letters are left out (the parse step's refusals go on
    by another branch).

    One item a shard, not one an event: Bytewax routes and, across processes, pickles every item on its
    own; a list of a shard's events costs once (``features_x2``: ~15 % more events/s, ``benchmarks/RESULTS.md``
    2026-12-07).

    >>> e = lambda uid, i: Event(f"e{i}", uid, "browse", i)
    >>> [(k, [x.event_id for x in xs]) for k, xs in shard_batches([[e("u1", 1), e("u2", 2)], [e("u1", 3)]], ["0"])]
    [('0', ['e1', 'e2', 'e3'])]
    >>> dead = DeadLetter("malformed_json", "", b"{", "p:0", 0)
    >>> [(x.event_id if type(x) is Event else x.side) for _, xs in
    ...  shard_batches([[e("anon:c1", 1), Merge("anon:c1", "u1", 1, 2, "merge"), dead, e("u1", 3)]], ["0"]) for x in xs]
    ['e1', 'local', 'e3']
    """
    groups: dict[str, list[Event | Merge]] = {}
    for b in batches:
        for x in b:
            t = type(x)
            if t is Event:
                k = shard_of(x.user_id, names)
                g = groups.get(k)
                if g is None:
                    groups[k] = [x]
                else:
                    g.append(x)
            elif t is Merge:
                for k, m in merge_sides(x, names):
                    groups.setdefault(k, []).append(m)
    return list(groups.items())


def merge_sides(m: Merge, names: Sequence[str]) -> list[tuple[str, Merge]]:
    """Where a merge goes in a step keyed by shard: one ``local`` merge, or a ``release`` and an ``absorb``.

    >>> [(k, x.side) for k, x in merge_sides(Merge("anon:c1", "u1", 1, 0, "merge"), ["0"])]
    [('0', 'local')]
    >>> sorted(x.side for _, x in merge_sides(Merge("anon:c1", "u1", 1, 0, "merge"), shard_names(64)))
    ['absorb', 'release']
    """
    src, dst = shard_of(m.src, names), shard_of(m.dst, names)
    if src == dst:
        return [(src, Merge(m.src, m.dst, m.seq, m.ts, "local"))]
    return [(src, Merge(m.src, m.dst, m.seq, m.ts, "release")), (dst, Merge(m.src, m.dst, m.seq, m.ts, "absorb"))]


def feature_step(
    parsed: Batches, dep: Deployment, needed: set[str] | None, url: str,
    follow: tuple[Reloadable, Callable[[TriggersFile], set[str]]] | None = None,
) -> FeatureStreams:
    """Resolve identities (when ``identity.enabled``), key events by shard and run the feature engine over them.

    ``needed``: the features each enriched event carries; ``None``: no enriched events at all (the
    feature store alone), which spares every event a trip through the dataflow it would not use.
    ``follow``: a reloadable trigger file and what its versions need carried (hot reload).
    """
    s = dep.settings
    engine = FeatureEngine(
        dep.features, s.features, s.events, needed=needed or (), enrich=needed is not None, follow=follow
    )
    names = shard_keys(s, dep.base)
    links: Stream[Link] | None = None
    handoff: RedisHandoff | None = None
    if s.identity.enabled:
        parsed, links = identity_step(parsed, dep, url)
        handoff = RedisHandoff(url, s.redis.key_prefix, s.identity.handoff_ttl)
    keyed = op.flat_map_batch("shard", parsed, lambda bs: shard_batches(bs, names))
    logics: list[FeatureLogic] = []
    recover = s.recovery is not None

    def logic(resume: bytes | None) -> FeatureLogic:
        logics.append(FeatureLogic(engine, resume, recover, s.features.publish_interval, handoff))
        return logics[-1]

    feats = op.stateful_batch("features", keyed, logic)
    dead = op.merge(
        "dead", op.flat_map_batch("parse_refused", parsed, lambda bs: [x for b in bs for x in b if type(x) is DeadLetter]),
        by_type("refused", feats, DeadLetter),
    )
    if engine.idle:  # the shop's events, not the looks at quiet shoppers, are the events table's rows
        enriched = op.flat_map_batch("enriched", feats, lambda b: [
            kv for kv in b if type(kv[1]) is Enriched and kv[1].event.type != IDLE])  # type: ignore[union-attr]
    else:
        enriched = by_type("enriched", feats, Enriched, keyed=True)
    ordered = enriched if handoff is None and not engine.idle else op.flat_map_batch(
        "ordered", feats, lambda b: [kv for kv in b if type(kv[1]) is Enriched or type(kv[1]) is Merge]
    )
    return FeatureStreams(
        enriched, by_type("published", feats, UserFeatures), dead, logics, ordered, links, handoff, names
    )
