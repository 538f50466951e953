-- RFM segment sizes as of `until`.
-- Over the shoppers active in [since, until). The rfm_* features live in Redis, not ClickHouse, so this
-- scores the stored orders the way config/features.yaml's shipped rfm section does: R from days since
-- the last order (<= 7 → 5 … > 60 → 1; never ordered → 1), F from orders and M from revenue within
-- {horizon} before `until` (thresholds 1, 2, 4, 8 and 50, 150, 400, 1000 → 1 … 5). Change them here when
-- that file changes. segment = R F M, like rfm_segment.
-- @param horizon 90d: the period frequency and monetary count over
SELECT concat(toString(r), toString(f), toString(m)) AS segment,
       r, f, m,
       count()                                          AS users,
       users / sum(users) OVER ()                       AS share,
       sum(revenue)                                     AS revenue
FROM
(
    WITH {until:DateTime64(3, 'UTC')} - toIntervalSecond({horizon:UInt32}) AS horizon_start
    SELECT user_id,
           if(countIf(type = 'order') = 0, 1,
              5 - arrayCount(t -> days_since_order > t, [7, 14, 30, 60]))   AS r,
           1 + arrayCount(t -> orders >= t, [1, 2, 4, 8])                      AS f,
           1 + arrayCount(t -> revenue >= t, [50, 150, 400, 1000])             AS m,
           (toUnixTimestamp64Milli({until:DateTime64(3, 'UTC')})
            - toUnixTimestamp64Milli(maxIf(ts, type = 'order'))) / 86400000   AS days_since_order,
           countIf(type = 'order' AND ts > horizon_start)                     AS orders,
           sumIf(amount, type = 'order' AND ts > horizon_start)               AS revenue
    FROM {db}.events FINAL
    WHERE ts < {until:DateTime64(3, 'UTC')} AND type NOT IN ('delivered', 'opened', 'clicked', 'unsubscribed')
    GROUP BY user_id
    HAVING max(ts) >= {since:DateTime64(3, 'UTC')}
)
GROUP BY r, f, m
ORDER BY segment DESC
