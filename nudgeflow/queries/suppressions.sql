-- Decisions per trigger: fired, held out and suppressed, by outcome and reason (the guard that said no).
-- Every matched trigger for events in [since, until) is one decision: fired; holdout (the trigger's
-- holdout or the global control group, "would have fired"); suppressed by cooldown, frequency_cap,
-- no_consent, quiet_hours …; a replayed decision ('duplicate') is left out. users: distinct shoppers.
SELECT trigger_id,
       outcome,
       reason,
       count()               AS decisions,
       uniqExact(user_id)    AS users
FROM {db}.decisions FINAL
WHERE outcome != 'duplicate'
  AND event_ts >= {since:DateTime64(3, 'UTC')} AND event_ts < {until:DateTime64(3, 'UTC')}
GROUP BY trigger_id, outcome, reason
ORDER BY trigger_id, outcome, reason
