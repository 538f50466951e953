-- Actions carry their variant and a delivery status ('sent' when the flow emits one); what happens
-- next arrives as feedback events (delivered, opened, clicked, unsubscribed) naming props.action_id.
-- events.action_id is that id, extracted once at insert for feedback types only (empty otherwise, so
-- it costs nothing on disk for other events): joins of feedback to actions read one short column
-- instead of parsing every feedback row's props. JSONExtractString(props, 'action_id') still works.
ALTER TABLE {db}.actions ADD COLUMN IF NOT EXISTS variant LowCardinality(String) AFTER channel;
ALTER TABLE {db}.actions ADD COLUMN IF NOT EXISTS status LowCardinality(String) DEFAULT 'sent' AFTER variant;
ALTER TABLE {db}.events ADD COLUMN IF NOT EXISTS action_id String
    MATERIALIZED if(type IN ('delivered', 'opened', 'clicked', 'unsubscribed'), JSONExtractString(props, 'action_id'), '');
