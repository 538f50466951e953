-- Revenue attributed per trigger within an attribution window (ROI).
-- Actions sent for events in [since, until), users reached, and the orders in that period credited to a
-- trigger, last touch: an order goes to the user's latest action (by the action's event time, ties to
-- the greater trigger id) before it and within {window}. An order is credited once; revenue_per_action =
-- attributed revenue / actions sent.
-- @param window 1d: how long after an action an order is credited to it
SELECT trigger_id,
       s.actions                             AS actions,
       s.users                               AS users,
       c.orders                              AS orders,
       c.revenue                             AS revenue,
       c.revenue / s.actions                 AS revenue_per_action
FROM
(
    SELECT trigger_id, count() AS actions, uniqExact(user_id) AS users
    FROM {db}.actions FINAL
    WHERE event_ts >= {since:DateTime64(3, 'UTC')} AND event_ts < {until:DateTime64(3, 'UTC')}
    GROUP BY trigger_id
) AS s
FULL OUTER JOIN
(
    SELECT trigger_id, count() AS orders, sum(amount) AS revenue
    FROM
    (
        SELECT o.event_id, any(o.amount) AS amount, argMax(a.trigger_id, (a.event_ts, a.trigger_id)) AS trigger_id
        FROM
        (
            SELECT event_id, user_id, ts, amount FROM {db}.events FINAL
            WHERE type = 'order' AND ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}
        ) AS o
        INNER JOIN (SELECT user_id, trigger_id, event_ts FROM {db}.actions FINAL) AS a ON a.user_id = o.user_id
        WHERE o.ts > a.event_ts AND o.ts <= a.event_ts + toIntervalSecond({window:UInt32})
        GROUP BY o.event_id
    )
    GROUP BY trigger_id
) AS c USING trigger_id
ORDER BY trigger_id
