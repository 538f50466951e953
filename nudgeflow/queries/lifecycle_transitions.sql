-- Lifecycle transitions: shoppers by their stage at `since` and at `until`.
-- A shopper's stage at a time T follows config/features.yaml's shipped lifecycle section, with the gap
-- measured from the last event before T: new (first seen within 7d of T, no order yet), active (last
-- event within 14d), at_risk (30d), dormant (90d), churned (longer); unseen before any event.
-- Action feedback is not activity. Rows cover the shoppers seen before `until`.
WITH (seen, first_ts, last_ts, orders, at) -> multiIf(
         seen = 0, 'unseen',
         orders = 0 AND first_ts >= at - toIntervalDay(7), 'new',
         last_ts >= at - toIntervalDay(14), 'active',
         last_ts >= at - toIntervalDay(30), 'at_risk',
         last_ts >= at - toIntervalDay(90), 'dormant',
         'churned') AS stage_at
SELECT stage_at(since_seen, since_first, since_last, since_orders, {since:DateTime64(3, 'UTC')}) AS from_stage,
       stage_at(1, until_first, until_last, until_orders, {until:DateTime64(3, 'UTC')}) AS to_stage,
       count() AS users
FROM
(
    SELECT user_id,
           countIf(ts < {since:DateTime64(3, 'UTC')})                      AS since_seen,
           minIf(ts, ts < {since:DateTime64(3, 'UTC')})                    AS since_first,
           maxIf(ts, ts < {since:DateTime64(3, 'UTC')})                    AS since_last,
           countIf(type = 'order' AND ts < {since:DateTime64(3, 'UTC')})   AS since_orders,
           min(ts)                                                         AS until_first,
           max(ts)                                                         AS until_last,
           countIf(type = 'order')                                         AS until_orders
    FROM {db}.events FINAL
    WHERE ts < {until:DateTime64(3, 'UTC')} AND type NOT IN ('delivered', 'opened', 'clicked', 'unsubscribed')
    GROUP BY user_id
)
GROUP BY from_stage, to_stage
ORDER BY users DESC, from_stage, to_stage
