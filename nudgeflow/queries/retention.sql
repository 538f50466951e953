-- Weekly retention cohorts.
-- Of the shoppers first seen in a week (Monday, UTC), how many were active 0, 1, 2 … weeks later.
-- Cohorts are first-ever weeks inside [since, until); activity counts inside it too, and excludes action
-- feedback. retention = users / cohort_size.
SELECT c.cohort                                           AS cohort,
       c.size                                             AS cohort_size,
       intDiv(dateDiff('day', c.cohort, a.week), 7)       AS weeks_after,
       uniqExact(a.user_id)                               AS users,
       users / cohort_size                                AS retention
FROM
(
    SELECT DISTINCT user_id, toMonday(ts) AS week
    FROM {db}.events FINAL
    WHERE ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}
      AND type NOT IN ('delivered', 'opened', 'clicked', 'unsubscribed')
) AS a
INNER JOIN
(
    SELECT user_id, cohort, count() OVER (PARTITION BY cohort) AS size
    FROM
    (
        SELECT user_id, toMonday(min(ts)) AS cohort, min(ts) AS first_ts
        FROM {db}.events FINAL
        WHERE type NOT IN ('delivered', 'opened', 'clicked', 'unsubscribed')
        GROUP BY user_id
        HAVING first_ts >= {since:DateTime64(3, 'UTC')} AND first_ts < {until:DateTime64(3, 'UTC')}
    )
) AS c ON c.user_id = a.user_id
GROUP BY cohort, cohort_size, weeks_after
ORDER BY cohort, weeks_after
