"""The main nudgeflow job: source → parse → features → triggers → actions, with Redis and ClickHouse.

Run it the Bytewax way::

    NUDGEFLOW_CONFIG=config/local.yaml python -m bytewax.run flows.main:flow -w 2

or ``nudgeflow run --config config/local.yaml``. This module only wires
operators to connectors; every step lives in ``operators/`` or ``connectors/``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import bytewax.operators as op
from bytewax.connectors.stdio import StdOutSink
from bytewax.dataflow import Dataflow, Stream
from bytewax.recovery import RecoveryConfig

from connectors import kafka
from connectors.clickhouse import (
    ACTION_COLUMNS, DLQ_COLUMNS, EVENT_COLUMNS, ClickHouseSink, ClickHouseWriter, action_row, connect, dlq_row,
    event_row, migrate,
)
from connectors.embedded import EmbeddedRedis, ensure_redis
from connectors.files import JsonlSource, action_line, dlq_line, jsonl_sink
from connectors.redis_store import RedisFeatureSink
from connectors.simulator import SimulatorSource
from nudgeflow.events import Event
from nudgeflow.configload import Deployment, feature_refs, load_deployment
from nudgeflow.settings import EventTrigger, Settings, SinkConfig
from operators.features import Enriched, FeatureEngine, FeatureLogic, UserFeatures, shard_of
from operators.parse import Parser
from operators.triggers import TriggerEngine, TriggerLogic

DEFAULT_CONFIG = "config/local.yaml"


@dataclass
class Runtime:
    """What a built flow holds open: close it after the run to flush and stop embedded servers."""

    settings: Settings
    base: Path
    redis_url: str
    writer: ClickHouseWriter
    redis: EmbeddedRedis | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def close(self) -> None:
        self.writer.close()

    def bytewax_options(self) -> dict[str, Any]:
        """``cli_main`` keyword arguments for the recovery settings (epoch length, store)."""
        rec = self.settings.recovery
        if rec is None:
            return {}
        db = _resolve(self.base, rec.dir)
        if not db.is_dir() or not any(db.glob("part-*.sqlite3")):
            raise FileNotFoundError(f"recovery store {db} is not initialised: run `nudgeflow recovery init`")
        return {
            "epoch_interval": timedelta(seconds=rec.snapshot_interval),
            "recovery_config": RecoveryConfig(db, backup_interval=timedelta(seconds=rec.backup_interval)),
        }


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


def _output(step: str, s: Settings, sink_cfg: SinkConfig, suffix: str, base: Path, stream: Stream[Any], as_line, as_message) -> None:
    if sink_cfg.kind == "kafka":
        op.output(step, op.map(f"{step}_msg", stream, as_message), kafka.sink(s.kafka, s.topic(sink_cfg, suffix)))
    elif sink_cfg.kind == "stdout":
        op.output(step, op.map(f"{step}_line", stream, as_line), StdOutSink())
    else:
        # Bytewax's FileSink is one partition: every line is routed to it by a constant key
        op.output(step, op.map(f"{step}_line", stream, lambda x: ("", as_line(x))), jsonl_sink(_resolve(base, sink_cfg.path or "")))


def needed_features(dep: Deployment) -> set[str]:
    """What enriched events must carry: the features trigger conditions read."""
    return {f for t in dep.triggers.triggers if isinstance(t, EventTrigger) for f in feature_refs(t.condition)}


def build(dep: Deployment) -> tuple[Dataflow, Runtime]:
    """Build the dataflow for a deployment, starting what the embedded mode needs."""
    s, base = dep.settings, dep.base
    embedded = ensure_redis(s.redis.url) if s.redis.embedded else None
    redis_url = embedded.url if embedded else s.redis.url
    dsn = clickhouse_dsn(s, base)
    client = connect(dsn)
    try:
        migrate(client, s.clickhouse.database)
    finally:
        client.close()
    writer = ClickHouseWriter(s.clickhouse.model_copy(update={"dsn": dsn}))
    rt = Runtime(s, base, redis_url, writer, embedded)

    parser = Parser(s.events)
    features = FeatureEngine(dep.features, s.features, s.events, needed=needed_features(dep))
    trigger_engine = TriggerEngine(
        dep.triggers.triggers, int(s.features.allowed_lateness * 1000), int(s.features.idle_timeout * 1000)
    )
    shards = s.shards

    flow = Dataflow(s.name)
    if s.source.kind == "kafka":
        msgs = op.input("kafka_in", flow, kafka.source(s.kafka))
        parsed = op.flat_map_batch("parse", msgs, lambda b: parser.parse_batch(kafka.raw_records(b)))
    else:
        src = SimulatorSource(s.source.simulator) if s.source.kind == "simulator" else JsonlSource(
            [_resolve(base, p) for p in s.source.file.paths]
        )
        parsed = op.flat_map_batch("parse", op.input("in", flow, src), parser.parse_batch)

    valid = op.branch("valid", parsed, lambda x: type(x) is Event)
    keyed = op.key_on("shard", valid.trues, lambda e: shard_of(e.user_id, shards))
    feats = op.stateful_batch("features", keyed, lambda resume: FeatureLogic(features, resume))
    accepted = op.branch("accepted", feats, lambda kv: type(kv[1]) is Enriched)
    enriched = accepted.trues
    published = op.branch("published", accepted.falses, lambda kv: type(kv[1]) is UserFeatures)

    refused = op.map("refused", published.falses, lambda kv: kv[1])
    dead = op.merge("dead", valid.falses, refused)
    _output("dlq_out", s, s.dlq, "dlq", base, dead, dlq_line, kafka.dlq_message)
    op.output("dlq_ch", dead, ClickHouseSink(writer, "dlq", DLQ_COLUMNS, dlq_row))

    op.output("features_redis", published.trues, RedisFeatureSink(s.redis, redis_url))
    op.output("events_ch", enriched, ClickHouseSink(writer, "events", EVENT_COLUMNS, lambda kv: event_row(kv[1].event)))

    fired = op.stateful_batch("triggers", enriched, lambda resume: TriggerLogic(trigger_engine, resume))
    actions = op.map("actions", fired, lambda kv: kv[1])
    _output("actions_out", s, s.actions, "actions", base, actions, action_line, kafka.action_message)
    op.output("actions_ch", actions, ClickHouseSink(writer, "actions", ACTION_COLUMNS, action_row))
    return flow, rt


def from_file(path: str | os.PathLike[str]) -> tuple[Dataflow, Runtime]:
    return build(load_deployment(path))


def __getattr__(name: str) -> Any:
    """``flows.main:flow`` for ``python -m bytewax.run``: built on first access from ``NUDGEFLOW_CONFIG``."""
    if name == "flow":
        flow, _rt = from_file(os.environ.get("NUDGEFLOW_CONFIG", DEFAULT_CONFIG))
        globals()["flow"] = flow
        return flow
    raise AttributeError(name)
