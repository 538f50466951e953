"""Online models: labels in event time, learning once, snapshots, scoring from the newest snapshot."""

from __future__ import annotations

import math
import pickle
import random
from dataclasses import fields, make_dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.model_store import RedisModelStore
from nudgeflow.configload import load_models
from nudgeflow.events import IDLE, Event
from nudgeflow.settings import EventsConfig, ModelDef, ModelsFile
from nudgeflow.yamlconf import ConfigError
from operators import models
from operators.features import Enriched
from operators.models import (
    BinnedAUC, LabelEngine, Learner, LearnerLogic, Linear, Metrics, Pending, Resolved, Scorer, Snapshot, SnapshotVersionError,
    build_model, proba, vector,
)
from tests.helpers import Exploding

MIN, HOUR = 60_000, 3_600_000
CFG = ModelsFile.model_validate({
    "publish_every_updates": 3, "publish_every": 3600, "refresh_every": 2, "metrics_window": 3600,
    "models": [
        {"name": "buy", "label": {"events": ["order"], "within": "1h"}, "features": ["views_1h"],
         "sample_every": "10m", "min_examples": 0, "score_on": ["browse"]},
        {"name": "churn", "label": {"events": "any", "within": "1h", "outcome": "absent"}, "features": ["views_1h"],
         "sample_every": "30m", "min_examples": 0, "score_on": "any"},
    ],
})


def scored(ev: Event, names: list[str], score: float = 0.5) -> Enriched:
    en = Enriched(ev, {"views_1h": 1})
    for n in names:
        en.scores[n] = score
        en.scored[n] = (1, {"views_1h": 1.0})
    return en


def test_labels_resolve_at_the_right_event_time() -> None:
    """An example's label is the event time its label event came (or its deadline); it is learned at its
    deadline either way, so the learner takes examples in the order they were sampled, whatever their label."""
    eng = LabelEngine(CFG, lateness_ms=0, idle_ms=10**12)
    s = eng.new_state()
    eng.on_event(s, scored(Event("b1", "u1", "browse", 0, position="p:0"), ["buy", "churn"]), 0)
    # another event of u1 at 5 min: not an order; it does answer churn (activity within the hour), held
    eng.on_event(s, scored(Event("b2", "u1", "browse", 5 * MIN, position="p:0"), ["buy", "churn"]), 0)
    assert [(p.event_id, p.labelled) for p in s.pending[("churn", "u1")]] == [("b1", 5 * MIN)]
    # sampled at most once per interval: b2 (5 min later) opened no new example of either model
    assert [p.event_id for p in s.pending[("buy", "u1")]] == ["b1"]
    # an order at exactly the deadline is inside the window: positive
    eng.on_event(s, scored(Event("o1", "u1", "order", HOUR, position="p:0"), []), 0)
    assert eng.advance(s, HOUR - 1) == []
    out = eng.advance(s, HOUR)
    assert sorted((r.model, r.event_id, r.label, r.resolved_ts) for r in out) == [
        ("buy", "b1", True, HOUR), ("churn", "b1", False, 5 * MIN)]
    # u2 browses and nothing follows: the watermark passing the deadline makes buy negative, churn positive
    eng.on_event(s, scored(Event("c1", "u2", "browse", 2 * HOUR, position="p:0"), ["buy", "churn"]), 0)
    assert eng.advance(s, 3 * HOUR - 1) == []
    out = eng.advance(s, 3 * HOUR)
    assert sorted((r.model, r.user_id, r.label, r.resolved_ts) for r in out) == [
        ("buy", "u2", False, 3 * HOUR), ("churn", "u2", True, 3 * HOUR)]
    assert s.pending == {}


def test_a_label_event_that_arrives_first_still_counts() -> None:
    eng = LabelEngine(CFG, lateness_ms=10 * MIN, idle_ms=10**12)
    s = eng.new_state()
    eng.on_event(s, scored(Event("o", "u1", "order", 5 * MIN, position="p:0"), []), 0)
    eng.on_event(s, scored(Event("b", "u1", "browse", 0, position="p:0"), ["buy"]), 0)  # late browse
    assert [(r.model, r.label, r.resolved_ts) for r in eng.advance(s, HOUR)] == [("buy", True, 5 * MIN)]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 600), st.sampled_from(["browse", "order"])), max_size=60))
def test_every_example_resolves_exactly_once_and_state_is_bounded(evs: list[tuple[int, int, str]]) -> None:
    """Every example is learned once, not before its deadline, in the order examples were sampled, with the
    label and label time the raw events give."""
    eng = LabelEngine(CFG, lateness_ms=0, idle_ms=10**12)
    s = eng.new_state()
    resolved: list[Resolved] = []
    created = 0
    stream = [(f"u{u}", minute * MIN, etype) for u, minute, etype in sorted(evs, key=lambda e: e[1])]
    for i, (uid, ts, etype) in enumerate(stream):
        names = ["buy", "churn"] if etype == "browse" else ["churn"]
        before = dict(s.last_sample)
        eng.on_event(s, scored(Event(f"e{i}", uid, etype, ts, position="p:0"), names), 0)
        created += sum(1 for k, v in s.last_sample.items() if before.get(k) != v)  # examples sampled
        for (name, _), pend in s.pending.items():  # bound: ceil(within / sample_every) + 1 per user and model
            assert len(pend) <= math.ceil(3600 / (600 if name == "buy" else 1800)) + 1
        out = eng.advance(s, ts)
        assert all(r.ts + HOUR <= ts for r in out)  # learned at the deadline, whatever the label
        resolved += out
    resolved += eng.advance(s, 10**9)
    keys = [(r.model, r.user_id, r.ts) for r in resolved]
    assert len(keys) == len(set(keys)) == created
    assert not any(s.pending.values())
    for name in ("buy", "churn"):  # in sampling order
        assert [r.ts for r in resolved if r.model == name] == sorted(r.ts for r in resolved if r.model == name)
    for r in resolved:  # brute force: the first label event of the user within the hour after sampling
        labels = [t for uid, t, etype in stream if uid == r.user_id and r.ts < t <= r.ts + HOUR
                  and (etype == "order" or r.model == "churn")]
        assert r.label == (bool(labels) if r.model == "buy" else not labels)
        assert r.resolved_ts == (min(labels) if labels else r.ts + HOUR)


def test_feedback_on_our_messages_is_no_activity_for_any_label_or_score() -> None:
    """``any`` means shopping: a delivered or opened message neither answers a churn example (the shopper did
    nothing) nor is scored by a model scoring any event; a model naming a feedback type still sees it."""
    eng = LabelEngine(CFG, lateness_ms=0, idle_ms=10**12)
    s = eng.new_state()
    eng.on_event(s, scored(Event("b1", "u1", "browse", 0, position="p:0"), ["churn"]), 0)
    for i, kind in enumerate(("delivered", "opened")):
        eng.on_event(s, scored(Event(f"f{i}", "u1", kind, (10 + i) * MIN, position="p:0"), []), 0)
    assert [(r.model, r.label) for r in eng.advance(s, HOUR)] == [("churn", True)]  # no activity within the hour
    clicks = CFG.models[0].model_copy(update={"name": "clicks", "score_on": ["opened"]})
    scorer = Scorer(CFG.model_copy(update={"models": [*CFG.models, clicks]}), lambda have: [])
    opened, browse = Enriched(Event("o", "u", "opened", 0), {"views_1h": 1}), Enriched(Event("b", "u", "browse", 0), {"views_1h": 1})
    scorer.score_batch([("0", opened), ("0", browse)])
    assert set(opened.scores) == {"clicks"} and set(browse.scores) == {"buy", "churn"}


def test_a_look_at_a_quiet_shopper_is_scored_and_sampled_but_is_no_activity() -> None:
    """An ``idle`` look is scored by ``any`` models and may start an example (a churn example taken while the
    shopper is away), yet answers no ``any`` label and moves no clock: it comes from the feature step's
    watermark, after the events of the partitions."""
    eng = LabelEngine(CFG, lateness_ms=0, idle_ms=10**12)
    s = eng.new_state()
    eng.on_event(s, scored(Event("b1", "u1", "browse", 0, position="p:0:1"), ["churn"]), 0)
    scorer = Scorer(CFG, lambda have: [])
    look = Enriched(Event(f"{IDLE}:u1:{40 * MIN}", "u1", IDLE, 40 * MIN), {"views_1h": 0})
    scorer.score_batch([("0", look)])
    assert set(look.scores) == {"churn"}  # scored by the model scoring any type, not by buy (browse only)
    eng.on_event(s, look, 0)
    assert s.clock.max_ts == 0
    assert [p.event_id for p in s.pending[("churn", "u1")]] == ["b1", look.event.event_id]
    eng.on_event(s, scored(Event("b2", "u1", "browse", 90 * MIN, position="p:0:2"), []), 0)
    out = eng.advance(s, 2 * HOUR)  # both deadlines passed: learned in the order they were sampled
    # the look was no activity (b1 churned), and the shopper came back within the hour of the look
    assert [(r.event_id, r.label) for r in out] == [("b1", True), (look.event.event_id, False)]
    assert not s.pending.get(("churn", "u1"))


def test_learner_learns_each_example_once_scores_before_learning_and_publishes() -> None:
    d = CFG.models[0]
    learner = Learner(d, CFG)
    rnd = random.Random(1)
    snaps = []
    for i in range(9):
        x = {"views_1h": float(rnd.randint(0, 10))}
        r = Resolved("buy", "u", f"e{i}", i * MIN, i * MIN + 1, x, 0.5, 0, x["views_1h"] > 5)
        _, [pred] = learner.learn([r])
        assert 0.0 <= pred.learner_score <= 1.0
        snap = learner.maybe_publish(now=0)
        if snap:
            snaps.append(snap)
    assert learner.examples == 9 and learner.total.count == 9
    assert [s.version for s in snaps] == [1, 2, 3] and [s.examples for s in snaps] == [3, 6, 9]
    # the snapshot round-trips: the loaded model scores like the learner's
    model = snaps[-1].load()
    assert model.predict_proba_one({"views_1h": 8.0}) == learner.model.predict_proba_one({"views_1h": 8.0})


def test_progressive_validation_uses_the_model_before_the_update() -> None:
    d = CFG.models[0]
    learner, shadow = Learner(d, CFG), build_model(d)
    for i in range(20):
        x = {"views_1h": float(i % 7)}
        r = Resolved("buy", "u", f"e{i}", i, i, x, 0.5, 0, i % 7 > 3)
        expected = shadow.predict_proba_one(x).get(True, 0.0)
        _, [pred] = learner.learn([r])
        assert pred.learner_score == pytest.approx(expected)
        shadow.learn_one(x, r.label)


def test_examples_resolved_together_are_all_scored_before_any_is_learned() -> None:
    """A burst (one order resolving a shopper's pending examples) must not score its twins after learning them."""
    d = CFG.models[0]
    learner, shadow = Learner(d, CFG), build_model(d)
    for i in range(30):  # some history, so the model is not at its starting point
        x = {"views_1h": float(i % 7)}
        learner.learn([Resolved("buy", "u", f"h{i}", i, i, x, 0.5, 0, i % 7 > 3)])
        shadow.learn_one(x, i % 7 > 3)
    burst = [Resolved("buy", "v", f"b{i}", 100, 100, {"views_1h": 6.0}, 0.5, 0, True) for i in range(5)]
    expected = shadow.predict_proba_one({"views_1h": 6.0}).get(True, 0.0)
    _, preds = learner.learn(burst)
    assert [p.learner_score for p in preds] == pytest.approx([expected] * 5)
    assert learner.examples == 35


def test_metric_rows_cover_the_learner_and_the_served_score() -> None:
    """A window row holds the examples learned since the row before (a negative resolved a horizon late
    counts in the window current when it is learned); the served rows measure the score served when each
    example was sampled, the cumulative ones every example so far."""
    learner = Learner(CFG.models[0], CFG)  # windows of 1 h
    ex = lambda i, ts, at, y, served: Resolved("buy", "u", f"e{i}", ts, at, {"views_1h": float(i)}, served, 1, y)  # noqa: E731
    first = [ex(1, 10 * MIN, 20 * MIN, True, 0.9), ex(2, 50 * MIN, 55 * MIN, True, 0.6)]
    assert learner.learn(first)[0] == []
    late = [ex(3, 5 * MIN, 65 * MIN, False, 0.4), ex(4, 70 * MIN, 75 * MIN, True, 0.7)]  # window 0's negative first
    rows, _ = learner.learn(late)
    assert [(r.window, r.window_start, r.values["examples"], r.values["positives"]) for r in rows] == [
        ("window", 0, 3, 2), ("cumulative", 0, 3, 2), ("served_window", 0, 3, 2), ("served_cumulative", 0, 3, 2)]
    served = Metrics(CFG.calibration_bins)
    for r in first + late[:1]:
        served.update(r.label, r.score)
    assert rows[2].values == served.row() and rows[3].values == served.row()
    assert rows[0].values != served.row()  # the learner scored them itself
    rows = learner.close_window()  # the end of input
    assert [(r.window, r.window_start // HOUR, r.values["examples"]) for r in rows] == [
        ("window", 1, 1), ("cumulative", 1, 4), ("served_window", 1, 1), ("served_cumulative", 1, 4)]


def test_a_learner_from_an_older_recovery_store_resumes() -> None:
    """Recovery stores pickle the learner: one pickled before positives were counted and the served score
    measured keeps its model, counts and figures; the served figures start from then."""
    learner = Learner(CFG.models[0], CFG)
    learner.learn([Resolved("buy", "u", "e", 0, 1, {"views_1h": 1.0}, 0.5, 0, True)])
    old = Learner.__new__(Learner)
    old.__dict__.update({k: v for k, v in learner.__dict__.items()
                         if k not in ("positives", "served_window", "served_total")})
    resumed = pickle.loads(pickle.dumps(old))
    assert (resumed.examples, resumed.positives, resumed.total.count, resumed.served_total.count) == (1, 0, 1, 0)
    resumed.learn([Resolved("buy", "u", "f", 10, 20, {"views_1h": 2.0}, 0.5, 0, False)])
    assert (resumed.examples, resumed.positives) == (2, 0)
    assert [(r.window, r.values["examples"]) for r in resumed.close_window()] == [
        ("window", 2), ("cumulative", 2), ("served_window", 1), ("served_cumulative", 1)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.floats(0.0, 1.0)), max_size=60))
def test_the_binned_auc_is_the_share_of_positive_negative_pairs_a_positive_wins(examples: list[tuple[bool, float]]) -> None:
    """Against every pair counted one by one (ties within a bin count half): the AUC of ``model_metrics``."""
    auc = BinnedAUC()
    for y, p in examples:
        auc.update(y, p)
    bin_of = lambda p: min(int(p * 1000), 999)  # noqa: E731
    pos = [bin_of(p) for y, p in examples if y]
    neg = [bin_of(p) for y, p in examples if not y]
    if not pos or not neg:
        assert math.isnan(auc.get())
        return
    twice = sum(2 if a > b else 1 if a == b else 0 for a in pos for b in neg)
    assert auc.get() == twice / (2 * len(pos) * len(neg))


def test_metrics_pickled_with_rivers_log_loss_load_with_the_same_figures_and_keep_counting() -> None:
    """Recovery stores pickle each learner's metrics; those of the code before held River's ``LogLoss`` (a running
    mean). They load with the same log loss, and one more example counts as it would have."""
    from river import metrics

    data = [(True, 0.8), (False, 0.3), (False, 0.0), (True, 1.0), (True, 0.45)]
    old = Metrics(CFG.calibration_bins)
    state = {k: v for k, v in old.__dict__.items() if k != "loss"} | {"logloss": metrics.LogLoss()}
    for y, p in data[:-1]:
        state["logloss"].update(y, {True: p, False: 1 - p})
    old.__dict__.clear()
    old.__dict__.update(state)
    for y, p in data[:-1]:  # the other figures as the older code kept them
        old.auc.update(y, p), old.cal.update(y, p)
    old.brier, old.count, old.positives = sum((p - y) ** 2 for y, p in data[:-1]), 4, 2
    resumed = pickle.loads(pickle.dumps(old))
    assert not hasattr(resumed, "logloss")
    assert resumed.row()["logloss"] == pytest.approx(state["logloss"].get(), rel=1e-12)
    resumed.update(*data[-1])
    fresh = Metrics(CFG.calibration_bins)
    for y, p in data:
        fresh.update(y, p)
    got, want = resumed.row(), fresh.row()
    assert got.pop("calibration") == want.pop("calibration")
    assert got == pytest.approx(want, rel=1e-12)


def test_a_pending_example_from_a_snapshot_before_labels_were_held_loads_unlabelled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Label state pickled before examples were held to their deadline: its pending examples had no label
    yet (a labelled one was learned at once) and load as such."""

    # the example as it was, pickled under its name
    Before = make_dataclass("Pending", [f.name for f in fields(Pending) if f.name != "labelled"], slots=True)
    Before.__module__ = models.__name__
    monkeypatch.setattr(models, "Pending", Before)
    blob = pickle.dumps(Before(1, 2, "e", {"v": 1.0}, 0.5, 3))
    monkeypatch.undo()
    p = pickle.loads(blob)
    assert p == Pending(1, 2, "e", {"v": 1.0}, 0.5, 3) and p.labelled == -1
    p.labelled = 2
    assert pickle.loads(pickle.dumps(p)).labelled == 2


def test_snapshot_from_another_river_is_refused() -> None:
    snap = Snapshot.of("buy", 1, 10, build_model(CFG.models[0]))
    snap.river = "0.21.0"
    with pytest.raises(SnapshotVersionError, match="River 0.21.0"):
        snap.load()


def test_the_store_answers_for_every_model_in_one_look_with_only_newer_snapshots(any_redis_url: str, key_prefix: str) -> None:
    store = RedisModelStore(any_redis_url, key_prefix)
    d = CFG.models[0]
    store.publish(Snapshot.of("buy", 3, 10, build_model(d), positives=4))
    store.publish(Snapshot.of("churn", 1, 5, build_model(d)))
    newer = store.fetch_newer({"buy": 2, "churn": 1, "absent": 0})
    assert [(s.name, s.version, s.examples, s.positives) for s in newer] == [("buy", 3, 10, 4)]
    assert type(newer[0].load()) is type(build_model(d))
    assert store.fetch_newer({"buy": 3, "churn": 1}) == [] and store.fetch("churn").positives is None


def test_scorer_uses_the_newest_snapshot_within_the_refresh_bound(any_redis_url: str, key_prefix: str) -> None:
    store = RedisModelStore(any_redis_url, key_prefix)
    clock = [0]
    scorer = Scorer(CFG, store.fetch_newer, now_ms=lambda: clock[0])
    d = CFG.models[0]
    en = lambda: Enriched(Event("e", "u", "browse", 0), {"views_1h": 9})  # noqa: E731
    scorer.score_batch([("0", en())])
    assert scorer.version("buy") == 0  # nothing published: the prior
    for version in (1, 2):
        learner = Learner(d, CFG)
        for i in range(50):
            learner.learn([Resolved("buy", "u", f"e{i}", i, i, {"views_1h": float(i % 10)}, 0.5, 0, (i % 10 > 4) == (version == 1))])
        learner.version = version - 1
        store.publish(learner.maybe_publish(now=0, force=True))
        clock[0] += 1000  # within the 2 s refresh bound: still the old model
        scorer.score_batch([("0", en())])
        assert scorer.version("buy") == version - 1
        clock[0] += 1000  # the bound has passed: the newest snapshot is used
        out = scorer.score_batch([("0", en())])
        assert scorer.version("buy") == version
        assert out[0][1].scores["buy"] == pytest.approx(learner.model.predict_proba_one({"views_1h": 9.0})[True])
    store.publish(Snapshot.of("buy", 1, 5, build_model(d)))  # an older version never replaces a newer one
    assert store.fetch("buy").version == 2


def test_replayed_history_refreshes_the_model_by_event_time(any_redis_url: str, key_prefix: str) -> None:
    """Replaying history, a day of events may pass in a second of wall time: the scorer looks for a newer
    snapshot once ``refresh_every`` of event time has passed too, or it would serve a day's start model."""
    store = RedisModelStore(any_redis_url, key_prefix)
    scorer = Scorer(CFG, store.fetch_newer, now_ms=lambda: 0)  # the wall clock stands still
    en = lambda ts: Enriched(Event("e", "u", "browse", ts), {"views_1h": 9})  # noqa: E731
    scorer.score_batch([("0", en(10_000))])
    learner = Learner(CFG.models[0], CFG)
    learner.learn([Resolved("buy", "u", "e", 1, 1, {"views_1h": 1.0}, 0.5, 0, True)])
    store.publish(learner.maybe_publish(now=0, force=True))
    scorer.score_batch([("0", en(11_999))])  # within 2 s of event time: not yet
    assert scorer.version("buy") == 0
    scorer.score_batch([("0", en(9_000)), ("0", en(12_000))])  # a batch's last event tells its time
    assert scorer.version("buy") == 1


def test_a_model_is_served_only_once_it_has_learned_each_outcome(any_redis_url: str, key_prefix: str) -> None:
    """A purchase head learns positives as orders come and its first negative only a horizon later: a model
    that has seen one class must not be served (it would score everyone near 1), the prior is. Through the
    real store, with a hash written before positives were counted served on its total as before."""
    d = CFG.models[0].model_copy(update={"min_examples": 10})
    cfg = CFG.model_copy(update={"models": [d]})
    store = RedisModelStore(any_redis_url, key_prefix)
    clock = [0]
    scorer = Scorer(cfg, store.fetch_newer, now_ms=lambda: clock[0])

    def served() -> float:
        clock[0] += 2000  # past the refresh bound
        en = scorer.score_batch([("0", Enriched(Event("e", "u", "browse", 0), {"views_1h": 1}))])[0][1]
        # the version a prediction logs is the model that made its score: 0 for the prior
        assert en.scored["buy"][0] == scorer.serving("buy") == (0 if en.scores["buy"] == d.prior else scorer.version("buy"))
        return en.scores["buy"]

    learner = Learner(d, cfg)
    for i in range(40):  # positives only: the first day of a purchase head
        learner.learn([Resolved("buy", "u", f"p{i}", i, i, {"views_1h": float(i % 5)}, 0.5, 0, True)])
    store.publish(learner.maybe_publish(now=0, force=True))
    assert store.fetch("buy").positives == 40
    assert served() == d.prior and scorer.version("buy") == 1 and scorer.serving("buy") == 0
    for i in range(9):
        learner.learn([Resolved("buy", "u", f"n{i}", i, i, {"views_1h": 0.0}, 0.5, 0, False)])
    store.publish(learner.maybe_publish(now=0, force=True))
    assert served() == d.prior and scorer.version("buy") == 2  # 9 negatives: still one short
    learner.learn([Resolved("buy", "u", "n9", 9, 9, {"views_1h": 0.0}, 0.5, 0, False)])
    store.publish(learner.maybe_publish(now=0, force=True))
    assert served() == pytest.approx(learner.model.predict_proba_one({"views_1h": 1.0})[True]) != d.prior
    assert scorer.serving("buy") == 3
    # a warm start keeps the count, so a restarted learner's snapshots stay served
    resumed = LearnerLogic(cfg, None, warm=store.fetch)._learner("buy")
    assert (resumed.examples, resumed.positives) == (50, 40)
    # a hash from before positives were counted: its total decides, as it did then
    store.client.hdel(f"{key_prefix}:model:buy", "positives")
    store.client.hset(f"{key_prefix}:model:buy", "version", 9)
    assert store.fetch("buy").positives is None
    assert served() != d.prior and scorer.version("buy") == 9


finite = st.floats(-1e6, 1e6, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(finite, finite, st.booleans()), min_size=1, max_size=40), st.tuples(finite, finite),
       st.sampled_from([{}, {"l2": 0.01}, {"intercept_lr": 0.0}]), st.sampled_from(["log", "none"]))
def test_the_flat_form_scores_as_river_does(examples: list, x: tuple[float, float], params: dict, transform: str) -> None:
    d = ModelDef(name="p", label={"events": ["order"], "within": "1h"}, features=["a", "b", "never_seen"], params=params,
                 transform=transform)
    m = build_model(d)
    assert Linear.of(m, d.features).log == (transform == "log")
    for a, b, y in examples:
        m.learn_one({"a": a, "b": b}, y)
    feats = {"a": x[0], "b": x[1], "never_seen": 7, "other": "text"}
    assert Linear.of(m, d.features).proba(feats) == pytest.approx(proba(m, vector(d.features, feats)[0]), abs=1e-9)


def test_only_the_default_logistic_pipeline_has_a_flat_form() -> None:
    for pipeline in ("hoeffding_tree", "fm", "arf"):
        d = ModelDef(name="p", label={"events": ["order"], "within": "1h"}, features=["a"], pipeline=pipeline)
        assert Linear.of(build_model(d), d.features) is None


def test_a_flat_scored_example_keeps_the_input_it_was_scored_with() -> None:
    """The flat form builds no input vector; the label step builds it for the examples it keeps, the same
    one River's path would have stored, and a missing feature still takes the guarded path (counted)."""
    learner = Learner(CFG.models[0], CFG)
    for i in range(30):
        learner.learn([Resolved("buy", "u", f"e{i}", i, i, {"views_1h": float(i % 7)}, 0.5, 0, i % 7 > 3)])
    snap = learner.maybe_publish(now=0, force=True)
    scorer = Scorer(CFG, lambda have: [snap] if have["buy"] < snap.version else [])
    en = Enriched(Event("e", "u", "browse", 0, position="p:0"), {"views_1h": 5})
    scorer.score_batch([("0", en)])
    assert en.scored["buy"] == (1, None) and en.scores["buy"] == pytest.approx(proba(learner.model, {"views_1h": 5.0}))
    labels = LabelEngine(CFG, lateness_ms=0, idle_ms=10**12)
    s = labels.new_state()
    labels.on_event(s, en, 0)
    assert s.pending[("buy", "u")][0].x == {"views_1h": 5.0}
    missing = Enriched(Event("e2", "u", "browse", 0), {})
    scorer.score_batch([("0", missing)])
    assert missing.scored["buy"] == (1, {"views_1h": 0.0}) and scorer.faults == 1


def test_non_finite_features_are_counted_and_the_event_still_scored() -> None:
    scorer = Scorer(CFG, lambda have: [])
    en = Enriched(Event("e", "u", "browse", 0), {"views_1h": float("inf")})
    scorer.score_batch([("0", en)])
    assert en.scores["buy"] == CFG.models[0].prior and scorer.faults == 1  # both models share one input


def test_a_model_that_raises_scores_the_prior_and_is_counted_and_the_event_goes_on() -> None:
    """A model fault must not stop the event: the prior scores it under version 0 (no prediction names a model
    that did not score), the error is counted, the other model scores as usual, and the input is kept."""
    snaps = [Snapshot.of("churn", 4, 100, Exploding(), positives=50),
             Snapshot.of("buy", 2, 100, build_model(CFG.models[0]), positives=50)]
    scorer = Scorer(CFG, lambda have: [s for s in snaps if have[s.name] < s.version])
    fine, bad = (Enriched(Event(f"e{v}", "u", "browse", 0), {"views_1h": v}) for v in (5, 500))
    scorer.score_batch([("0", fine), ("0", bad)])
    assert fine.scored["churn"][0] == 4 and fine.scores["churn"] == pytest.approx(0.5) and scorer.errors == 1
    assert bad.scores["churn"] == CFG.models[1].prior and bad.scored["churn"] == (0, {"views_1h": 500.0})
    assert bad.scored["buy"][0] == 2 and scorer.faults == 0


def test_an_example_a_model_raises_on_is_skipped_and_counted_and_learning_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    """Learning must not stop the flow either (a restart would meet the same example again): an example the
    model raises on, scoring it for the metrics or learning it, is skipped, counted once
    (``nudgeflow_model_learn_errors``) and logged; the rest of the batch is learned, and only learned examples
    count towards being warm."""

    class LearnOnly(Exploding):  # scores anything, fails to learn as Exploding does
        def predict_proba_one(self, x: dict[str, float]) -> dict[bool, float]:
            return {True: 0.5, False: 0.5}

    learners = []
    for model, fails in ((Exploding(), "score"), (LearnOnly(), "learn")):
        learner = Learner(CFG.models[0], CFG, model=model)
        learners.append(learner)
        batch = [Resolved("buy", "u", f"e{v}", 0, 0, {"views_1h": float(v)}, 0.5, 0, v > 3) for v in (1, 500, 5, 700)]
        caplog.clear()
        with caplog.at_level("WARNING", logger="operators.models"):
            _, predictions = learner.learn(batch)
        assert (learner.examples, learner.positives, learner.errors) == (2, 1, 2)
        assert [p.example.event_id for p in predictions] == (
            ["e1", "e5"] if fails == "score" else ["e1", "e500", "e5", "e700"])
        assert learner.total.count == len(predictions)
        assert learner.model._weights["views_1h"] > 0  # the two good examples were learned
        assert f"model buy could not {fails} the example of event e500 (1 so far): OverflowError: cannot {fails}" \
            in caplog.text
    assert pickle.loads(pickle.dumps(learners[0])).errors == 2


def test_learner_logic_warm_starts_from_the_published_snapshot() -> None:
    d = CFG.models[0]
    trained = Learner(d, CFG)
    for i in range(10):
        trained.learn([Resolved("buy", "u", f"e{i}", i, i, {"views_1h": float(i)}, 0.5, 0, i > 5)])
    trained.version = 6
    snap = trained.maybe_publish(now=0, force=True)
    logic = LearnerLogic(CFG, None, warm=lambda name: snap)
    out, _ = logic.on_batch([Resolved("buy", "u", "x", 100, 100, {"views_1h": 3.0}, 0.5, 7, False)])
    assert logic.learner is not None and logic.learner.examples == 11 and logic.learner.version >= 7


def test_a_snapshot_of_another_shape_than_the_definition_starts_the_learner_cold_numbering_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """models.yaml changed under a published snapshot (here from no transform to ``log``): the snapshot is not
    the model now defined, so the learner starts cold, and numbers its versions on from the snapshot's, or
    scorers holding it would never take the new model. A recovered learner of the old shape is replaced alike."""
    d = CFG.models[0]
    old = Learner(d.model_copy(update={"transform": "none"}), CFG)
    old.learn([Resolved("buy", "u", f"e{i}", i, i, {"views_1h": float(i)}, 0.5, 0, i > 5) for i in range(10)])
    old.version = 6
    snap = old.maybe_publish(now=0, force=True)
    assert snap is not None and snap.version == 7
    example = Resolved("buy", "u", "x", 100, 100, {"views_1h": 3.0}, 0.5, 7, False)
    logic = LearnerLogic(CFG, None, warm=lambda name: snap)
    logic.on_batch([example])
    assert logic.learner is not None and logic.learner.examples == 1
    assert models.shape(logic.learner.model) == models.shape(build_model(d)) != models.shape(old.model)
    assert logic.on_eof()[0][-1].version == 8
    assert "snapshot v7 is ['StandardScaler', 'LogisticRegression']" in caplog.text

    resumed = LearnerLogic(CFG, pickle.dumps(old), warm=lambda name: None)
    assert resumed.learner is not None and resumed.learner.examples == 0 and resumed.learner.version == 7
    same = LearnerLogic(CFG, pickle.dumps(logic.learner), warm=lambda name: None)
    assert same.learner is not None and same.learner.examples == 1  # of the shape defined: kept as it was


def test_repo_models_validate_and_bad_ones_are_named(tmp_path: Path) -> None:
    from nudgeflow.configload import load_deployment

    dep = load_deployment(Path(__file__).parents[1] / "config" / "local.yaml")
    assert {m.name for m in dep.models.models} >= {"purchase_propensity", "purchase_propensity_30m", "churn_risk"}
    bad = tmp_path / "models.yaml"
    bad.write_text(
        "models:\n"
        "  - name: p\n"
        "    label: {events: [order], within: 1h}\n"
        "    features: [views_1h, no_such_feature]\n"
        "    pipeline: hoeffding_tree\n"
        "    params: {grace_period: 50, learning_rate: 3}\n"
    )
    with pytest.raises(ConfigError) as e:
        load_models(bad, EventsConfig(), ["views_1h"])
    msg = str(e.value)
    assert "models.yaml:4: models.0.features.1: unknown feature 'no_such_feature'" in msg
    assert "models.0.params" in msg and "learning_rate" in msg
    with pytest.raises(ValueError, match="no learning rate"):
        build_model(ModelDef(name="t", label={"events": ["order"], "within": "1h"}, features=["a"],
                             pipeline="hoeffding_tree", params={"lr": 0.1}))
    # parameters River takes without a look, and which would fail or diverge only as a running flow learns
    bad.write_text("models:\n" + "".join(
        f"  - {{name: m{i}, label: {{events: [order], within: 1h}}, features: [views_1h], pipeline: {pipe}, "
        f"params: {params}}}\n"
        for i, (pipe, params) in enumerate([("logistic", "{l2: x}"), ("logistic", "{lr: -0.01}"), ("fm", "{l2_weight: -1}"),
                                            ("logistic", "{intercept_lr: fast}"), ("logistic", "{lr: 1.0e-3, l2: 0}")])))
    with pytest.raises(ConfigError) as e:
        load_models(bad, EventsConfig(), ["views_1h"])
    assert [line.split(": ", 2)[1:] for line in str(e.value).splitlines()] == [
        ["models.0.params", "logistic with params {'l2': 'x'} fails on a first example: TypeError: VectorDict "
                            "values must be real numbers"],
        ["models.1.params", "lr: expected a positive number, got -0.01"],
        ["models.2.params", "l2_weight: a regularisation strength, expected 0 or more, got -1"],
        ["models.3.params", "logistic with params {'intercept_lr': 'fast'} fails on a first example: AttributeError: "
                            "'str' object has no attribute 'get'"],
    ]
    for pipeline in ("logistic", "hoeffding_tree", "arf", "fm"):
        m = build_model(ModelDef(name="t", label={"events": ["order"], "within": "1h"}, features=["a"], pipeline=pipeline))
        m.learn_one({"a": 1.0}, True)
        assert 0.0 <= m.predict_proba_one({"a": 1.0}).get(True, 0.0) <= 1.0
