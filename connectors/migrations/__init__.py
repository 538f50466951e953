"""Versioned SQL migrations (``NNN_name.sql``, applied in order by ``connectors.clickhouse.migrate``).

Never edit an applied file: add the next number.
"""

#: the time column each table's TTL (``clickhouse.ttl``) counts from
TTL_COLUMNS: dict[str, str] = {
    "events": "ts",
    "actions": "event_ts",
    "decisions": "event_ts",
    "dlq": "ingest_ts",
    "predictions": "ts",
    "model_metrics": "window_start",
    "feature_snapshots": "slot",
    "events_per_minute": "minute",
    "decisions_per_minute": "minute",
    "fire_latency_per_minute": "minute",
    "dlq_per_minute": "minute",
    "identity_links": "ts",
}
