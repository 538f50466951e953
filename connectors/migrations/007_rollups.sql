-- Per-minute rollups kept by ClickHouse itself: a materialized view turns every block inserted into a
-- base table into partial sums. Read them with sum(...) / quantilesMerge(...) GROUP BY, since parts
-- merge in the background. Minutes are of event time (ingest time for dead letters, which have none).
-- The targets have their own deduplication window: a retried block (same token) is dropped by the base
-- table and, since ClickHouse 24.7 (the compose stack's 24.8, chDB 26.x), each view's block carries a
-- token derived from the insert's, which the target drops too (earlier versions skip the views of a
-- dropped block). So no retry is counted twice.
-- Rows replayed after a crash come in new batches and are counted again; base tables with FINAL are exact.
CREATE TABLE IF NOT EXISTS {db}.events_per_minute
(
    minute    DateTime('UTC'),
    type      LowCardinality(String),
    platform  LowCardinality(String),
    events    UInt64,
    revenue   Float64
)
ENGINE = SummingMergeTree
PARTITION BY toDate(minute)
ORDER BY (type, platform, minute)
SETTINGS non_replicated_deduplication_window = 1000, ttl_only_drop_parts = 1;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.events_per_minute_mv TO {db}.events_per_minute AS
SELECT toStartOfMinute(ts) AS minute, type, platform, count() AS events, sum(amount) AS revenue
FROM {db}.events
GROUP BY minute, type, platform;

CREATE TABLE IF NOT EXISTS {db}.decisions_per_minute
(
    minute     DateTime('UTC'),
    trigger_id LowCardinality(String),
    outcome    LowCardinality(String),
    reason     LowCardinality(String),
    decisions  UInt64
)
ENGINE = SummingMergeTree
PARTITION BY toDate(minute)
ORDER BY (trigger_id, outcome, reason, minute)
SETTINGS non_replicated_deduplication_window = 1000, ttl_only_drop_parts = 1;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.decisions_per_minute_mv TO {db}.decisions_per_minute AS
SELECT toStartOfMinute(event_ts) AS minute, trigger_id, outcome, reason, count() AS decisions
FROM {db}.decisions
GROUP BY minute, trigger_id, outcome, reason;

CREATE TABLE IF NOT EXISTS {db}.fire_latency_per_minute
(
    minute            DateTime('UTC'),
    trigger_id        LowCardinality(String),
    latency_event_ms  AggregateFunction(quantiles(0.5, 0.9, 0.99), Int64),
    latency_ingest_ms AggregateFunction(quantiles(0.5, 0.9, 0.99), Int64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toDate(minute)
ORDER BY (trigger_id, minute)
SETTINGS non_replicated_deduplication_window = 1000, ttl_only_drop_parts = 1;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.fire_latency_per_minute_mv TO {db}.fire_latency_per_minute AS
SELECT toStartOfMinute(event_ts) AS minute, trigger_id,
       quantilesState(0.5, 0.9, 0.99)(latency_event_ms) AS latency_event_ms,
       quantilesState(0.5, 0.9, 0.99)(latency_ingest_ms) AS latency_ingest_ms
FROM {db}.decisions
WHERE outcome = 'fired'
GROUP BY minute, trigger_id;

CREATE TABLE IF NOT EXISTS {db}.dlq_per_minute
(
    minute       DateTime('UTC'),
    reason       LowCardinality(String),
    dead_letters UInt64
)
ENGINE = SummingMergeTree
PARTITION BY toDate(minute)
ORDER BY (reason, minute)
SETTINGS non_replicated_deduplication_window = 1000, ttl_only_drop_parts = 1;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.dlq_per_minute_mv TO {db}.dlq_per_minute AS
SELECT toStartOfMinute(ingest_ts) AS minute, reason, count() AS dead_letters
FROM {db}.dlq
GROUP BY minute, reason;
