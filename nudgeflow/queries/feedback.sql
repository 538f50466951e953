-- Delivery, open, click-through and unsubscribe (fatigue) rates per trigger, from action feedback.
-- Feedback events (delivered, opened, clicked, unsubscribed) name their action in props.action_id; an
-- action counts once per kind whenever its feedback came. Over actions sent for events in [since, until):
-- delivery_rate = delivered / sent; open, click and unsubscribe rates are over delivered actions;
-- click_to_open = clicked / opened.
SELECT a.trigger_id                  AS trigger_id,
       count()                       AS sent,
       sum(f.delivered)              AS delivered,
       sum(f.opened)                 AS opened,
       sum(f.clicked)                AS clicked,
       sum(f.unsubscribed)           AS unsubscribed,
       delivered / sent              AS delivery_rate,
       opened / delivered            AS open_rate,
       clicked / delivered           AS click_rate,
       clicked / opened              AS click_to_open,
       unsubscribed / delivered      AS unsubscribe_rate
FROM {db}.actions AS a FINAL
LEFT JOIN
(
    SELECT JSONExtractString(props, 'action_id') AS action_id,
           max(type = 'delivered')    AS delivered,
           max(type = 'opened')       AS opened,
           max(type = 'clicked')      AS clicked,
           max(type = 'unsubscribed') AS unsubscribed
    FROM {db}.events FINAL
    WHERE type IN ('delivered', 'opened', 'clicked', 'unsubscribed')
    GROUP BY action_id
) AS f ON f.action_id = a.action_id
WHERE a.event_ts >= {since:DateTime64(3, 'UTC')} AND a.event_ts < {until:DateTime64(3, 'UTC')}
GROUP BY trigger_id
ORDER BY trigger_id
