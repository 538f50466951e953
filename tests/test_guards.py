"""Guards on a real Redis: caps never exceeded whatever the interleaving, cooldowns, budgets, rate limits,
idempotency across restarts; and the in-state guards (consent, quiet hours, holdout, control group)."""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.guard_store import DAY_MS, RedisGuards
from nudgeflow.events import Action, Decision, Event
from nudgeflow.settings import TriggersFile
from operators.features import Enriched
from operators.guards import Profile, StateGuards, bucket
from operators.triggers import TriggerEngine

HOUR = 3_600_000


def action(trigger: str, user: str, occurrence: str, ts: int, priority: int = 0, channel: str = "email") -> Action:
    return Action(f"{trigger}/{user}/{occurrence}", trigger, user, channel, occurrence, ts, ts, ts, {}, {},
                  priority=priority)


def triggers(**file: object) -> TriggersFile:
    base: dict[str, object] = {
        "defaults": {"cooldown": 0},
        "triggers": [{"id": f"t{p}", "kind": "event", "on": ["browse"], "priority": p} for p in range(4)],
    }
    return TriggersFile.model_validate(base | file)


candidates = st.lists(
    st.tuples(st.sampled_from(["u1", "u2"]), st.integers(0, 3), st.integers(0, 9 * 24)),  # user, priority, hour
    min_size=1, max_size=40, unique_by=lambda c: c,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(candidates, st.lists(st.integers(1, 10), min_size=1, max_size=8), st.randoms())
def test_frequency_caps_are_never_exceeded_whatever_the_interleaving(guards_of, cands, cuts, rnd) -> None:
    tf = triggers(frequency_cap={"per_day": 2, "per_week": 5})
    workers = [guards_of(tf)]
    workers.append(guards_of(tf, workers[0].prefix))  # a second worker on the same Redis
    acts = [action(f"t{p}", u, f"h{h}", h * HOUR, priority=p) for u, p, h in cands]
    rnd.shuffle(acts)
    decisions: list[Decision] = []
    i = 0
    for n, cut in enumerate(cuts * 10):
        if i >= len(acts):
            break
        batch = acts[i:i + cut]
        decided = workers[n % 2].decide_batch(batch)
        decisions += decided
        # within one batch, the highest priorities take what the cap leaves
        for d in decided:
            if d.reason == "frequency_cap":
                rivals = [x for x in decided if x.action.user_id == d.action.user_id
                          and x.action.event_ts // DAY_MS == d.action.event_ts // DAY_MS and x.outcome == "fired"]
                assert all(x.action.priority >= d.action.priority for x in rivals)
        i += cut
    assert sorted(d.action.action_id for d in decisions) == sorted(a.action_id for a in acts[:i])
    fired = [d.action for d in decisions if d.outcome == "fired"]
    per_day = Counter((a.user_id, a.event_ts // DAY_MS) for a in fired)
    per_week = Counter((a.user_id, (a.event_ts // DAY_MS + 3) // 7) for a in fired)
    assert max(per_day.values(), default=0) <= 2 and max(per_week.values(), default=0) <= 5
    assert {d.reason for d in decisions if d.outcome != "fired"} <= {"frequency_cap"}


def test_cooldown_budget_and_rate_limit(guards_of) -> None:
    tf = triggers(
        frequency_cap={"per_day": None, "per_week": None},
        channels={"sms": {"rate": 0.001, "burst": 2}},
        triggers=[
            {"id": "cool", "kind": "event", "on": ["browse"], "guards": {"cooldown": "1h"}},
            {"id": "budget", "kind": "event", "on": ["browse"], "guards": {"daily_budget": 2}},
            {"id": "texts", "kind": "event", "on": ["browse"], "channel": "sms"},
        ],
    )
    g = guards_of(tf)
    got = [
        (d.action.occurrence, d.outcome, d.reason)
        for d in g.decide_batch([
            action("cool", "u1", "a", 0), action("cool", "u1", "b", HOUR // 2), action("cool", "u1", "c", 2 * HOUR),
        ])
    ]
    assert got == [("a", "fired", ""), ("b", "suppressed", "cooldown"), ("c", "fired", "")]
    budget = [d.reason for d in g.decide_batch([action("budget", f"u{i}", "x", 0) for i in range(4)])]
    assert sorted(budget) == ["", "", "budget", "budget"]
    sms = [d.reason for d in g.decide_batch([action("texts", f"u{i}", "x", 0, channel="sms") for i in range(3)])]
    assert sorted(sms) == ["", "", "rate_limited"]


def test_a_replay_after_a_restart_never_delivers_twice(guards_of) -> None:
    tf = triggers(frequency_cap={"per_day": None, "per_week": None})
    first = guards_of(tf)
    acts = [action("t0", f"u{i}", "e1", i) for i in range(20)]
    assert {d.outcome for d in first.decide_batch(acts)} == {"fired"}
    restarted = guards_of(tf, first.prefix)  # a new process replaying the same input
    again = restarted.decide_batch(acts)
    assert {(d.outcome, d.reason) for d in again} == {("suppressed", "duplicate")}


def test_consent_quiet_hours_holdout_and_control_group() -> None:
    tf = TriggersFile.model_validate({
        "control_group": 10,
        "triggers": [
            {"id": "news", "kind": "event", "on": ["browse"], "guards": {"consent": "opt_in"}},
            {"id": "push", "kind": "event", "on": ["browse"], "channel": "push",
             "guards": {"quiet_hours": {"start": "21:00", "end": "08:00", "mode": "hold"}}},
            {"id": "late", "kind": "event", "on": ["browse"], "channel": "push",
             "guards": {"quiet_hours": {"start": "21:00", "end": "08:00", "mode": "drop"}}},
            {"id": "held_out", "kind": "event", "on": ["browse"], "guards": {"holdout": 30}},
        ],
    })
    g = StateGuards(tf)
    users = [f"u{i}" for i in range(2000)]
    control = {u for u in users if bucket(u, "control") < 10}
    assert 150 < len(control) < 250  # about 10 %, and stable: the same users every time
    u = next(u for u in users if u not in control)
    p = Profile()
    decided, _ = g.check(action("news", u, "e", 0), p, 0)
    assert (decided.outcome, decided.reason) == ("suppressed", "no_consent")  # opt_in needs a grant
    p.consent["email"] = True
    assert g.check(action("news", u, "e", 0), p, 0) == (None, None)
    p.attrs["timezone"] = "Europe/Berlin"
    night = 1_700_000_000_000  # 23:13 in Berlin
    decided, until = g.check(action("push", u, "e", night, channel="push"), p, night)
    assert (decided.outcome, decided.reason, until) == ("held", "quiet_hours", 1_700_031_600_000)  # 08:00
    decided, until = g.check(action("late", u, "e", night, channel="push"), p, night)
    assert (decided.reason, until) == ("quiet_hours", None)
    outs = Counter(
        (g.check(action("held_out", v, "e", 0), None, 0)[0] or Decision(action("x", v, "", 0), "fired", "")).outcome
        for v in users if v not in control
    )
    assert 0.25 < outs["holdout"] / sum(outs.values()) < 0.35


def test_a_held_action_is_decided_again_when_quiet_hours_end() -> None:
    tf = TriggersFile.model_validate({"triggers": [
        {"id": "push", "kind": "event", "on": ["browse"], "channel": "push",
         "guards": {"quiet_hours": {"start": "21:00", "end": "08:00"}}},
    ]})
    engine = TriggerEngine(tf, lateness_ms=0, idle_ms=10**12, now_ms=lambda: 0, guards=StateGuards(tf))
    s = engine.new_state()
    ident = Event("i", "u1", "identify", 0, props={"timezone": "Europe/Berlin"}, position="t:0:0")
    engine.on_event(s, Enriched(ident, {}), 0)
    night = 1_700_000_000_000
    [held] = engine.on_event(s, Enriched(Event("b", "u1", "browse", night, position="t:0:1"), {}), 0)
    assert (held.outcome, held.reason) == ("held", "quiet_hours")
    assert engine.advance(s, 1_700_031_599_999) == []
    [released] = engine.advance(s, 1_700_031_600_000)
    assert type(released) is Action and released.action_id == held.action.action_id
