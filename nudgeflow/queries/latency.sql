-- Event → action latency percentiles per trigger.
-- In ms, from the triggering event's event time and from its ingest to the decision, over actions fired
-- for events in [since, until). On a replay of history the event-time latency is the age of the history;
-- read the ingest one. Percentiles are exact (quantileExact: the value at rank floor(q * n) of the
-- sorted latencies).
SELECT trigger_id,
       count()                                  AS fired,
       quantileExact(0.5)(latency_event_ms)     AS event_p50_ms,
       quantileExact(0.9)(latency_event_ms)     AS event_p90_ms,
       quantileExact(0.99)(latency_event_ms)    AS event_p99_ms,
       max(latency_event_ms)                    AS event_max_ms,
       quantileExact(0.5)(latency_ingest_ms)    AS ingest_p50_ms,
       quantileExact(0.9)(latency_ingest_ms)    AS ingest_p90_ms,
       quantileExact(0.99)(latency_ingest_ms)   AS ingest_p99_ms,
       max(latency_ingest_ms)                   AS ingest_max_ms
FROM {db}.decisions FINAL
WHERE outcome = 'fired'
  AND event_ts >= {since:DateTime64(3, 'UTC')} AND event_ts < {until:DateTime64(3, 'UTC')}
GROUP BY trigger_id
ORDER BY trigger_id
