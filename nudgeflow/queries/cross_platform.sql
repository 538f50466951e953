-- Cross-platform shopping per day: orders whose journey spans platforms, where journeys start and end, identity links.
-- An order's journey is its shopper's behaviour events in the {window} up to the order (events before since count).
-- The shopper is the canonical user: rows written before a merge keep the id of their time, so every user_id is
-- resolved through identity_links (the merged link of highest seq naming it in src, dst or moved gives its canonical).
-- cross_platform_orders: orders in [since, until) whose journey touched two or more platforms (the share is of all
-- orders; the buyers are distinct shoppers); journeys: orders begun on one platform and placed on another, by
-- 'first → order' platform; links: identity links judged that day, by 'kind/outcome'. A day with links but no orders
-- shows 0 orders and a nan share.
-- @param window 7d: how far before an order its journey reaches
WITH
    canon AS
    (
        SELECT id, argMax(canonical, seq) AS canonical
        FROM {db}.identity_links FINAL
        ARRAY JOIN arrayConcat([src, dst], moved) AS id
        WHERE outcome = 'merged'
        GROUP BY id
    ),
    behaviour AS
    (
        SELECT e.event_id AS event_id, if(c.canonical = '', e.user_id, c.canonical) AS shopper, e.type AS type,
               e.ts AS ts, e.platform AS platform
        FROM {db}.events AS e FINAL
        LEFT JOIN canon AS c ON c.id = e.user_id
        WHERE e.type IN ('browse', 'search', 'click', 'favourite', 'add_to_cart', 'remove_from_cart', 'order')
          AND e.ts < {until:DateTime64(3, 'UTC')}
    ),
    journeys AS
    (
        SELECT o.event_id, any(o.ts) AS ts, any(o.shopper) AS shopper, any(o.platform) AS order_platform,
               uniqExactIf(j.platform, j.platform != '') AS platforms,
               argMinIf(j.platform, (j.ts, j.event_id), j.platform != '') AS first_platform
        FROM (SELECT * FROM behaviour
              WHERE type = 'order' AND ts >= {since:DateTime64(3, 'UTC')}) AS o
        INNER JOIN behaviour AS j ON j.shopper = o.shopper
        WHERE j.ts >= o.ts - toIntervalSecond({window:UInt32}) AND j.ts <= o.ts
        GROUP BY o.event_id
    )
SELECT day,
       o.orders                                      AS orders,
       o.cross_platform_orders                       AS cross_platform_orders,
       o.cross_platform_orders / o.orders            AS cross_platform_share,
       o.buyers                                      AS buyers,
       o.cross_platform_buyers                       AS cross_platform_buyers,
       o.journeys                                    AS journeys,
       l.links                                       AS links
FROM
(
    SELECT toDate(ts) AS day, count() AS orders, countIf(platforms > 1) AS cross_platform_orders,
           uniqExact(shopper) AS buyers, uniqExactIf(shopper, platforms > 1) AS cross_platform_buyers,
           sumMapIf(map(concat(first_platform, ' → ', order_platform), toUInt64(1)),
                    first_platform != '' AND order_platform != '' AND first_platform != order_platform) AS journeys
    FROM journeys
    GROUP BY day
) AS o
FULL OUTER JOIN
(
    SELECT toDate(ts) AS day, sumMap(map(concat(kind, '/', outcome), toUInt64(1))) AS links
    FROM {db}.identity_links FINAL
    WHERE ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}
    GROUP BY day
) AS l USING day
ORDER BY day
