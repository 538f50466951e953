-- Online models' calibration and AUC per day.
-- Per model and UTC day of the scored event in [since, until), from the predictions table's
-- progressive-validation scores (learner_score, the score model_metrics reports): examples, positives,
-- mean score against the observed positive rate (calibration in the large), ECE over 10 equal-width
-- score bins, Brier score and AUC (ties count half).
SELECT p.model AS model, p.day AS day, examples, positives, mean_score, positive_rate, ece, brier, auc
FROM
(
    SELECT model, toDate(ts) AS day,
           count()                                       AS examples,
           sum(label)                                    AS positives,
           avg(learner_score)                            AS mean_score,
           avg(label)                                    AS positive_rate,
           avg(pow(learner_score - label, 2))            AS brier,
           arrayAUC(groupArray(learner_score), groupArray(label)) AS auc
    FROM {db}.predictions FINAL
    WHERE ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}
    GROUP BY model, day
) AS p
INNER JOIN
(
    SELECT model, day, sum(abs(bin_score - bin_rate) * n) / sum(n) AS ece
    FROM
    (
        SELECT model, toDate(ts) AS day, least(toUInt8(floor(learner_score * 10)), 9) AS bin,
               count() AS n, avg(learner_score) AS bin_score, avg(label) AS bin_rate
        FROM {db}.predictions FINAL
        WHERE ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}
        GROUP BY model, day, bin
    )
    GROUP BY model, day
) AS c ON c.model = p.model AND c.day = p.day
ORDER BY model, day
