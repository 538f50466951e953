"""The main nudgeflow job: source → parse → features → triggers → actions, with Redis and ClickHouse.

Run it the Bytewax way::

    NUDGEFLOW_CONFIG=config/local.yaml python -m bytewax.run flows.main:flow -w 2

or ``nudgeflow run --config config/local.yaml``. This module only wires
operators to connectors; every step lives in ``operators/`` or ``connectors/``.
"""

from __future__ import annotations

from functools import partial

import bytewax.operators as op
from bytewax.dataflow import Dataflow, Stream

from connectors import kafka
from connectors.clickhouse import (
    ACTION_COLUMNS, DECISION_COLUMNS, DLQ_COLUMNS, EVENT_COLUMNS, LINK_COLUMNS, METRIC_COLUMNS, PREDICTION_COLUMNS,
    SNAPSHOT_COLUMNS, ClickHouseWriter, Pii, action_row, connect, decision_row, dlq_row, event_row,
    link_row, metric_row, migrate, prediction_row, snapshot_row,
)
from connectors.files import action_line, dlq_line
from connectors.guard_store import RedisGuards
from connectors.model_store import RedisModelSink, RedisModelStore
from connectors.redis_store import RedisFeatureSink
from connectors.metrics import FlowMetrics
from flows.common import (
    Runtime, TableOutput, clickhouse_dsn, feature_step, flow_attribute, metered, output, parsed_input, redis_url,
    start_metrics, table_output,
)
from nudgeflow.configload import Deployment, TriggerSource, trigger_features
from nudgeflow.events import Merge
from nudgeflow.settings import TriggersFile
from operators.features import Enriched
from operators.models import LabelEngine, LabelLogic, LearnerLogic, MetricRow, PredictionRow, Scorer, Snapshot
from operators.guards import StateGuards
from operators.merge import Handoff
from operators.publish import ScoreFields
from operators.sampling import SnapshotSampler
from operators.triggers import TriggerEngine, TriggerLogic

def needed_features(dep: Deployment, triggers: TriggersFile | None = None) -> set[str]:
    """What enriched events must carry: the features triggers (conditions, crossings, payloads) and models read."""
    return trigger_features(triggers or dep.triggers).union(*(m.features for m in dep.models.models))


def model_steps(
    dep: Deployment, enriched: Stream[tuple[str, Enriched | Merge]], ch: TableOutput, url: str,
    pii: Pii | None, metrics: FlowMetrics | None, handoff: Handoff | None,
) -> Stream:
    """Score every event with the published models, resolve labels in event time, learn, publish
    (``handoff``: where the label step hands merged shoppers' pending examples over)."""
    s = dep.settings
    recover = s.recovery is not None
    store = RedisModelStore(url, s.redis.key_prefix)
    scorer = Scorer(dep.models, store.fetch_newer)
    learners: list[LearnerLogic] = []  # as Bytewax builds them: the metrics read their errors

    def learner(resume: bytes | None) -> LearnerLogic:
        learners.append(LearnerLogic(dep.models, resume, lambda name: store.fetch(name)))
        return learners[-1]

    labels = LabelEngine(dep.models, int(s.features.allowed_lateness * 1000), int(s.features.idle_timeout * 1000))
    scored = op.flat_map_batch("score", enriched, scorer.score_batch)
    scores_sink = RedisFeatureSink(s.redis, url, fields=True)
    fields = op.stateful_batch(
        "score_fields", scored, lambda resume: ScoreFields(resume, s.features.publish_interval, recover)
    )
    op.output("scores_redis", op.map("score_fields_out", fields, lambda kv: kv[1]), scores_sink)
    if metrics is not None:
        metrics.scorer, metrics.learner_logics = scorer, learners
        metrics.watch("redis_scores", scores_sink)
    resolved = op.map("resolved", op.stateful_batch(
        "labels", scored, lambda resume: LabelLogic(labels, resume, handoff=handoff, recover=recover)
    ), lambda kv: kv[1])
    by_model = op.key_on("by_model", resolved, lambda r: r.model)
    learned = op.map("learned", op.stateful_batch("learn", by_model, learner), lambda kv: kv[1])
    snaps = op.branch("snapshots", learned, lambda x: type(x) is Snapshot)
    op.output("models_redis", snaps.trues, RedisModelSink(url, s.redis.key_prefix))
    rows = op.branch("predictions", snaps.falses, lambda x: type(x) is PredictionRow)
    ch("predictions_ch", rows.trues, "predictions", PREDICTION_COLUMNS, partial(prediction_row, pii=pii))
    ch("metrics_ch", rows.falses, "model_metrics", METRIC_COLUMNS, metric_row)
    return scored


def build(dep: Deployment) -> tuple[Dataflow, Runtime]:
    """Build the dataflow for a deployment, starting what the embedded mode needs."""
    s, base = dep.settings, dep.base
    url, embedded = redis_url(s)
    dsn = clickhouse_dsn(s, base)
    client = connect(dsn)
    try:
        migrate(client, s.clickhouse.database, s.clickhouse.ttl)
    finally:
        client.close()
    writer = ClickHouseWriter(s.clickhouse.model_copy(update={"dsn": dsn}))
    pii = Pii.of(s.clickhouse.pii)
    rt = Runtime(s, base, url, writer, embedded, metrics=start_metrics(s, url, writer))
    ch = table_output(writer, durable=s.recovery is not None)
    source = TriggerSource(dep.resolve(s.triggers), dep.triggers, dep.check_triggers)
    trigger_engine = TriggerEngine(
        dep.triggers, int(s.features.allowed_lateness * 1000), int(s.features.idle_timeout * 1000),
        guards=StateGuards(dep.triggers, s.events.default_timezone), source=source,
    )
    redis_guards = RedisGuards(source, url, s.redis.key_prefix)

    flow = Dataflow(s.name)
    fs = feature_step(
        parsed_input(flow, dep, rt.metrics), dep, needed_features(dep), url,
        follow=(source, lambda tf: needed_features(dep, tf)),
    )
    rt.feature_logics = fs.logics
    features_sink = RedisFeatureSink(s.redis, url)
    op.output("features_redis", fs.published, features_sink)
    ch("events_ch", fs.enriched, "events", EVENT_COLUMNS, lambda kv: event_row(kv[1].event, pii))
    if s.clickhouse.feature_snapshot_every:
        sampler = SnapshotSampler(int(s.clickhouse.feature_snapshot_every * 1000))
        ch("snapshots_ch", op.flat_map_batch("snapshot_sample", fs.published, sampler.sample_batch),
           "feature_snapshots", SNAPSHOT_COLUMNS, partial(snapshot_row, pii=pii))

    if fs.links is not None:
        ch("links_ch", fs.links, "identity_links", LINK_COLUMNS, partial(link_row, pii=pii))
    scored = model_steps(dep, fs.ordered, ch, url, pii, rt.metrics, fs.handoff) if dep.models.models else fs.ordered
    fired = op.stateful_batch("triggers", scored, lambda resume: TriggerLogic(trigger_engine, resume, fs.handoff, s.recovery is not None))
    decisions = op.flat_map_batch("guards", op.map("candidates", fired, lambda kv: kv[1]), redis_guards.decide_batch)
    ch("decisions_ch", decisions, "decisions", DECISION_COLUMNS, partial(decision_row, pii=pii))
    actions = op.filter_map("actions", decisions, lambda d: d.action if d.outcome == "fired" else None)
    undelivered = output("actions_out", s, s.actions, "actions", base, actions, action_line, kafka.action_message,
                         fs.shards)
    ch("actions_ch", actions, "actions", ACTION_COLUMNS, partial(action_row, pii=pii))
    dead = fs.dead if undelivered is None else op.merge("dead_all", fs.dead, undelivered)
    output("dlq_out", s, s.dlq, "dlq", base, dead, dlq_line, kafka.dlq_message, fs.shards)
    ch("dlq_ch", dead, "dlq", DLQ_COLUMNS, partial(dlq_row, pii=pii))
    metered(rt.metrics, dead, decisions, fs.logics, redis_features=features_sink, redis_guards=redis_guards)
    return flow, rt


__getattr__ = flow_attribute(build)
