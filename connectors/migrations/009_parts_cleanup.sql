-- Parts that a merge replaced are deleted by a background cleanup whose period backs off up to
-- max_cleanup_delay_period (300 s by default) while inserts keep coming. The writer inserts into each
-- table about once a second, each insert also makes a part in the table's rollup, so ~1,300 replaced
-- parts piled up between two cleanups: ~20 MB held and freed every five minutes, inside the flow's
-- process with chDB. A 30 s ceiling keeps them under ~150 (README.md, Operating: Sizing).
ALTER TABLE {db}.events MODIFY SETTING max_cleanup_delay_period = 30;
ALTER TABLE {db}.actions MODIFY SETTING max_cleanup_delay_period = 30;
ALTER TABLE {db}.dlq MODIFY SETTING max_cleanup_delay_period = 30;
ALTER TABLE {db}.predictions MODIFY SETTING max_cleanup_delay_period = 30;
ALTER TABLE {db}.model_metrics MODIFY SETTING max_cleanup_delay_period = 30;
ALTER TABLE {db}.decisions MODIFY SETTING max_cleanup_delay_period = 30;
ALTER TABLE {db}.feature_snapshots MODIFY SETTING max_cleanup_delay_period = 30;
ALTER TABLE {db}.events_per_minute MODIFY SETTING max_cleanup_delay_period = 30;
ALTER TABLE {db}.decisions_per_minute MODIFY SETTING max_cleanup_delay_period = 30;
ALTER TABLE {db}.fire_latency_per_minute MODIFY SETTING max_cleanup_delay_period = 30;
ALTER TABLE {db}.dlq_per_minute MODIFY SETTING max_cleanup_delay_period = 30;
ALTER TABLE {db}.identity_links MODIFY SETTING max_cleanup_delay_period = 30;
