-- Online models' calibration and AUC per day: the learner's and the served score's.
-- Per model and UTC day of the scored event in [since, until), from the predictions table: examples,
-- positives; for the progressive-validation score (learner_score, the score model_metrics reports) the
-- mean score against the observed positive rate (calibration in the large), ECE over 10 equal-width
-- score bins, Brier score and AUC (ties count half); then mean, ECE and AUC of the score that was served
-- when the example was sampled (score: the published snapshot, or the prior), which is what triggers
-- acted on, and model_share, the share of examples a learned model scored (model_version > 0) rather
-- than the prior (a model is served once it has learned min_examples of each outcome). Every example is
-- learned at its deadline, a horizon after it was sampled: the learner scores it with the model of that
-- moment, the served score is that of a snapshot a horizon older, which is what triggers acted on.
SELECT p.model AS model, p.day AS day, examples, positives, mean_score, positive_rate, ece, brier, auc,
       served_mean_score, served_ece, served_auc, model_share
FROM
(
    SELECT model, toDate(ts) AS day,
           count()                                       AS examples,
           sum(label)                                    AS positives,
           avg(learner_score)                            AS mean_score,
           avg(label)                                    AS positive_rate,
           avg(pow(learner_score - label, 2))            AS brier,
           arrayAUC(groupArray(learner_score), groupArray(label)) AS auc,
           avg(score)                                    AS served_mean_score,
           arrayAUC(groupArray(score), groupArray(label)) AS served_auc,
           avg(model_version > 0)                        AS model_share
    FROM {db}.predictions FINAL
    WHERE ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}
    GROUP BY model, day
) AS p
INNER JOIN
(   -- ECE of both scores: each prediction once per score (ARRAY JOIN zips the two arrays), binned
    SELECT model, day,
           sumIf(abs(bin_score - bin_rate) * n, kind = 'learner') / sumIf(n, kind = 'learner') AS ece,
           sumIf(abs(bin_score - bin_rate) * n, kind = 'served') / sumIf(n, kind = 'served')   AS served_ece
    FROM
    (
        SELECT model, toDate(ts) AS day, kind, least(toUInt8(floor(v * 10)), 9) AS bin,
               count() AS n, avg(v) AS bin_score, avg(label) AS bin_rate
        FROM {db}.predictions FINAL
        ARRAY JOIN ['learner', 'served'] AS kind, [learner_score, score] AS v
        WHERE ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}
        GROUP BY model, day, kind, bin
    )
    GROUP BY model, day
) AS c ON c.model = p.model AND c.day = p.day
ORDER BY model, day
