"""Scores to Redis, coalesced: each shopper's newest scores once per publication interval.

The feature step writes a changed shopper once per ``features.publish_interval``
(:class:`operators.features.FeatureLogic`); scores follow the same rule here.
Written per source batch instead, a live flow (a few events per batch) paid a
Redis round trip per batch, about a tenth of its worker's time.
"""

from __future__ import annotations

from datetime import datetime

from bytewax.operators import StatefulBatchLogic

from nudgeflow.events import Merge
from operators.clock import Deadline
from operators.features import GONE_TS, Enriched, UserFeatures


Pending = dict[str, tuple[int, dict[str, float] | None]]
"""Shopper -> (event time, the scores of their newest scored event; None: merged away, delete the hash)."""


class ScoreFields(StatefulBatchLogic[Enriched | Merge, UserFeatures, Pending]):
    """One shard's newest scores per shopper, as fields of their Redis hash (``score_<model>``), emitted every
    ``every_s`` of wall time (0: every batch); Bytewax wakes the shard when it goes quiet, so nothing waits
    longer than that. A shopper merged into another (identity) leaves a ``gone`` item, which deletes their
    hash after their last scores: later than any score (``GONE_TS``), it replaces what was pending.
    Per event only a reference is kept (a copy only where events score different models, such as an order,
    which the purchase models do not score, or a look at a quiet shopper, which only models scoring ``any``
    type do: each model's score comes from the newest event it scored); the fields are built at the flush.

    ``recover``: the pending scores go into the shard's snapshot (else a crash could lose the scores of
    events before the snapshot, which are not replayed).

    >>> from nudgeflow.events import Event
    >>> logic = ScoreFields(None, every_s=0.0, recover=False)
    >>> def scored(uid, ts, p, model="buy"):
    ...     en = Enriched(Event("e", uid, "browse", ts), {})
    ...     en.scores[model] = p
    ...     return en
    >>> out, _ = logic.on_batch([scored("u1", 5, 0.25), scored("u1", 3, 0.5), scored("u2", 1, 0.125)])
    >>> [(u.user_id, u.ts, u.features) for u in out]
    [('u1', 5, {'score_buy': 0.25}), ('u2', 1, {'score_buy': 0.125})]
    >>> out, _ = logic.on_batch([scored("u1", 5, 0.25), scored("u1", 9, 0.75, "churn"), scored("u1", 4, 0.5, "x")])
    >>> [(u.user_id, u.ts, u.features) for u in out]
    [('u1', 9, {'score_x': 0.5, 'score_buy': 0.25, 'score_churn': 0.75})]
    """

    def __init__(self, resume: Pending | None, every_s: float, recover: bool):
        self.pending: Pending = resume or {}
        self.recover = recover
        self.flush_due = Deadline(every_s)

    def on_batch(self, values: list[Enriched | Merge]) -> tuple[list[UserFeatures], bool]:
        pending = self.pending
        for en in values:
            if type(en) is Enriched:
                scores = en.scores
                if scores:
                    uid, ts = en.event.user_id, en.event.ts
                    prev = pending.get(uid)
                    if prev is None:
                        pending[uid] = (ts, scores)
                    elif ts >= prev[0]:  # models this event's type is not scored by keep their newer scores
                        pending[uid] = (ts, scores if scores.keys() >= prev[1].keys() else {**prev[1], **scores})
                    elif not scores.keys() <= prev[1].keys():
                        pending[uid] = (prev[0], {**scores, **prev[1]})
            elif en.side != "absorb":  # type: ignore[union-attr]
                pending[en.src] = (GONE_TS, None)  # type: ignore[union-attr]
        if self.flush_due.due():
            return self._flush(), StatefulBatchLogic.RETAIN
        return [], StatefulBatchLogic.RETAIN

    def _flush(self) -> list[UserFeatures]:
        self.flush_due.reset()
        out = [
            UserFeatures(uid, GONE_TS, {}, gone=True) if scores is None
            else UserFeatures(uid, ts, {f"score_{k}": round(v, 6) for k, v in scores.items()})
            for uid, (ts, scores) in self.pending.items()
        ]
        self.pending = {}
        return out

    def on_notify(self) -> tuple[list[UserFeatures], bool]:
        return self._flush(), StatefulBatchLogic.RETAIN

    def on_eof(self) -> tuple[list[UserFeatures], bool]:
        return self._flush(), StatefulBatchLogic.RETAIN

    def notify_at(self) -> datetime | None:
        return self.flush_due.at if self.pending else None

    def snapshot(self) -> Pending:
        return dict(self.pending) if self.recover else {}
