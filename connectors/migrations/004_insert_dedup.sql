-- Exactly-once batches: the writer sends every batch with an insert_deduplication_token derived from
-- its rows, the same on each retry. A plain MergeTree-family table remembers the tokens of its last
-- `non_replicated_deduplication_window` blocks and drops a block it has already stored (an insert that
-- succeeded but whose answer was lost), so materialized views never count it twice.
-- ttl_only_drop_parts: with daily partitions a TTL drops whole parts instead of rewriting them.
ALTER TABLE {db}.events MODIFY SETTING non_replicated_deduplication_window = 1000, ttl_only_drop_parts = 1;
ALTER TABLE {db}.actions MODIFY SETTING non_replicated_deduplication_window = 1000, ttl_only_drop_parts = 1;
ALTER TABLE {db}.dlq MODIFY SETTING non_replicated_deduplication_window = 1000, ttl_only_drop_parts = 1;
ALTER TABLE {db}.predictions MODIFY SETTING non_replicated_deduplication_window = 1000, ttl_only_drop_parts = 1;
ALTER TABLE {db}.model_metrics MODIFY SETTING non_replicated_deduplication_window = 1000, ttl_only_drop_parts = 1;
ALTER TABLE {db}.decisions MODIFY SETTING non_replicated_deduplication_window = 1000, ttl_only_drop_parts = 1;
