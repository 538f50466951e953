"""The main nudgeflow job: source → parse → features → triggers → actions, with Redis and ClickHouse.

Run it the Bytewax way::

    NUDGEFLOW_CONFIG=config/local.yaml python -m bytewax.run flows.main:flow -w 2

or ``nudgeflow run --config config/local.yaml``. This module only wires
operators to connectors; every step lives in ``operators/`` or ``connectors/``.
"""

from __future__ import annotations

import bytewax.operators as op
from bytewax.dataflow import Dataflow

from connectors import kafka
from connectors.clickhouse import (
    ACTION_COLUMNS, DLQ_COLUMNS, EVENT_COLUMNS, ClickHouseSink, ClickHouseWriter, action_row, connect, dlq_row,
    event_row, migrate,
)
from connectors.files import action_line, dlq_line
from connectors.redis_store import RedisFeatureSink
from flows.common import Runtime, clickhouse_dsn, feature_step, flow_attribute, output, parsed_input, redis_url
from nudgeflow.configload import Deployment, feature_refs
from nudgeflow.settings import EventTrigger
from operators.triggers import TriggerEngine, TriggerLogic

def needed_features(dep: Deployment) -> set[str]:
    """What enriched events must carry: the features trigger conditions read."""
    return {f for t in dep.triggers.triggers if isinstance(t, EventTrigger) for f in feature_refs(t.condition)}


def build(dep: Deployment) -> tuple[Dataflow, Runtime]:
    """Build the dataflow for a deployment, starting what the embedded mode needs."""
    s, base = dep.settings, dep.base
    url, embedded = redis_url(s)
    dsn = clickhouse_dsn(s, base)
    client = connect(dsn)
    try:
        migrate(client, s.clickhouse.database)
    finally:
        client.close()
    writer = ClickHouseWriter(s.clickhouse.model_copy(update={"dsn": dsn}))
    rt = Runtime(s, base, url, writer, embedded)
    trigger_engine = TriggerEngine(
        dep.triggers.triggers, int(s.features.allowed_lateness * 1000), int(s.features.idle_timeout * 1000)
    )

    flow = Dataflow(s.name)
    fs = feature_step(parsed_input(flow, dep), dep, needed_features(dep))
    output("dlq_out", s, s.dlq, "dlq", base, fs.dead, dlq_line, kafka.dlq_message)
    op.output("dlq_ch", fs.dead, ClickHouseSink(writer, "dlq", DLQ_COLUMNS, dlq_row))
    op.output("features_redis", fs.published, RedisFeatureSink(s.redis, url))
    op.output("events_ch", fs.enriched, ClickHouseSink(writer, "events", EVENT_COLUMNS, lambda kv: event_row(kv[1].event)))

    fired = op.stateful_batch("triggers", fs.enriched, lambda resume: TriggerLogic(trigger_engine, resume))
    actions = op.map("actions", fired, lambda kv: kv[1])
    output("actions_out", s, s.actions, "actions", base, actions, action_line, kafka.action_message)
    op.output("actions_ch", actions, ClickHouseSink(writer, "actions", ACTION_COLUMNS, action_row))
    return flow, rt


__getattr__ = flow_attribute(build)
