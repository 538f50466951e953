"""The feature snapshot sampler: at most one sample per user per slot of event time, bounded memory."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from operators.features import UserFeatures
from operators.sampling import SnapshotSampler

HOUR = 3_600_000


def uf(user: str, ts: int) -> UserFeatures:
    return UserFeatures(user, ts, {"ts": ts})


def test_first_publication_of_each_slot_is_kept() -> None:
    s = SnapshotSampler(HOUR)
    out = s.sample_batch([uf("a", 10), uf("a", 20), uf("b", 30)]) + s.sample_batch([uf("a", HOUR - 1), uf("a", HOUR + 5)])
    assert [(slot, x.user_id, x.ts) for slot, x in out] == [(0, "a", 10), (0, "b", 30), (HOUR, "a", HOUR + 5)]


def test_an_older_publication_never_resamples_a_past_slot() -> None:
    s = SnapshotSampler(HOUR)
    s.sample_batch([uf("a", 3 * HOUR)])
    assert s.sample_batch([uf("a", HOUR)]) == []


@given(st.lists(st.tuples(st.sampled_from("abcdef"), st.integers(0, 20 * HOUR)), max_size=200),
       st.integers(1, 50))
def test_at_most_one_sample_per_user_and_slot_whatever_the_batches(pubs: list[tuple[str, int]], cut: int) -> None:
    pubs_by_user: dict[str, list[int]] = {}
    for user, ts in pubs:  # a user's publications come in event-time order (its newest event)
        pubs_by_user.setdefault(user, []).append(ts)
    ordered = [uf(u, ts) for u, tss in pubs_by_user.items() for ts in sorted(tss)]
    s = SnapshotSampler(HOUR)
    out = [x for i in range(0, len(ordered), cut) for x in s.sample_batch(ordered[i:i + cut])]
    keys = [(x.user_id, slot) for slot, x in out]
    assert len(keys) == len(set(keys))
    assert set(keys) == {(x.user_id, x.ts // HOUR * HOUR) for x in ordered}  # every slot seen is sampled
    assert all(slot <= x.ts < slot + HOUR for slot, x in out)


def test_memory_is_bounded_by_the_active_users() -> None:
    s = SnapshotSampler(HOUR, max_users=100)
    for i in range(1000):  # 100 new users in each of 10 slots
        s.sample_batch([uf(f"u{i}", (i // 100) * HOUR)])
    assert len(s) <= 400  # at most twice the users of the newest two slots
    assert s.sample_batch([uf("u999", 9 * HOUR + 1)]) == []  # the newest slot's users are remembered
