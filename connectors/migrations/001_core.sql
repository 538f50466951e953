-- Core tables of the walking skeleton. Replacing engines keyed on the natural id make a
-- replayed or retried insert collapse into one row (query with FINAL for exact counts).
CREATE TABLE IF NOT EXISTS {db}.events
(
    event_id   String,
    user_id    String,
    type       LowCardinality(String),
    ts         DateTime64(3, 'UTC'),
    ingest_ts  DateTime64(3, 'UTC'),
    session_id String,
    platform   LowCardinality(String),
    amount     Float64,
    props      String,
    position   String
)
ENGINE = ReplacingMergeTree(ingest_ts)
PARTITION BY toDate(ts)
ORDER BY (type, user_id, event_id);

CREATE TABLE IF NOT EXISTS {db}.actions
(
    action_id  String,
    trigger_id LowCardinality(String),
    user_id    String,
    channel    LowCardinality(String),
    occurrence String,
    event_ts   DateTime64(3, 'UTC'),
    ingest_ts  DateTime64(3, 'UTC'),
    decided_ts DateTime64(3, 'UTC'),
    payload    String
)
ENGINE = ReplacingMergeTree(decided_ts)
PARTITION BY toDate(event_ts)
ORDER BY (trigger_id, user_id, action_id);

CREATE TABLE IF NOT EXISTS {db}.dlq
(
    reason     LowCardinality(String),
    detail     String,
    position   String,
    ingest_ts  DateTime64(3, 'UTC'),
    raw        String
)
ENGINE = ReplacingMergeTree(ingest_ts)
PARTITION BY toDate(ingest_ts)
ORDER BY (reason, position);
