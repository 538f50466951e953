-- Cross-platform identity. A record's user_id is the canonical shopper the identity step resolved it to;
-- origin_id is the id the record carried when that was another one (an anonymous cookie, device or
-- mini-program account, namespaced 'anon:…', 'device:…', 'account:…', or a user id merged into another),
-- '' when it carried the canonical id. Rows written before a merge keep the id of their time: resolve them
-- through identity_links (the latest merged link naming an id in src, dst or moved gives its canonical).
ALTER TABLE {db}.events ADD COLUMN IF NOT EXISTS origin_id String DEFAULT '' AFTER user_id;
ALTER TABLE {db}.decisions ADD COLUMN IF NOT EXISTS origin_id String DEFAULT '' AFTER user_id;
ALTER TABLE {db}.actions ADD COLUMN IF NOT EXISTS origin_id String DEFAULT '' AFTER user_id;

-- One row per identity link the identity step judged: merged (seq numbers the merge, moved lists the ids
-- that now resolve to canonical), repeat (already linked) or rejected (reason). Keyed with the outcome, so
-- a replayed link collapses into its row while a replay judged otherwise (a merge seen again as a repeat)
-- adds a row beside the original, as decisions does.
CREATE TABLE IF NOT EXISTS {db}.identity_links
(
    ts         DateTime64(3, 'UTC'),
    seq        UInt64,
    src        String,
    dst        String,
    canonical  String,
    kind       LowCardinality(String),
    outcome    LowCardinality(String),
    reason     LowCardinality(String),
    moved      Array(String),
    platform   LowCardinality(String),
    event_id   String,
    position   String
)
ENGINE = ReplacingMergeTree
PARTITION BY toDate(ts)
ORDER BY (kind, outcome, src, dst, ts, event_id)
SETTINGS non_replicated_deduplication_window = 1000, ttl_only_drop_parts = 1;
