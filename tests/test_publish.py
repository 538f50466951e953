"""Scores to Redis: each shopper's newest scores once per interval, merged-away shoppers deleted after them."""

from __future__ import annotations

import pickle

from hypothesis import given, settings
from hypothesis import strategies as st

from nudgeflow.events import Event, Merge
from operators.features import GONE_TS, Enriched
from operators.publish import ScoreFields


def scored(uid: str, ts: int, p: float) -> Enriched:
    en = Enriched(Event(f"e{ts}", uid, "browse", ts), {})
    en.scores["buy"] = p
    return en


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 50)), max_size=6), max_size=8))
def test_one_write_per_shopper_per_interval_with_the_newest_scores(batches: list[list[tuple[str, int]]]) -> None:
    logic = ScoreFields(None, every_s=3600.0, recover=False)
    for batch in batches:
        out, _ = logic.on_batch([scored(u, ts, ts / 100) for u, ts in batch])
        assert out == []  # within the interval nothing is written
    assert (logic.notify_at() is not None) == any(batches)
    written, _ = logic.on_notify()
    newest: dict[str, int] = {}
    for u, ts in (x for b in batches for x in b):
        newest[u] = max(newest.get(u, -1), ts)
    assert sorted((w.user_id, w.ts, w.features["score_buy"]) for w in written) == sorted(
        (u, ts, ts / 100) for u, ts in newest.items()
    )
    assert logic.notify_at() is None and logic.on_notify()[0] == []


def test_a_merged_away_shopper_is_deleted_after_its_last_scores() -> None:
    logic = ScoreFields(None, every_s=3600.0, recover=True)
    logic.on_batch([scored("anon:c", 5, 0.5), Merge("anon:c", "u1", 1, 6, "release"), scored("u1", 7, 0.25)])
    logic.on_batch([Merge("anon:d", "u1", 2, 8, "absorb")])  # the absorbing side deletes nothing
    resumed = ScoreFields(pickle.loads(pickle.dumps(logic.snapshot())), every_s=3600.0, recover=True)
    out, _ = resumed.on_eof()
    assert {w.user_id: (w.ts, w.gone) for w in out} == {"anon:c": (GONE_TS, True), "u1": (7, False)}
