-- Conversion and uplift per trigger against its holdout, with a 95 % confidence interval.
-- Each user a trigger decided on in [since, until) counts once, in the group of their first fired or
-- holdout decision (holdout: held out by the trigger's holdout or the global control group, "would have
-- fired"); they convert when they order after that decision's event time and within {window} of it.
-- uplift = treated_rate - holdout_rate; its 95 % interval is the normal (Wald) approximation for a
-- difference of two independent proportions: uplift ± 1.959964 * sqrt(p1(1-p1)/n1 + p0(1-p0)/n0).
-- Without a holdout (or no one treated) the rates, uplift and interval are nan.
-- @param window 7d: how long after the decision an order counts as a conversion
SELECT trigger_id,
       countIf(grp = 'fired')                  AS treated,
       countIf(grp = 'fired' AND converted)    AS treated_converted,
       countIf(grp = 'holdout')                AS holdout,
       countIf(grp = 'holdout' AND converted)  AS holdout_converted,
       treated_converted / treated             AS treated_rate,
       holdout_converted / holdout             AS holdout_rate,
       treated_rate - holdout_rate             AS uplift,
       1.959964 * sqrt(treated_rate * (1 - treated_rate) / treated
                       + holdout_rate * (1 - holdout_rate) / holdout) AS margin,
       uplift - margin                         AS ci_low,
       uplift + margin                         AS ci_high
FROM
(
    SELECT d.trigger_id AS trigger_id, d.user_id AS user_id, d.grp AS grp,
           countIf(o.ts > d.at AND o.ts <= d.at + toIntervalSecond({window:UInt32})) > 0 AS converted
    FROM
    (
        SELECT trigger_id, user_id, argMin(outcome, (event_ts, outcome)) AS grp, min(event_ts) AS at
        FROM {db}.decisions FINAL
        WHERE outcome IN ('fired', 'holdout')
          AND event_ts >= {since:DateTime64(3, 'UTC')} AND event_ts < {until:DateTime64(3, 'UTC')}
        GROUP BY trigger_id, user_id
    ) AS d
    LEFT JOIN (SELECT user_id, ts FROM {db}.events FINAL WHERE type = 'order') AS o ON o.user_id = d.user_id
    GROUP BY trigger_id, user_id, grp
)
GROUP BY trigger_id
ORDER BY trigger_id
