"""Online propensity models: score live, keep pending examples, learn them once their horizon has passed.

Three steps, each a Bytewax step in the main flow:

1. **Score** (stateless, every worker): :class:`Scorer` scores events with the
   newest *published* snapshot of each model, looking for a newer one every
   ``refresh_every`` of wall or of event time. Until a model has learned
   ``min_examples`` of each outcome it answers its ``prior``. Non-finite or
   missing features are set to 0 and counted; a model that raises answers its
   prior and is counted.
2. **Label** (keyed by shard, event time): :class:`LabelEngine` keeps a pending
   example (the feature snapshot *taken when scoring*, the score, the model
   version) for at most one event per user per ``sample_every``. A label event
   within ``within`` labels it (``occurs``: positive; ``absent``: negative);
   none by the deadline, the opposite. Either way it is resolved when the
   watermark passes its deadline, so the learner takes examples in the order
   they were sampled: learning an order's positive at once, while the
   negatives of the same hour come only a horizon later, made a learner that
   had seen a day of positives and no negative (the served purchase score's
   ECE after a horizon 0.088 on a week of simulated events, 0.054 held; churn,
   whose negatives come first, 0.158 and 0.109 over four weeks). So a user
   holds at most ``ceil(within / sample_every) + 1`` pending examples per
   model, each for ``within``.
3. **Learn** (keyed by model: one learner per model): :class:`Learner` scores
   each resolved example with the current model *before* learning it
   (progressive validation), updates AUC, log loss, Brier score and
   calibration per window of event time, learns it once, and publishes a
   versioned snapshot every ``publish_every_updates`` updates or
   ``publish_every`` seconds.

Snapshots carry the River version they were pickled with; loading one made by
another version is refused (River 0.25 broke older pickles).
"""

from __future__ import annotations

import heapq
import inspect
import logging
import math
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from itertools import accumulate
from operator import mul
from typing import Any

import river
from bytewax.operators import StatefulBatchLogic
from river import compose, facto, forest, linear_model, optim, preprocessing, tree
from river.utils.math import sigmoid

from nudgeflow.events import FEEDBACK_TYPES, IDLE, NOT_ACTIVITY, Merge
from nudgeflow.settings import ModelDef, ModelsFile
from operators.clock import PartitionClock
from operators.features import Enriched
from operators.merge import Handoff, MergeDesk, pop_user, restore, snapshot
from operators.clock import wall_ms

log = logging.getLogger(__name__)

RIVER_VERSION = river.__version__

_ESTIMATORS: dict[str, type] = {
    "logistic": linear_model.LogisticRegression,
    "hoeffding_tree": tree.HoeffdingTreeClassifier,
    "arf": forest.ARFClassifier,
    "fm": facto.FMClassifier,
}


def build_model(d: ModelDef) -> Any:
    """The River pipeline a model definition names; raises ValueError for parameters it does not take.

    >>> from nudgeflow.settings import ModelDef
    >>> m = build_model(ModelDef(name="p", label={"events": ["order"], "within": "1h"}, features=["views_1h"]))
    >>> type(m).__name__, list(m.steps)
    ('Pipeline', ['symlog', 'StandardScaler', 'LogisticRegression'])
    """
    cls = _ESTIMATORS[d.pipeline]
    params = dict(d.params)
    lr = params.pop("lr", None)
    accepted = set(inspect.signature(cls).parameters)
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(f"{d.pipeline} does not take {unknown}; it takes lr and {sorted(accepted)}")
    for name, value in params.items():  # regularisation strengths: a negative one rewards large weights
        if name.startswith(("l1", "l2")) and isinstance(value, (int, float)) and value < 0:
            raise ValueError(f"{name}: a regularisation strength, expected 0 or more, got {value!r}")
    if lr is not None:
        if d.pipeline not in ("logistic", "fm"):
            raise ValueError(f"{d.pipeline} has no learning rate (lr)")
        try:
            rate = float(lr)
        except (TypeError, ValueError):
            rate = math.nan
        if isinstance(lr, bool) or not 0 < rate < math.inf:  # a negative rate climbs the loss
            raise ValueError(f"lr: expected a positive number, got {lr!r}")
        params["optimizer" if d.pipeline == "logistic" else "weight_optimizer"] = optim.SGD(rate)
    if "seed" in accepted:
        params.setdefault("seed", 42)
    try:
        est = cls(**params)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{d.pipeline}: {e}") from None
    steps: list[Any] = [compose.FuncTransformer(symlog)] if d.transform == "log" else []
    if d.pipeline in ("logistic", "fm"):  # gradient models want scaled inputs; trees do not
        steps.append(preprocessing.StandardScaler())
    return compose.Pipeline(*steps, est) if steps else est


def check_model(d: ModelDef) -> None:
    """Build the model and teach a copy a few examples of both outcomes: River takes most parameters without
    a look (a string where a number goes), and such a model would fail at the first example a running flow
    learns. Raises ValueError saying why, for ``nudgeflow validate``.

    >>> d = ModelDef(name="p", label={"events": ["order"], "within": "1h"}, features=["a"], params={"l2": "x"})
    >>> check_model(d)
    Traceback (most recent call last):
    ...
    ValueError: logistic with params {'l2': 'x'} fails on a first example: TypeError: ...
    """
    model = build_model(d)
    xs = [dict.fromkeys(d.features, float(v)) for v in (0, 1, 10, 100)]
    try:
        for i, x in enumerate(xs + xs):
            model.learn_one(x, i % 2 == 1)
        ps = [proba(model, x) for x in xs]
    except Exception as e:  # whatever River raises for a parameter it cannot use
        raise ValueError(f"{d.pipeline} with params {dict(d.params)} fails on a first example: "
                         f"{type(e).__name__}: {e}") from None
    if not all(0.0 <= p <= 1.0 for p in ps):  # NaN too
        raise ValueError(f"{d.pipeline} with params {dict(d.params)} scores {ps} after a few examples, not "
                         "probabilities")


def symlog(x: dict[str, float]) -> dict[str, float]:
    """sign(v)·ln(1 + |v|) of every input (``transform: log``): a module function, so snapshots pickle it by name.

    A shopper with 40 views an hour is not eight times one with 5; in log terms, with the other inputs
    scaled alike, a linear model weighs orders of magnitude. Signed, so that a ``-1`` (never) stays below 0.

    >>> {k: round(v, 3) for k, v in symlog({"views": 0.0, "carts": 9.0, "since": -1.0}).items()}
    {'views': 0.0, 'carts': 2.303, 'since': -0.693}
    """
    return {k: math.log1p(v) if v >= 0 else -math.log1p(-v) for k, v in x.items()}


def shape(model: Any) -> list[str]:
    """The kinds of a model's steps: a snapshot of another shape than its definition builds now is not that model.

    >>> d = ModelDef(name="p", label={"events": ["order"], "within": "1h"}, features=["a"])
    >>> shape(build_model(d)), shape(build_model(d.model_copy(update={"transform": "none", "pipeline": "arf"})))
    (['FuncTransformer:symlog', 'StandardScaler', 'LogisticRegression'], ['ARFClassifier'])
    """
    steps = model.steps.values() if type(model) is compose.Pipeline else [model]
    return [f"FuncTransformer:{s.func.__name__}" if type(s) is compose.FuncTransformer else type(s).__name__
            for s in steps]


class SnapshotVersionError(RuntimeError):
    """A snapshot pickled by another River version: refuse it rather than load garbage."""


@dataclass(slots=True)
class Snapshot:
    """A published model: what scoring workers load."""

    name: str
    version: int
    examples: int
    river: str
    blob: bytes
    #: examples learned with a positive label; None in snapshots published before they were counted
    positives: int | None = None

    @classmethod
    def of(cls, name: str, version: int, examples: int, model: Any, positives: int | None = None) -> Snapshot:
        blob = pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL)
        return cls(name, version, examples, RIVER_VERSION, blob, positives)

    def warm(self, min_examples: int) -> bool:
        """Whether scoring may use it: it has learned ``min_examples`` examples of *each* outcome.

        Labels of one outcome come first: a purchase head learns positives as orders arrive and its first
        negative only when a horizon has passed (a churn head the other way round). Until then the model
        has seen one class and scores everyone near 1 (or 0); the prior is saner. Measured on 1M simulated
        events: on the first day the served purchase score had an ECE of 0.63.

        >>> s = Snapshot("buy", 3, 500, RIVER_VERSION, b"", positives=480)
        >>> s.warm(200), s.warm(20), Snapshot("buy", 3, 500, RIVER_VERSION, b"").warm(200)
        (False, True, True)
        """
        if self.positives is None:  # an older publisher: only the total is known
            return self.examples >= min_examples
        return min(self.positives, self.examples - self.positives) >= min_examples

    def load(self) -> Any:
        if self.river != RIVER_VERSION:
            raise SnapshotVersionError(
                f"model {self.name!r} v{self.version} was saved by River {self.river}; this is River "
                f"{RIVER_VERSION}: its pickle cannot be trusted. Retrain, or run the River it was made with."
            )
        return pickle.loads(self.blob)


def vector(names: Iterable[str], feats: dict[str, Any]) -> tuple[dict[str, float], int]:
    """The model input from features by name; missing, non-numeric or non-finite values become 0 and count as faults.

    >>> vector(["a", "b", "c"], {"a": 2, "b": float("nan")})
    ({'a': 2.0, 'b': 0.0, 'c': 0.0}, 2)
    """
    x: dict[str, float] = {}
    faults = 0
    for n in names:
        v = feats.get(n)
        t = type(v)
        if t is int or t is bool:
            x[n] = float(v)
        elif t is float and v - v == 0.0:  # false for inf and nan
            x[n] = v
        else:
            x[n] = 0.0
            faults += 1
    return x, faults


def proba(model: Any, x: dict[str, float]) -> float:
    p = model.predict_proba_one(x)
    return float(p.get(True, 0.0))


@dataclass(frozen=True, slots=True)
class Linear:
    """A published (symlog +) scaler + logistic regression flattened to one weighted sum, for the hot path.

    River scores ``sigmoid(b + Σ w_i (t(x_i) - mean_i) / std_i)`` by walking the pipeline's dicts (a new
    dict per step); that equals ``sigmoid(b' + Σ c_i t(x_i))`` with ``c_i = w_i / std_i`` and
    ``b' = b - Σ c_i mean_i``, computed once per snapshot: ~5x faster per event, equal up to rounding
    (``t``: :func:`symlog` when the pipeline starts with it, else the identity).

    >>> d = ModelDef(name="p", label={"events": ["order"], "within": "1h"}, features=["a", "b"])
    >>> for transform in ("log", "none"):
    ...     m = build_model(d.model_copy(update={"transform": transform}))
    ...     for i in range(20):
    ...         m.learn_one({"a": float(i % 4), "b": float(i % 3 - 1)}, i % 4 > 1)
    ...     lin = Linear.of(m, ["a", "b"])
    ...     print(lin.log, round(lin.proba({"a": 3, "b": -1}), 12) == round(proba(m, {"a": 3.0, "b": -1.0}), 12))
    True True
    False True
    >>> lin.proba({"a": float("nan"), "b": 1}) is None  # the caller's guarded path counts the fault
    True
    """

    intercept: float
    weights: tuple[tuple[str, float], ...]
    #: inputs go through :func:`symlog` first
    log: bool = False

    @classmethod
    def of(cls, model: Any, names: Iterable[str]) -> Linear | None:
        """The flat form of a default ``logistic`` pipeline; None for any other model (it scores through River)."""
        kinds = shape(model)
        log = kinds[:1] == ["FuncTransformer:symlog"]
        first = 1 if log else 0  # the steps after the transform
        if kinds[first:] != ["StandardScaler", "LogisticRegression"]:
            return None
        sc, lr = list(model.steps.values())[first:]
        if not sc.with_std or sc.window_size is not None or type(lr.loss) is not optim.losses.Log:
            return None
        w, intercept, weights = lr.weights, lr.intercept, []
        for n in names:
            var = sc.vars.get(n, 0.0)
            c = w.get(n, 0.0) / var**0.5 if var else 0.0
            intercept -= c * sc.means.get(n, 0.0)
            weights.append((n, c))
        return cls(intercept, tuple(weights), log)

    def proba(self, feats: dict[str, Any]) -> float | None:
        """P(True) from features by name; None when one is missing or not a finite number."""
        z = self.intercept
        try:
            if self.log:
                log1p = math.log1p
                for n, c in self.weights:
                    v = feats[n]
                    z += c * (log1p(v) if v >= 0 else -log1p(-v))
            else:
                for n, c in self.weights:
                    z += c * feats[n]
        except (KeyError, TypeError):
            return None
        return float(sigmoid(z)) if z - z == 0.0 else None  # false for inf and nan


_NO_MODEL: tuple[int, bool, Any, Linear | None] = (0, False, None, None)


def newest_ts(items: list[tuple[str, Enriched | Merge]]) -> int:
    """The event time of a batch's last event (0 when it has none): a batch comes about in event-time order.

    >>> from nudgeflow.events import Event
    >>> newest_ts([("0", Enriched(Event("a", "u", "browse", 5), {})), ("0", Enriched(Event("b", "u", "browse", 9), {}))])
    9
    """
    for _, x in reversed(items):
        if type(x) is Enriched:
            return x.event.ts
    return 0


class Scorer:
    """Scores with the newest published snapshot of each model (per worker, refreshed on a bound)."""

    def __init__(
        self, cfg: ModelsFile, fetch: Callable[[dict[str, int]], list[Snapshot]], now_ms: Callable[[], int] = wall_ms,
    ):
        """``fetch``: the published snapshots newer than the versions given, one look for all models."""
        self.cfg = cfg
        self.fetch = fetch
        self.now_ms = now_ms
        self.refresh_ms = int(cfg.refresh_every * 1000)
        self.defs = {m.name: m for m in cfg.models}
        self.models: dict[str, tuple[int, bool, Any, Linear | None]] = {}  # name -> (version, warm, model, flat form)
        #: the next look for snapshots, by the wall clock and by event time, whichever comes first
        self.next_refresh = self.next_refresh_ts = 0
        self.faults = 0
        self.errors = 0
        self.by_type: dict[str, list[ModelDef]] = {}
        self.any: list[ModelDef] = [m for m in cfg.models if m.score_on == "any"]
        #: event type -> the models scoring it, each with its features as a key (models reading the same share an input)
        self.plan: dict[str, list[tuple[ModelDef, tuple[str, ...]]]] = {}
        for m in cfg.models:
            if m.score_on != "any":
                for t in m.score_on:
                    self.by_type.setdefault(t, []).append(m)

    def refresh(self, now: int, event_ts: int = 0) -> None:
        """Load any newer snapshot, once ``refresh_every`` of wall time or of event time has passed. Live the
        two go together; replaying history a day of events may take a second, and a model refreshed by the
        wall clock alone served the whole day with the snapshot of its start."""
        if now < self.next_refresh and event_ts < self.next_refresh_ts:
            return
        self.next_refresh = now + self.refresh_ms
        self.next_refresh_ts = event_ts + self.refresh_ms
        for snap in self.fetch({name: self.version(name) for name in self.defs}):
            m = self.defs.get(snap.name)
            if m is not None and snap.version > self.version(m.name):
                model = snap.load()
                self.models[m.name] = (snap.version, snap.warm(m.min_examples), model, Linear.of(model, m.features))

    def version(self, name: str) -> int:
        """The newest snapshot loaded, warm or not (what ``refresh`` asks the store to beat)."""
        return self.models.get(name, _NO_MODEL)[0]

    def serving(self, name: str) -> int:
        """The snapshot version that scores, 0 while the prior answers (the model is not warm yet)."""
        version, warm, _, _ = self.models.get(name, _NO_MODEL)
        return version if warm else 0

    def score(
        self, d: ModelDef, feats: dict[str, Any], x: dict[str, float] | None = None,
    ) -> tuple[float, int, dict[str, float] | None]:
        """(score, the version that made it, input) for one model: the prior, version 0, until the model is
        warm or when it raises, so a prediction never names a model that did not score it. The input is
        None where the flat form scored the features as they are (the label step builds it if it samples)."""
        version, warm, model, linear = self.models.get(d.name, _NO_MODEL)
        if linear is not None and warm:
            p = linear.proba(feats)
            if p is not None:
                return p, version, None
        if x is None:
            x, faults = vector(d.features, feats)
            self.faults += faults
        if model is None or not warm:
            return d.prior, 0, x
        try:
            return proba(model, x), version, x
        except Exception:  # a model fault must not stop the event
            self.errors += 1
            return d.prior, 0, x

    def score_batch(self, items: list[tuple[str, Enriched | Merge]]) -> list[tuple[str, Enriched | Merge]]:
        """Score each event for the models that score its type (Bytewax ``flat_map_batch``); merges pass."""
        self.refresh(self.now_ms(), newest_ts(items))
        for _, en in items:
            if type(en) is not Enriched:
                continue
            models = self.plan.get(en.event.type)
            if models is None:  # once per event type (the parser admits known types only)
                etype = en.event.type
                anytype = self.any if etype not in FEEDBACK_TYPES else []  # ``any``: shopping and looks, not our messages
                models = self.plan[etype] = [(d, tuple(d.features)) for d in anytype + self.by_type.get(etype, [])]
            inputs: dict[tuple[str, ...], dict[str, float]] = {}  # models reading the same features share one input
            for d, key in models:
                s, v, x = self.score(d, en.features, inputs.get(key))
                if x is not None:
                    inputs[key] = x
                en.scores[d.name] = s
                en.scored[d.name] = (v, x)
        return items


@dataclass(slots=True)
class Resolved:
    """A labelled example: the snapshot taken at scoring time, its score, and the outcome."""

    model: str
    user_id: str
    event_id: str
    ts: int
    resolved_ts: int
    x: dict[str, float]
    score: float
    version: int
    label: bool


@dataclass(slots=True)
class Pending:
    ts: int
    deadline: int
    event_id: str
    x: dict[str, float]
    score: float
    version: int
    #: when its label event came (-1: none yet); the example is learned at its deadline all the same
    labelled: int = -1

    def __setstate__(self, state: tuple[None, dict[str, Any]]) -> None:
        self.labelled = -1  # a snapshot from before examples were held to their deadline: none labelled
        for name, value in state[1].items():
            setattr(self, name, value)


@dataclass
class LabelState:
    pending: dict[tuple[str, str], list[Pending]] = field(default_factory=dict)
    last_sample: dict[tuple[str, str], int] = field(default_factory=dict)
    #: newest label event per (model, user), for an example sampled after it arrived but before it happened
    last_label: dict[tuple[str, str], int] = field(default_factory=dict)
    heap: list[tuple[int, str, str, int]] = field(default_factory=list)
    clock: PartitionClock = field(default_factory=PartitionClock)


@dataclass(slots=True)
class LabelPart:
    """What a label shard kept about one user, per model: what an identity merge hands to the shard of the
    user it merged into."""

    pending: dict[str, list[Pending]]
    last_sample: dict[str, int]
    last_label: dict[str, int]


def thin(pending: list[Pending], every: int) -> list[Pending]:
    """The examples the sampling bound keeps, earliest first: each at least ``every`` after the last kept.

    >>> [p.ts for p in thin([Pending(t, t + 9, f"e{t}", {}, 0.5, 1) for t in (0, 4, 10, 13)], 10)]
    [0, 10]
    """
    kept: list[Pending] = []
    for p in sorted(pending, key=lambda p: p.ts):
        if not kept or p.ts - kept[-1].ts >= every:
            kept.append(p)
    return kept


class LabelEngine:
    """Pending examples of one shard, labelled as their label events come, resolved at their deadlines."""

    def __init__(self, cfg: ModelsFile, lateness_ms: int, idle_ms: int):
        self.models = {m.name: m for m in cfg.models}
        self.within = {m.name: int(m.label.within * 1000) for m in cfg.models}
        self.every = {m.name: int(m.sample_every * 1000) for m in cfg.models}
        self.positive_on_event = {m.name: m.label.outcome == "occurs" for m in cfg.models}
        self.label_types = {m.name: (None if m.label.events == "any" else frozenset(m.label.events)) for m in cfg.models}
        self.lateness_ms = lateness_ms
        self.idle_ms = idle_ms
        #: the newest event time any shard of this process has seen (see ``TriggerEngine.max_ts``)
        self.max_ts = 0

    def new_state(self) -> LabelState:
        return LabelState()

    def on_event(self, st: LabelState, en: Enriched, now: int) -> None:
        """Sample the event's scores as pending examples and label those its type answers; nothing is learned
        before its deadline (:meth:`advance`)."""
        ev = en.event
        ts, uid = ev.ts, ev.user_id
        if ev.type != IDLE:  # a look comes from the feature step's watermark, not from a source partition
            st.clock.see(ev.position, ts, now)
            if ts > self.max_ts:
                self.max_ts = ts
        for name, types in self.label_types.items():
            # ``any``: shopping, not our messages nor a look at a quiet shopper
            if (ev.type in NOT_ACTIVITY) if types is None else (ev.type not in types):
                continue
            key = (name, uid)
            if st.last_label.get(key, -1) < ts:
                st.last_label[key] = ts
            pend = st.pending.get(key)
            if pend:
                for p in pend:
                    if p.ts < ts <= p.deadline and (p.labelled < 0 or ts < p.labelled):
                        p.labelled = ts
        for name, (version, x) in en.scored.items():
            key = (name, uid)
            if ts - st.last_sample.get(key, -(1 << 62)) < self.every[name]:
                continue
            st.last_sample[key] = ts
            if x is None:  # scored by the flat form: the same input, built only for the examples kept
                x = vector(self.models[name].features, en.features)[0]
            p = Pending(ts, ts + self.within[name], ev.event_id, x, en.scores[name], version)
            last = st.last_label.get(key, -1)
            if p.ts < last <= p.deadline:  # the label event was seen already (it arrived first)
                p.labelled = last
            st.pending.setdefault(key, []).append(p)
            heapq.heappush(st.heap, (p.deadline, name, uid, p.ts))

    def release(self, st: LabelState, uid: str) -> LabelPart | None:
        """Remove and return what this shard keeps about ``uid`` (an identity merge moves it into another user);
        None when it keeps nothing. Heap entries stay behind and are skipped as stale when they come due."""
        names = self.models
        part = LabelPart(pop_user(st.pending, names, uid), pop_user(st.last_sample, names, uid),
                         pop_user(st.last_label, names, uid))
        return part if part.pending or part.last_sample or part.last_label else None

    def absorb(self, st: LabelState, uid: str, part: LabelPart) -> list[Resolved]:
        """Merge a released part into user ``uid`` (nothing is resolved before its deadline: returns []).

        Exact: an example of one id whose window holds the other id's newest label event is labelled as it
        would have been had that event carried the same id; the newest label time is the later of the two.
        Rules: only each id's *newest* label event is known, so an older one of the other id inside a window
        goes unseen (the example is labelled by a later one, or not, at its deadline). The
        sampling bound (one pending example per user per ``sample_every``) holds for the merged user: where
        the two ids kept examples within ``sample_every`` of each other, the earliest stays and the later
        are dropped, never learned, as the canonical user would not have sampled them; the newest sample
        time is that of the newest example kept (or resolved before the merge, which stays learned).
        """
        for name in part.pending.keys() | part.last_sample.keys() | part.last_label.keys():
            if name not in self.models:
                continue
            key = (name, uid)
            own_label, their_label = st.last_label.get(key), part.last_label.get(name)
            own, theirs = st.pending.get(key, []), part.pending.get(name, [])
            kept = thin(own + theirs, self.every[name])
            mine = {id(p) for p in own}  # which side each kept example came from
            pending = []
            for p in kept:
                other = their_label if id(p) in mine else own_label
                if other is not None and p.ts < other <= p.deadline and (p.labelled < 0 or other < p.labelled):
                    p.labelled = other
                pending.append(p)
                if id(p) not in mine:
                    heapq.heappush(st.heap, (p.deadline, name, uid, p.ts))
            if pending:
                st.pending[key] = pending
            else:
                st.pending.pop(key, None)
            dropped = {p.ts for p in own + theirs} - {p.ts for p in kept}
            sampled = [p.ts for p in kept] + [
                t for t in (st.last_sample.get(key), part.last_sample.get(name)) if t is not None and t not in dropped
            ]
            if sampled:
                st.last_sample[key] = max(sampled)
            if their_label is not None and (own_label is None or their_label > own_label):
                st.last_label[key] = their_label
        return []

    def advance(self, st: LabelState, watermark: int) -> list[Resolved]:
        """Resolve every example whose deadline the watermark passed, in deadline order: by its label event if
        one came (at that time), else the opposite outcome at the deadline."""
        out: list[Resolved] = []
        heap = st.heap
        while heap and heap[0][0] <= watermark:
            deadline, name, uid, ts = heapq.heappop(heap)
            key = (name, uid)
            pend = st.pending.get(key)
            if not pend:
                continue
            for i, p in enumerate(pend):
                if p.ts == ts and p.deadline == deadline:
                    labelled = p.labelled >= 0
                    out.append(self._resolve(name, uid, p, p.labelled if labelled else deadline,
                                             labelled == self.positive_on_event[name]))
                    del pend[i]
                    break
            if not pend:
                del st.pending[key]
                horizon = watermark - self.within[name] - self.lateness_ms
                if st.last_label.get(key, horizon) < horizon:
                    del st.last_label[key]
                if st.last_sample.get(key, horizon) < horizon:
                    del st.last_sample[key]
        return out

    def watermark(self, st: LabelState, now: int) -> int:
        return st.clock.watermark(self.lateness_ms, self.idle_ms, now)

    @staticmethod
    def _resolve(name: str, uid: str, p: Pending, at: int, label: bool) -> Resolved:
        return Resolved(name, uid, p.event_id, p.ts, at, p.x, p.score, p.version, label)


class Calibration:
    """Reliability bins: count, mean score and positive rate per score bin; ECE from them."""

    def __init__(self, bins: int):
        self.n = [0] * bins
        self.score = [0.0] * bins
        self.pos = [0] * bins

    def update(self, y: bool, p: float) -> None:
        b = min(int(p * len(self.n)), len(self.n) - 1)
        self.n[b] += 1
        self.score[b] += p
        self.pos[b] += int(y)

    def ece(self) -> float:
        total = sum(self.n)
        if not total:
            return 0.0
        return sum(abs(s / n - k / n) * n for n, s, k in zip(self.n, self.score, self.pos) if n) / total

    def bins(self) -> list[tuple[int, float, float]]:
        """(count, mean score, positive rate) per bin."""
        return [(n, s / n if n else 0.0, k / n if n else 0.0) for n, s, k in zip(self.n, self.score, self.pos)]


class BinnedAUC:
    """ROC AUC from score histograms of positives and negatives: O(1) per example, exact to 1/1000 in score.

    River's ROCAUC updates a confusion matrix per threshold per example, which
    costs more than learning; this keeps two histograms and counts pairs once.

    >>> a = BinnedAUC()
    >>> for p, y in [(0.9, True), (0.8, True), (0.3, False), (0.85, False)]:
    ...     a.update(y, p)
    >>> round(a.get(), 3)
    0.75
    """

    def __init__(self, bins: int = 1000):
        self.pos = [0] * bins
        self.neg = [0] * bins

    def update(self, y: bool, p: float) -> None:
        b = min(int(p * len(self.pos)), len(self.pos) - 1)
        (self.pos if y else self.neg)[b] += 1

    def get(self) -> float:
        """P(score of a positive > score of a negative), ties counted half; nan without both classes.

        In integers and C loops: twice the pairs a positive wins (each negative in a lower bin, twice; one in
        its bin, once), over twice the pairs. A learner's hourly metric rows read four of these per model:
        with a Python loop over the bins, a tenth of the labels step in ``benchmarks.instructions`` (whose
        replay holds a tenth of ``benchmarks.run``'s records an hour of event time).
        """
        n_pos, n_neg = sum(self.pos), sum(self.neg)
        if not n_pos or not n_neg:
            return float("nan")
        below = accumulate(self.neg, initial=0)  # negatives in lower bins, bin by bin
        twice = 2 * sum(map(mul, self.pos, below)) + sum(map(mul, self.pos, self.neg))
        return twice / (2 * n_pos * n_neg)


#: scores are kept this far from 0 and 1 in the log loss (River's ``LogLoss`` does the same)
_LOSS_EPS = 1e-15


class Metrics:
    """Progressive-validation metrics of one model over one span of event time.

    Updated four times an example (the learner's and the served score, the window and the cumulative
    figures), so kept to plain sums: the log loss as a sum, as River's ``LogLoss`` computes it (the
    score clamped to [1e-15, 1 - 1e-15]) without its per-update dict, method calls and running mean, took
    the labels step from ~217k to ~202k instructions a record (``benchmarks.instructions``, 2026-12-07).

    >>> m = Metrics(10)
    >>> for y, p in [(True, 0.8), (False, 0.4), (True, 1.0)]:
    ...     m.update(y, p)
    >>> r = m.row(); r["examples"], round(r["logloss"], 4), round(r["brier"], 4), r["auc"]
    (3, 0.2447, 0.0667, 1.0)
    """

    def __init__(self, bins: int):
        self.auc = BinnedAUC()
        self.loss = 0.0
        self.brier = 0.0
        self.count = 0
        self.positives = 0
        self.cal = Calibration(bins)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Metrics of an older recovery store: their log loss was River's running mean (``logloss``)."""
        old = state.pop("logloss", None)
        if old is not None:
            state["loss"] = old.get() * state["count"]
        self.__dict__.update(state)

    def update(self, y: bool, p: float) -> None:
        self.auc.update(y, p)
        q = _LOSS_EPS if p < _LOSS_EPS else 1.0 - _LOSS_EPS if p > 1.0 - _LOSS_EPS else p
        self.loss -= math.log(q if y else 1.0 - q)
        self.brier += (p - y) ** 2
        self.count += 1
        self.positives += y
        self.cal.update(y, p)

    def row(self) -> dict[str, Any]:
        return {
            "examples": self.count,
            "positives": self.positives,
            "auc": self.auc.get(),
            "logloss": self.loss / self.count if self.count else 0.0,
            "brier": self.brier / self.count if self.count else float("nan"),
            "ece": self.cal.ece(),
            "calibration": self.cal.bins(),
        }


@dataclass(slots=True)
class MetricRow:
    model: str
    window_start: int
    #: ``window`` (the examples learned since the last row: see :meth:`Learner.learn`) or ``cumulative`` (every
    #: example so far), of the learner's progressive score; ``served_window`` and ``served_cumulative`` the same
    #: of the score served when each example was sampled
    window: str
    version: int
    values: dict[str, Any]


@dataclass(slots=True)
class PredictionRow:
    """An example's prediction at decision time (the published model's), with its outcome."""

    example: Resolved
    #: the learner's score just before learning it (progressive validation)
    learner_score: float


class Learner:
    """One model's learner: progressive validation, learn once, publish snapshots."""

    def __init__(
        self, d: ModelDef, cfg: ModelsFile, model: Any | None = None, examples: int = 0, version: int = 0,
        positives: int = 0,
    ):
        self.d = d
        self.cfg = cfg
        self.model = model if model is not None else build_model(d)
        self.examples = examples
        self.positives = positives
        #: examples the model raised on: skipped, not learned (a model fault must not stop the flow)
        self.errors = 0
        self.version = version
        self.updates_since = 0
        self.published_wall = 0
        bins = cfg.calibration_bins
        self.window_ms = int(cfg.metrics_window * 1000)
        self.window_start: int | None = None
        #: the learner's and the served score's metrics, of the window and of every example so far
        self.window_metrics, self.served_window = Metrics(bins), Metrics(bins)
        self.total, self.served_total = Metrics(bins), Metrics(bins)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A learner from an older recovery store: positives are counted, and the served score measured,
        from now on."""
        self.__dict__.update(state)
        self.__dict__.setdefault("positives", 0)
        self.__dict__.setdefault("errors", 0)
        if "served_total" not in state:
            bins = self.cfg.calibration_bins
            self.served_window, self.served_total = Metrics(bins), Metrics(bins)

    def learn(self, batch: list[Resolved]) -> tuple[list[MetricRow], list[PredictionRow]]:
        """Score every example of the batch, then learn each once (progressive validation).

        Examples resolved together are near copies (an order resolves all of its shopper's pending
        examples at once): scoring one just after learning its twin would flatter the metrics, so
        none is scored by a model that has learned anything of its batch.
        """
        linear = Linear.of(self.model, self.d.features) if len(batch) > 2 else None  # pays from a few examples on
        scores = [p if linear is not None and (p := linear.proba(r.x)) is not None else self._score(r) for r in batch]
        rows: list[MetricRow] = []
        learned = positives = 0
        for r, p in zip(batch, scores):
            start = r.ts - r.ts % self.window_ms
            if self.window_start is None:
                self.window_start = start
            elif start > self.window_start:
                rows.extend(self.close_window())
                self.window_start = start
            if p is None:  # the model raised on it (counted): learning it would too
                continue
            self.window_metrics.update(r.label, p)
            self.total.update(r.label, p)
            self.served_window.update(r.label, r.score)
            self.served_total.update(r.label, r.score)
            try:
                self.model.learn_one(r.x, r.label)
            except Exception as e:  # River raised on this input: skip it, count it, go on
                self._fault(r, "learn", e)
                continue
            learned += 1
            positives += r.label
        self.examples += learned
        self.positives += positives
        self.updates_since += learned
        return rows, [PredictionRow(r, p) for r, p in zip(batch, scores) if p is not None]

    def _score(self, r: Resolved) -> float | None:
        try:
            return proba(self.model, r.x)
        except Exception as e:  # as in learning: a model fault must not stop the flow
            self._fault(r, "score", e)
            return None

    def _fault(self, r: Resolved, what: str, e: Exception) -> None:
        """An example the model raised on: counted (``nudgeflow_model_learn_errors``) and logged, not learned."""
        self.errors += 1
        if self.errors & (self.errors - 1) == 0:  # the 1st, 2nd, 4th, 8th …: a steady fault does not flood the log
            log.warning("model %s could not %s the example of event %s (%d so far): %s: %s", self.d.name, what,
                        r.event_id, self.errors, type(e).__name__, e)

    def close_window(self) -> list[MetricRow]:
        """Rows for the window so far and the cumulative figures, of both scores; starts a new window.

        A window is closed when an example sampled in a later window is learned, so a window row holds the
        examples learned since the row before: mostly those sampled in its window, and the negatives of
        examples sampled a horizon earlier (they resolve only then). Per window of sampling time exactly,
        the ``model_calibration`` query computes the figures from ``predictions``.
        """
        if self.window_start is None or not self.window_metrics.count:
            return []
        name, start, v, bins = self.d.name, self.window_start, self.version, self.cfg.calibration_bins
        rows = [
            MetricRow(name, start, "window", v, self.window_metrics.row()),
            MetricRow(name, start, "cumulative", v, self.total.row()),
            MetricRow(name, start, "served_window", v, self.served_window.row()),
            MetricRow(name, start, "served_cumulative", v, self.served_total.row()),
        ]
        self.window_metrics, self.served_window = Metrics(bins), Metrics(bins)
        return rows

    def maybe_publish(self, now: int, force: bool = False) -> Snapshot | None:
        due = self.updates_since >= self.cfg.publish_every_updates or (
            self.updates_since and now - self.published_wall >= self.cfg.publish_every * 1000
        )
        if not (due or (force and self.updates_since)):
            return None
        self.version += 1
        self.updates_since = 0
        self.published_wall = now
        return Snapshot.of(self.d.name, self.version, self.examples, self.model, self.positives)


class LabelLogic(StatefulBatchLogic[Enriched | Merge, Resolved, bytes]):
    """Bytewax adapter: one shard's pending examples; wakes once a second while any are open.

    ``handoff``: where merged shoppers' pending examples travel between shards (:mod:`operators.merge`).
    ``recover``: whether recovery is on (see ``FeatureLogic``).
    """

    def __init__(
        self, engine: LabelEngine, resume: bytes | None, now_ms: Callable[[], int] = wall_ms,
        handoff: Handoff | None = None, recover: bool = True,
    ):
        self.engine = engine
        self.recover = recover
        self.now_ms = now_ms
        self.state, waiting = restore(resume, engine.new_state)
        self.desk = MergeDesk("labels", handoff, waiting) if handoff is not None else None

    def on_batch(self, values: list[Enriched | Merge]) -> tuple[list[Resolved], bool]:
        eng, st, desk = self.engine, self.state, self.desk
        now = self.now_ms()
        out: list[Resolved] = []
        for en in values:
            if type(en) is Merge:
                assert desk is not None  # merges come only from the identity step, which gives a hand-over
                out.extend(desk.take(eng, st, en))
            else:
                eng.on_event(st, en, now)
        if desk is not None:
            out.extend(desk.settle(eng, st))
        if st.heap:
            out.extend(eng.advance(st, eng.watermark(st, now)))
        return out, StatefulBatchLogic.RETAIN

    def on_notify(self) -> tuple[list[Resolved], bool]:
        out = self.desk.settle(self.engine, self.state) if self.desk is not None else []
        return out + self.engine.advance(self.state, self.engine.watermark(self.state, self.now_ms())), StatefulBatchLogic.RETAIN

    def on_eof(self) -> tuple[list[Resolved], bool]:
        out = self.desk.finish(self.engine, self.state) if self.desk is not None else []
        at = max(self.state.clock.max_ts, self.engine.max_ts)
        return out + self.engine.advance(self.state, at), StatefulBatchLogic.RETAIN

    def notify_at(self) -> datetime | None:
        at = datetime.now(timezone.utc) + timedelta(seconds=1) if self.state.heap else None
        return self.desk.wake(at) if self.desk is not None else at

    def snapshot(self) -> bytes:
        return snapshot(self.state, self.desk) if self.recover else b""


LearnerOut = MetricRow | PredictionRow | Snapshot


class LearnerLogic(StatefulBatchLogic[Resolved, LearnerOut, bytes]):
    """Bytewax adapter: the one learner of a model (the key is the model name).

    Bytewax builds logic without telling it its key, so the learner is made on
    the first example: warm from the newest published snapshot when there is
    one (and no recovery state), else cold.
    """

    def __init__(
        self, cfg: ModelsFile, resume: bytes | None, warm: Callable[[str], Snapshot | None],
        now_ms: Callable[[], int] = wall_ms,
    ):
        self.cfg = cfg
        self.warm = warm
        self.learner: Learner | None = None
        if resume is not None:  # recovered: kept, unless models.yaml now builds another kind of model
            learner: Learner = pickle.loads(resume)
            self.learner = self._current(learner.d.name, learner.model, learner.version, "recovered learner") or learner
        self.now_ms = now_ms

    def _current(self, name: str, model: Any, version: int, what: str) -> Learner | None:
        """None when ``model`` is of the shape ``name``'s definition builds now; else a cold learner numbering its
        versions on from ``version`` (so scorers holding the old model take the new one when it comes)."""
        d = next((m for m in self.cfg.models if m.name == name), None)
        if d is None or shape(model) == (now := shape(build_model(d))):
            return None
        log.warning("model %s: %s v%d is %s, models.yaml now builds %s: starting cold", name, what, version,
                    shape(model), now)
        return Learner(d, self.cfg, version=version)

    def _learner(self, name: str) -> Learner:
        """The learner, made on the first example: from the newest snapshot (see :meth:`_current`), else cold."""
        if self.learner is None:
            d = next(m for m in self.cfg.models if m.name == name)
            snap = self.warm(name)
            if snap is None:
                self.learner = Learner(d, self.cfg)
            else:
                model = snap.load()
                self.learner = self._current(name, model, snap.version, "snapshot") or Learner(
                    d, self.cfg, model, snap.examples, snap.version, snap.positives or 0)
        return self.learner

    def on_batch(self, values: list[Resolved]) -> tuple[list[LearnerOut], bool]:
        learner = self._learner(values[0].model)
        rows, preds = learner.learn(values)
        out: list[LearnerOut] = [*rows, *preds]
        snap = learner.maybe_publish(self.now_ms())
        if snap is not None:
            out.append(snap)
        return out, StatefulBatchLogic.RETAIN

    def on_notify(self) -> tuple[list[LearnerOut], bool]:
        snap = self.learner.maybe_publish(self.now_ms()) if self.learner else None
        return ([snap] if snap else []), StatefulBatchLogic.RETAIN

    def on_eof(self) -> tuple[list[LearnerOut], bool]:
        if self.learner is None:
            return [], StatefulBatchLogic.RETAIN
        out: list[LearnerOut] = list(self.learner.close_window())
        snap = self.learner.maybe_publish(self.now_ms(), force=True)
        if snap is not None:
            out.append(snap)
        return out, StatefulBatchLogic.RETAIN

    def notify_at(self) -> datetime | None:
        if self.learner is None or not self.learner.updates_since:
            return None
        return datetime.now(timezone.utc) + timedelta(seconds=self.cfg.publish_every)

    def snapshot(self) -> bytes:
        return pickle.dumps(self.learner, protocol=pickle.HIGHEST_PROTOCOL)
