-- Funnel browse → cart → order by platform: shoppers per step, step conversion, revenue.
-- A shopper reaches step k when, on that platform, a browse is followed by an add_to_cart and then an
-- order, each within {window} of the browse (ClickHouse windowFunnel), among events in [since, until).
-- cart_rate = carters / browsers, order_rate = buyers / carters; revenue sums every order in the period.
-- @param window 7d: the longest a browse → cart → order chain may take
SELECT platform,
       countIf(level >= 1)               AS browsers,
       countIf(level >= 2)               AS carters,
       countIf(level >= 3)               AS buyers,
       carters / browsers                AS cart_rate,
       buyers / carters                  AS order_rate,
       sum(revenue)                      AS revenue
FROM
(
    SELECT platform, user_id,
           windowFunnel({window:UInt32} * 1000)(toUInt64(toUnixTimestamp64Milli(ts)),
                                                type = 'browse', type = 'add_to_cart', type = 'order') AS level,
           sumIf(amount, type = 'order') AS revenue
    FROM {db}.events FINAL
    WHERE ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}
      AND type IN ('browse', 'add_to_cart', 'order')
    GROUP BY platform, user_id
)
GROUP BY platform
ORDER BY browsers DESC, platform
