-- Every trigger evaluation that matched: fired, or suppressed with the guard that stopped it,
-- holdout ("would have fired", for uplift) or held (quiet hours). A replay adds a 'duplicate' row;
-- it never replaces the original 'fired' one.
CREATE TABLE IF NOT EXISTS {db}.decisions
(
    decision_id       String,
    trigger_id        LowCardinality(String),
    user_id           String,
    channel           LowCardinality(String),
    variant           LowCardinality(String),
    outcome           LowCardinality(String),
    reason            LowCardinality(String),
    priority          Int32,
    occurrence        String,
    event_ts          DateTime64(3, 'UTC'),
    ingest_ts         DateTime64(3, 'UTC'),
    decided_ts        DateTime64(3, 'UTC'),
    latency_event_ms  Int64,
    latency_ingest_ms Int64
)
ENGINE = ReplacingMergeTree(decided_ts)
PARTITION BY toDate(event_ts)
ORDER BY (trigger_id, user_id, decision_id, outcome, reason);
