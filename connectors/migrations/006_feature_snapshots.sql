-- A user's features sampled at most once per `clickhouse.feature_snapshot_every` of event time, for
-- training and audit. `slot` is the start of that interval: keyed on (user_id, slot), a second sample
-- of the same slot (a replay after a restart) collapses to one row, the newest.
CREATE TABLE IF NOT EXISTS {db}.feature_snapshots
(
    user_id   String,
    slot      DateTime64(3, 'UTC'),
    ts        DateTime64(3, 'UTC'),
    version   LowCardinality(String),
    features  String CODEC(ZSTD(3))
)
ENGINE = ReplacingMergeTree(ts)
PARTITION BY toDate(slot)
ORDER BY (user_id, slot)
SETTINGS non_replicated_deduplication_window = 1000, ttl_only_drop_parts = 1;
