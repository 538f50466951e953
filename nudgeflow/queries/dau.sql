-- Daily active shoppers, first-time users, buyers and revenue per UTC day.
-- Activity is any shopper event (action feedback — delivered, opened, clicked, unsubscribed — is not);
-- new_users saw their first ever event that day.
SELECT toDate(e.ts)                                     AS day,
       uniqExact(e.user_id)                             AS dau,
       uniqExactIf(e.user_id, f.first_day = toDate(e.ts)) AS new_users,
       uniqExactIf(e.user_id, e.type = 'order')         AS buyers,
       count()                                          AS events,
       sumIf(e.amount, e.type = 'order')                AS revenue
FROM {db}.events AS e FINAL
INNER JOIN
(
    SELECT user_id, toDate(min(ts)) AS first_day
    FROM {db}.events FINAL
    WHERE type NOT IN ('delivered', 'opened', 'clicked', 'unsubscribed')
    GROUP BY user_id
) AS f ON f.user_id = e.user_id
WHERE e.ts >= {since:DateTime64(3, 'UTC')} AND e.ts < {until:DateTime64(3, 'UTC')}
  AND e.type NOT IN ('delivered', 'opened', 'clicked', 'unsubscribed')
GROUP BY day
ORDER BY day
