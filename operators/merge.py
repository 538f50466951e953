"""Identity merges inside a per-user step: move one shopper's state to another, exactly once.

Every per-user step (features, triggers, labels) keeps its state per *shard*,
and the two shoppers an identity link merges usually live in different shards,
possibly in different processes. Bytewax has no way to send an item from one key
of a step back into another key of the same step, so the state travels beside
the dataflow: the identity step emits the merge twice, ``release`` to the source
user's shard and ``absorb`` to the canonical user's shard. The releasing shard
puts the source user's part into a :class:`Handoff` under the merge's ``seq``
(memory within a process, Redis across processes); the absorbing shard waits for it, trying again on every batch and on a
short timer, and merges it. Merges within one shard (``local``) need no handoff.

Exactly once: a shard releases a user once (it then forgets it); the absorbing
shard takes each ``seq`` once, and what it is still waiting for is part of its
snapshot. After a crash both shards resume from the same epoch: the release runs
again and puts the same part again (Redis copies are read, never deleted, and
expire by TTL), the absorb finds it. Merges commute with events wherever the
engines' ``absorb`` is exact (see each engine), so events the canonical user
receives while its part is still on its way are not lost, only briefly scored
without the other part.

Chains (``a`` into ``b`` while ``b`` still waits for ``c``) carry the waiting
absorbs along with the released part, so ``c`` lands in the final user.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from typing import Any, Generic, Protocol, TypeVar

from nudgeflow.events import Merge

S = TypeVar("S")
O = TypeVar("O")

RETRY_S = 0.02
"""How soon a shard waiting for a hand-over looks again when no batch comes (the releasing shard hands it
over at the end of the batch that carried the release)."""


def pop_user(d: dict[tuple[str, str], Any], names: Iterable[str], uid: str) -> dict[str, Any]:
    """Remove the entries of ``uid`` from a dict keyed by (name, user), e.g. (trigger, user) or (model, user);
    return them by name. Probing the known names costs O(names), never a scan of the shard.

    >>> d = {("a", "u1"): 1, ("b", "u1"): 2, ("a", "u2"): 3}
    >>> pop_user(d, ["a", "b", "c"], "u1"), d
    ({'a': 1, 'b': 2}, {('a', 'u2'): 3})
    """
    return {n: v for n in names if (v := d.pop((n, uid), None)) is not None}


class Handoff(Protocol):
    """Where released parts wait for their absorbing shard (``connectors.identity_store.RedisHandoff``):
    ``put_many`` may hold parts back until ``flush``; ``pending`` says it does."""

    def put_many(self, step: str, parts: list[tuple[int, bytes]]) -> None: ...

    def get_many(self, step: str, seqs: list[int]) -> list[bytes | None]: ...

    def flush(self, due_only: bool = False) -> None: ...

    def pending(self) -> bool: ...


class Mergeable(Protocol[S, O]):
    """What an engine offers for merges (see ``FeatureEngine``, ``TriggerEngine``, ``LabelEngine``)."""

    def release(self, st: S, uid: str) -> Any | None: ...

    def absorb(self, st: S, uid: str, part: Any) -> list[O]: ...


class MergeDesk(Generic[S, O]):
    """One shard's side of merges for one step: ``take`` each Merge item in stream order, then ``settle``
    once per batch (one handoff write and one read for the whole batch).

    >>> class Shelf:  # a toy engine: the state is a dict of per-user counts
    ...     def release(self, st, uid): return st.pop(uid, None)
    ...     def absorb(self, st, uid, part): st[uid] = st.get(uid, 0) + part; return []
    >>> class Box:  # a handoff in a dict (the flows use Redis)
    ...     def __init__(self): self.d = {}
    ...     def put_many(self, step, parts): self.d.update({(step, s): b for s, b in parts})
    ...     def get_many(self, step, seqs): return [self.d.get((step, s)) for s in seqs]
    ...     def flush(self, due_only=False): pass
    ...     def pending(self): return False
    >>> box, eng = Box(), Shelf()
    >>> a, b = {"anon:1": 2}, {"u1": 5}
    >>> da, db = MergeDesk("counts", box), MergeDesk("counts", box)
    >>> db.take(eng, b, Merge("anon:1", "u1", 1, 0, "absorb")); db.settle(eng, b); db.waiting  # not released yet
    []
    []
    [Merge(src='anon:1', dst='u1', seq=1, ts=0, side='absorb')]
    >>> da.take(eng, a, Merge("anon:1", "u1", 1, 0, "release")); da.settle(eng, a)
    []
    []
    >>> db.settle(eng, b); (a, b, db.waiting)
    []
    ({}, {'u1': 7}, [])
    """

    def __init__(self, step: str, handoff: Handoff | None, waiting: list[Merge] | None = None):
        self.step = step
        self.handoff = handoff
        #: absorbs whose part has not arrived yet (snapshotted with the step's state)
        self.waiting: list[Merge] = waiting or []
        self._puts: list[tuple[int, bytes]] = []
        #: this desk put hand-overs the handoff may still hold back (``pending``): it wakes until they are out
        self.owes = False

    def take(self, engine: Mergeable[S, O], st: S, m: Merge) -> list[O]:
        """Handle one merge where it stands in the stream (a release must follow the user's earlier events)."""
        if m.side == "absorb":
            self.waiting.append(m)
            return []
        part = engine.release(st, m.src)
        carried = [w for w in self.waiting if w.dst == m.src]
        if carried:
            self.waiting = [w for w in self.waiting if w.dst != m.src]
        if m.side == "local":
            self._carry(carried, m.dst)
            return engine.absorb(st, m.dst, part) if part is not None else []
        self._puts.append((m.seq, pickle.dumps((part, carried), protocol=pickle.HIGHEST_PROTOCOL)))
        return []

    def settle(self, engine: Mergeable[S, O], st: S) -> list[O]:
        """Hand over this batch's releases, then absorb every part that has arrived."""
        if self.handoff is None:
            return []
        if self._puts:
            self.handoff.put_many(self.step, self._puts)
            self._puts = []
            self.owes = True
        else:
            self.handoff.flush(due_only=True)
        out: list[O] = []
        looking, self.waiting = self.waiting, []
        while looking:  # a part may carry absorbs its user was waiting for: look for those at once
            carried: list[Merge] = []
            for w, blob in zip(looking, self.handoff.get_many(self.step, [w.seq for w in looking])):
                if blob is None:
                    self.waiting.append(w)
                    continue
                part, theirs = pickle.loads(blob)
                carried.extend(Merge(c.src, w.dst, c.seq, c.ts, "absorb") for c in theirs)
                if part is not None:
                    out.extend(engine.absorb(st, w.dst, part))
            looking = carried
        return out

    def _carry(self, carried: list[Merge], dst: str) -> None:
        self.waiting.extend(Merge(w.src, dst, w.seq, w.ts, "absorb") for w in carried)

    def finish(self, engine: Mergeable[S, O], st: S, timeout_s: float = 10.0) -> list[O]:
        """``settle`` at the end of a bounded input: every release was sent, but another worker may not have
        written its hand-over yet, so wait for it (at most ``timeout_s``)."""
        out = self.settle(engine, st)
        if self.handoff is not None:
            self.handoff.flush()  # shards of other processes may wait for this process's releases
        deadline = time.monotonic() + timeout_s
        while self.waiting and time.monotonic() < deadline:
            time.sleep(RETRY_S)
            out.extend(self.settle(engine, st))
        return out

    def wake(self, at: datetime | None) -> datetime | None:
        """A logic's ``notify_at``, brought forward while this desk awaits a hand-over or one it put waits to be
        sent. Only the desks that put one wake for it: the handoff is the process's, and every shard of every
        step waking each ``RETRY_S`` while any was held back cost thousands of empty calls a second."""
        if self.owes and not (self.handoff is not None and self.handoff.pending()):
            self.owes = False
        if not self.waiting and not self.owes:
            return at
        soon = datetime.now(timezone.utc) + timedelta(seconds=RETRY_S)
        return soon if at is None or soon < at else at


def restore(resume: bytes | None, fresh: Callable[[], S]) -> tuple[S, list[Merge]]:
    """A per-user step's state and awaited absorbs, from a snapshot :func:`snapshot` made (or fresh)."""
    if resume is None:
        return fresh(), []
    state, waiting = pickle.loads(resume)
    return state, waiting


def snapshot(state: Any, desk: MergeDesk[Any, Any] | None) -> bytes:
    """A per-user step's snapshot: its state and the absorbs it still awaits.

    The hand-overs of releases the state no longer holds are written out first: a shard of another process
    may await one, and after a crash the resumed release would not run again to put it."""
    if desk is not None and desk.handoff is not None:
        desk.handoff.flush()
    return pickle.dumps((state, desk.waiting if desk else []), protocol=pickle.HIGHEST_PROTOCOL)
