-- Online models: every resolved prediction with its outcome, and progressive-validation metrics.
CREATE TABLE IF NOT EXISTS {db}.predictions
(
    model          LowCardinality(String),
    user_id        String,
    event_id       String,
    ts             DateTime64(3, 'UTC'),
    resolved_ts    DateTime64(3, 'UTC'),
    score          Float64,
    learner_score  Float64,
    model_version  UInt32,
    label          UInt8
)
ENGINE = ReplacingMergeTree
PARTITION BY toDate(ts)
ORDER BY (model, user_id, ts, event_id);

CREATE TABLE IF NOT EXISTS {db}.model_metrics
(
    model          LowCardinality(String),
    window_start   DateTime64(3, 'UTC'),
    span           LowCardinality(String),
    model_version  UInt32,
    examples       UInt64,
    positives      UInt64,
    auc            Float64,
    logloss        Float64,
    brier          Float64,
    ece            Float64,
    calibration    String
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(window_start)
ORDER BY (model, span, window_start);
