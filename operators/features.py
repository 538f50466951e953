"""Rolling per-user features in event time, kept in keyed Bytewax state.

Which features exist is data (``config/features.yaml``, :class:`FeatureDefs`);
this module compiles the definitions once into a plan of window slots and
value getters, then applies events to compact per-user state.

**Keyed by shard.** State is keyed by shard (:mod:`operators.shards`: a stable
hash of the user id modulo ``shards``), each shard holding the state of its users. Keying by user would
give Bytewax one logic object and one call per shopper per batch; a shard gets
its whole share of a batch in one ``on_batch`` call. Users idle past every
window are evicted from the shard (Redis keeps serving their last values until
its TTL), so state does not grow with the number of shoppers ever seen.

**Two outputs.** Per event, an :class:`Enriched` event carries only the
features downstream steps read (trigger conditions, model inputs): building
all of them per event would cost more than the rest of the flow. Per batch,
each user the batch changed gets one :class:`UserFeatures` with every feature,
which is what Redis serves.

**Looks at quiet shoppers.** With ``idle`` spans configured, a shopper quiet for
each of them gets an ``idle`` event carrying their features as of that moment
(:meth:`FeatureEngine.look`), so models and triggers see shoppers while they are
away; it changes no state and is not an event of the shop.

**Event time.** Windows are sparse buckets (:mod:`operators.windows`), exact to
``1/buckets_per_window`` of their width at the old edge. Features are
evaluated as of the user's newest event time. Events up to
``allowed_lateness`` behind it update the right buckets; later ones are
refused as ``too_late``, repeated event ids as ``duplicate``.

**Identity merges.** When the identity step finds that two ids are one shopper, the
source user's state is ``release``d from its shard and ``absorb``ed into the
canonical user (:meth:`FeatureEngine.absorb` says what is exact and what is a
rule). So that merges (and late events) land exactly, every piece of state is a
commutative summary of the events: window buckets are absolute, the cart keeps
each line's changes since the item was last bought (:class:`CartLine`).

**Platforms.** Events carry ``web``, ``app``, ``mini_program`` or no platform.
Counts may be broken down by platform (``views_1h_app``), distinct features may
count the platforms seen (``platforms_7d``), and ``last_platform`` is the
platform of the newest event that had one (the channel a shopper is likely on).
The per-type recipe is keyed by (type, platform), so none of this costs a test
per event.
"""

from __future__ import annotations

import functools
import math
import pickle
import threading
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from itertools import islice
from operator import itemgetter
from typing import Any, NamedTuple, get_args

import lz4.block
import zstandard
from bytewax.operators import StatefulBatchLogic

from nudgeflow.events import FEEDBACK_TYPES, IDLE, DeadLetter, Event, Merge
from nudgeflow.settings import EventsConfig, FeatureDefs, FeaturesConfig, Platform, Reloadable, TriggersFile
from operators.dedup import Deduper
from operators.clock import Deadline, PartitionClock, wall_ms
from operators.merge import Handoff, MergeDesk, restore, snapshot
from operators.windows import SLOT_BITS, PackedWindow, unpacker, window

EVICT_EVERY = 4096
"""Events between scans for idle users (a scan is O(users in the shard))."""

Totals = list[tuple[int, ...]]
"""Per window, the slots a read needs as of its time (unpacked once per read; windows not needed are left empty)."""

Getter = Callable[["UserState", int, Totals], Any]
"""A feature of a user as of a time, given the window totals of that read."""

PLATFORMS = frozenset(get_args(Platform))
"""The platforms features know; the parser passes others through, and features treat them as none."""


def window_label(seconds: float) -> str:
    """A short name for a window, used in feature names.

    >>> window_label(3600), window_label(86400), window_label(7 * 86400), window_label(45)
    ('1h', '24h', '7d', '45s')
    """
    s = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s % size == 0 and (unit != "d" or s >= 2 * 86400):
            return f"{s // size}{unit}"
    return f"{s}s"


@dataclass(slots=True)
class Enriched:
    """An event with the features downstream steps read, as of that event, and later its scores."""

    event: Event
    features: dict[str, Any]
    #: model name -> score, filled by the scoring step
    scores: dict[str, float] = field(default_factory=dict)
    #: model name -> (model version, input vector) for the models that scored this event; the input is None
    #: where it is exactly the model's features read from ``features`` (built only if the example is kept)
    scored: dict[str, tuple[int, dict[str, float] | None]] = field(default_factory=dict)


@dataclass(slots=True)
class UserFeatures:
    """Every feature of one user, valid at event time ``ts``: what Redis serves; ``gone``: the user was
    merged into another (identity), its hash is deleted."""

    user_id: str
    ts: int
    features: dict[str, Any]
    gone: bool = False


GONE_TS = 1 << 62
"""The event time of a ``gone`` item: later than any publication of the user it deletes."""

_EARLY_S = 0.01
"""How early a wake may come and still publish: Bytewax's clock (``notify_at``) is not ``time.monotonic``."""


def _score_up(value: float, thresholds: list[float]) -> int:
    """1 below the first threshold … 5 at or above the last (thresholds ascend).

    >>> [_score_up(v, [1, 2, 4, 8]) for v in (0, 1, 3, 8, 9)]
    [1, 2, 3, 5, 5]
    """
    return 1 + bisect_right(thresholds, value)


def _score_down(value: float, thresholds: list[float]) -> int:
    """5 at or below the first threshold … 1 above the last (smaller is better).

    >>> [_score_down(v, [7, 14, 30, 60]) for v in (0, 7, 8, 60, 61)]
    [5, 5, 4, 2, 1]
    """
    return 5 - bisect_left(thresholds, value)


class CartLine:
    """One item of a cart: the adds and removes since the item was last bought.

    The changes themselves are kept (a line has few), not only their sum, so that a purchase
    arriving after a later change, or a merged shopper's older changes, land exactly: the line is
    a function of the set of events, whatever their order. The quantity is the sum of the changes
    after the newest purchase (``cut``); the price is that of the newest add among them.

    >>> line = CartLine(-1)
    >>> line.change(10, 2, 5.0); line.change(30, -1, None); (line.net, line.price)
    (1, 5.0)
    >>> line.buy(20); line.net  # bought at 20: the add at 10 is gone, the remove at 30 stays
    -1
    >>> line.change(15, 3, 9.0); line.net  # before the purchase: nothing to do with the cart any more
    -1
    """

    __slots__ = ("net", "price_ts", "price", "cut", "changes")

    def __init__(self, cut: int):
        self.net = 0
        #: the event time and price of the newest add (-1, 0.0 when none)
        self.price_ts = -1
        self.price = 0.0
        #: the newest purchase of the item (or of the whole cart): changes at or before it were bought
        self.cut = cut
        #: (event time, quantity change, price of an add or None) since ``cut``
        self.changes: list[tuple[int, int, float | None]] = []

    def change(self, ts: int, qty: int, price: float | None) -> None:
        """An add (``price`` given) or a remove (negative ``qty``, no price) at event time ``ts``."""
        if ts <= self.cut:
            return
        self.changes.append((ts, qty, price))
        self.net += qty
        if price is not None and (ts > self.price_ts or (ts == self.price_ts and price > self.price)):
            self.price_ts, self.price = ts, price

    def buy(self, ts: int) -> None:
        """The item was bought at ``ts``: what was added or removed until then is gone."""
        if ts > self.cut:
            self.cut = ts
            if any(c[0] <= ts for c in self.changes):
                self._keep(self.changes)

    def merge(self, other: CartLine) -> None:
        """The same item of another cart: exact, as if one cart had seen the changes of both."""
        self.cut = max(self.cut, other.cut)
        self._keep(self.changes + other.changes)

    def _keep(self, changes: list[tuple[int, int, float | None]]) -> None:
        self.changes = [c for c in changes if c[0] > self.cut]
        self.net = sum(q for _, q, _ in self.changes)
        self.price_ts, self.price = max(((ts, p) for ts, _, p in self.changes if p is not None), default=(-1, 0.0))


class UserState:
    """One shopper's compact feature state."""

    __slots__ = ("first_ts", "ref_ts", "last_ts", "prev_ts", "wins", "last", "prev", "session", "cart", "cart_cut",
                 "cart_totals", "aff", "top", "distinct", "plat_ts", "platform", "looks")

    def __init__(self, first_ts: int, plan: FeaturePlan):
        self.first_ts = first_ts
        #: fixed reference time of the affinity scores (``first_ts`` may still move back)
        self.ref_ts = first_ts
        self.last_ts = first_ts
        #: the newest event time before ``last_ts`` (-1 when none)
        self.prev_ts = -1
        self.wins = [PackedWindow(w, b) for w, b in plan.window_shapes]
        #: newest and second newest event time per recency group (-1 when none)
        self.last = [-1] * len(plan.recency)
        self.prev = [-1] * len(plan.recency)
        #: [session key, start ts, last ts, events, pages, ts of the event that opened it (counted in sessions_*)]
        self.session: list[Any] | None = None
        #: item id -> its line; lines with a quantity of 0 or less are kept (a later or merged add may
        #: make up for them) but are not in the cart features
        self.cart: dict[str, CartLine] = {}
        #: the newest order without lines (it bought the whole cart), -1 when none
        self.cart_cut = -1
        #: (items, quantity, value) of the lines in the cart, worked out when read after a change (None)
        self.cart_totals: tuple[int, int, float] | None = None
        #: category -> interest, scaled to ref_ts (see FeatureEngine._affinity)
        self.aff: dict[str, float] = {}
        self.top: list[str] = []
        #: per distinct feature: value -> newest event time
        self.distinct: list[dict[str, int]] = [{} for _ in plan.distinct]
        #: the event time and platform of the newest event that had one (-1, None when none did)
        self.plat_ts = -1
        self.platform: str | None = None
        #: the ``idle`` looks taken since ``last_ts`` (:meth:`FeatureEngine.look`)
        self.looks = 0

    def __reduce__(self) -> tuple[Callable[..., UserState], tuple[Any, ...]]:
        """Pickled flat: the shopper's fields, windows and cart lines as plain tuples, rebuilt by one call
        (:func:`_thaw_user`). Every shopper is pickled once a visit (compaction) and in every recovery snapshot;
        the objects' own pickling (a class reference, a build and a ``__setstate__`` call for each of six
        windows and each cart line) took 24 µs to dump and 13.4 to load a benchmark shopper, this 18.5 and 11.7."""
        return _thaw_user, (
            self.first_ts, self.ref_ts, self.last_ts, self.prev_ts, self.last, self.prev, self.session,
            self.cart_cut, self.cart_totals, self.aff, self.top, self.distinct, self.plat_ts, self.platform,
            self.looks, [w.__getstate__() for w in self.wins],
            {item: (c.net, c.price_ts, c.price, c.cut, c.changes) for item, c in self.cart.items()},
        )

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        """Shoppers pickled before :meth:`__reduce__` (older snapshots and compacted blobs)."""
        self.looks = 0  # a snapshot from before looks
        for k, v in zip(self.__slots__, state):
            setattr(self, k, v)


def _thaw_user(
    first_ts: int, ref_ts: int, last_ts: int, prev_ts: int, last: list[int], prev: list[int],
    session: list[Any] | None, cart_cut: int, cart_totals: tuple[int, int, float] | None, aff: dict[str, float],
    top: list[str], distinct: list[dict[str, int]], plat_ts: int, platform: str | None, looks: int,
    wins: list[tuple[int, int, dict[int, int], int, int]], cart: dict[str, tuple[Any, ...]],
) -> UserState:
    """A :class:`UserState` from its flat pickled form (:meth:`UserState.__reduce__`)."""
    u = _new(UserState)
    u.first_ts, u.ref_ts, u.last_ts, u.prev_ts, u.last, u.prev, u.session = first_ts, ref_ts, last_ts, prev_ts, last, prev, session
    u.cart_cut, u.cart_totals, u.aff, u.top, u.distinct = cart_cut, cart_totals, aff, top, distinct
    u.plat_ts, u.platform, u.looks = plat_ts, platform, looks
    u.wins = [window(*w) for w in wins]
    lines = u.cart = {}
    for item, (net, price_ts, price, cut, changes) in cart.items():
        line = lines[item] = _new(CartLine)
        line.net, line.price_ts, line.price, line.cut, line.changes = net, price_ts, price, cut, changes
    return u


_new = object.__new__


class Frozen:
    """A shopper idle past ``features.compact_after``: their :class:`UserState` pickled and compressed, and
    the newest event time the eviction sweep reads. Most shoppers within the longest window are between
    visits, and a compacted one holds ~0.58 KB instead of ~8 KB of objects; the next event or merge thaws
    it (a few µs, once a visit). The round trip is exact, so features never depend on when a sweep ran.

    Compressed with zstd and ``zdict``, the shard's dictionary (:func:`shard_dictionary`): every shopper's
    pickle repeats the same class references, slot layout and window shapes, which a dictionary trained on
    the shard's first compacted shoppers holds once (measured on the benchmark's shoppers: 1,746 bytes a
    pickle, 549 with LZ4 and the first shoppers' pickles as its dictionary, ~400 with zstd and a trained one,
    compressing in the same ~6 µs: :data:`ZSTD_PARAMS`). A blob thaws only with the dictionary it was made
    with, so a shard keeps one for good, in its snapshots. Blobs of snapshots from before zstd are LZ4
    blocks, and thaw as such.

    >>> plan = FeaturePlan(FeatureDefs.model_validate({"counts": [{"name": "n", "types": "any", "windows": ["1h"]}]}))
    >>> u = UserState(1_000, plan); u.wins[0].add(1_000, 1)
    >>> d = shard_dictionary([UserState(5, plan)])
    >>> t = Frozen(u, d).thaw(d); t.wins[0].total(1_000), pickle.dumps(t) == pickle.dumps(u)
    (1, True)
    """

    __slots__ = ("last_ts", "blob", "looks")

    def __init__(self, user: UserState, zdict: bytes | None):
        self.last_ts = user.last_ts
        #: looks taken while compacted count here (a look reads a thawed copy and leaves the blob as it is)
        self.looks = user.looks
        self.blob = _codec(zdict)[0](pickle.dumps(user, protocol=pickle.HIGHEST_PROTOCOL))

    def thaw(self, zdict: bytes | None) -> UserState:
        blob = self.blob
        raw = _codec(zdict)[1](blob) if blob.startswith(ZSTD_MAGIC) else lz4.block.decompress(blob, dict=zdict)
        user: UserState = pickle.loads(raw)
        user.looks = self.looks
        return user

    def __setstate__(self, state: tuple[None, dict[str, Any]]) -> None:
        self.looks = 0  # a snapshot from before looks
        for k, v in state[1].items():
            setattr(self, k, v)


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
"""What a zstd frame starts with; an LZ4 block of an older snapshot starts with its length, never 4 GB."""

#: a shard's dictionary is trained on the pickles of the first shoppers it compacts, at most this many, with
#: zstd's fast trainer and fixed parameters (measured on the benchmark's shoppers at level 3: ~1.5 ms once a
#: shard, 380 bytes a shopper; the default trainer searches its parameters, ~15 ms a shard, for 3 % fewer
#: bytes; the pickles themselves as the dictionary: nothing to train, 10 % more bytes)
DICT_USERS = 32
DICT_MAX_BYTES = 8_192
_TRAINER = {"k": 1024, "d": 8, "f": 14, "accel": 1}
ZSTD_PARAMS = zstandard.ZstdCompressionParameters(
    window_log=15, hash_log=11, chain_log=11, search_log=1, min_match=6, target_length=0,
    strategy=zstandard.STRATEGY_FAST, write_content_size=1, write_checksum=0, write_dict_id=0,
)
"""zstd's parameters for a pickle of a few KB and a small dictionary: its fast strategy and a table of 2**11
entries. A level's own parameters size its tables for large inputs: at level 3, with a dictionary a shard and
64 shards a process, compressing a shopper took 17 µs instead of 5 (the tables out of the caches); these take
~6 µs, as LZ4 did, for 406 bytes a shopper (level 3: 380, LZ4: 549). Thawing takes ~3.7 µs (LZ4: ~1.6), and a
shopper is compacted and thawed once a visit."""


def shard_dictionary(users: Iterable[UserState]) -> bytes:
    """A zstd dictionary trained on a few shoppers' pickles; with too few for zstd's trainer (it needs about
    ten), their pickles themselves, which zstd takes as a raw-content dictionary."""
    samples = [pickle.dumps(u, protocol=pickle.HIGHEST_PROTOCOL) for u in users]
    try:
        return zstandard.train_dictionary(DICT_MAX_BYTES, samples, **_TRAINER).as_bytes()
    except zstandard.ZstdError:
        return b"".join(samples)[-DICT_MAX_BYTES:]


def _codec(zdict: bytes | None) -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
    """Compress and decompress with one dictionary, in this thread: zstd's contexts are not for two threads at
    once (they release the interpreter lock), and a process's worker threads share the ones without a
    dictionary (older snapshots' shards)."""
    return _thread_codec(zdict, threading.get_ident())


@functools.lru_cache(maxsize=4096)
def _thread_codec(zdict: bytes | None, _thread: int) -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
    """Made once a shard and thread: loading a dictionary costs more than a shopper's compression. A trained
    dictionary starts with zstd's dictionary magic; anything else, such as the raw pickles an older snapshot's
    shard kept for LZ4, is used as raw content; none or empty: none."""
    d = zstandard.ZstdCompressionDict(zdict) if zdict else None
    if d is not None:
        d.precompute_compress(compression_params=ZSTD_PARAMS)
    compressor = zstandard.ZstdCompressor(dict_data=d, compression_params=ZSTD_PARAMS)
    return compressor.compress, zstandard.ZstdDecompressor(dict_data=d).decompress


def _thawed(user: UserState | Frozen | None, zdict: bytes | None) -> UserState | None:
    return user.thaw(zdict) if type(user) is Frozen else user  # type: ignore[union-attr]


class Recipe(NamedTuple):
    """The updates one event type makes."""

    #: per window whose slots the event only counts: (window index, packed delta)
    counts: tuple[tuple[int, int], ...]
    #: per window with a slot summing a value: (window index, packed delta of the slots counting 1, (shift,
    #: field) of the slots summing a value, (packed 1, field) of the slots counting the events whose field is a
    #: number)
    valued: tuple[tuple[int, int, tuple[tuple[int, str], ...], tuple[tuple[int, str], ...]], ...]
    recency: tuple[int, ...]
    #: (distinct index, prop whose value is counted or None, else the value itself (the platform), max values)
    distinct: tuple[tuple[int, str | None, str | None, int], ...]
    #: the event's platform if features know it, else None
    platform: str | None


_NO_RECIPES: dict[str, Recipe] = {}
"""The recipes of a platform features do not know (``FeaturePlan.recipe`` takes it for none)."""


CART_TYPES = frozenset({"add_to_cart", "remove_from_cart", "order"})
"""The event types that change a cart."""

ONE, VALUE, PRESENT = 0, 1, 2
"""How an event feeds a slot: counts 1, adds a prop's value, or counts 1 when the prop is a number."""

SCALE = 1_000_000
"""Summed values are kept as integer millionths: integer sums are exact in any order, so a replay
after recovery, or events arriving out of order, give the very same totals (floats would not)."""

MAX_VALUE = 1e9
"""Sums take values within ±MAX_VALUE (others, like NaN, are left out): a window slot holds 2**63
millionths, so thousands of extreme events still cannot overflow it into its neighbour. The parser
refuses money amounts beyond this bound."""


class FeaturePlan:
    """Feature definitions compiled into window slots and value getters."""

    def __init__(self, defs: FeatureDefs):
        self.defs = defs
        self.getters: dict[str, Getter] = {}
        #: the window slots (window, slot) each getter reads from the totals
        self.slots_of: dict[str, tuple[tuple[int, int], ...]] = {}
        self._widths: list[int] = []
        self._slots: list[list[str]] = []
        #: (window index, slot, types or None for any, mode, field, platform or None for any)
        self._feeds: list[tuple[int, int, frozenset[str] | None, int, str, str | None]] = []
        #: platform (None: none, or one features do not know) -> event type -> recipe, filled by ``recipe``
        self.recipes: dict[str | None, dict[str, Recipe]] = {p: {} for p in (None, *PLATFORMS)}
        #: (name, window, slot, scaled) of every plain window feature, for ``values``
        self._window_values: list[tuple[str, int, int, bool]] = []

        self.recency = list(defs.recency.items())
        self.recency_types: list[frozenset[str] | None] = [None if t == "any" else frozenset(t) for _, t in self.recency]
        for gi, (name, _) in enumerate(self.recency):
            self.getters[f"last_{name}_ts"] = _last_getter(gi)
            self.getters[f"since_last_{name}_s"] = _since_getter(gi)
        self.order_group = -1
        if defs.rfm or defs.lifecycle:
            order_type = defs.rfm.order_type if defs.rfm else "order"
            self.order_group = next(
                (gi for gi, t in enumerate(self.recency_types) if t == frozenset([order_type])), -1
            )
            if self.order_group < 0:  # a hidden group: RFM and lifecycle need the last order
                self.recency.append(("__order", [order_type]))
                self.recency_types.append(frozenset([order_type]))
                self.order_group = len(self.recency) - 1
        self.getters["first_seen_ts"] = lambda u, at, t: u.first_ts
        self.getters["user_age_s"] = lambda u, at, t: (at - u.first_ts) // 1000
        self.getters["last_platform"] = lambda u, at, t: u.platform

        for c in defs.counts:
            types = None if c.types == "any" else frozenset(c.types)
            for w in c.windows:
                self._window_feature(f"{c.name}_{window_label(w)}", w, types, ONE, "")
        for sd in defs.sums:
            for w in sd.windows:
                label = window_label(w)
                wi, si = self._window_feature(f"{sd.name}_{label}", w, frozenset(sd.types), VALUE, sd.field)
                if sd.average:
                    _, ni = self._window_feature(f"{sd.name}_{label}__n", w, frozenset(sd.types), PRESENT, sd.field)
                    del self.getters[f"{sd.name}_{label}__n"], self.slots_of[f"{sd.name}_{label}__n"]
                    self.getters[f"{sd.average}_{label}"] = _average(wi, si, ni)
                    self.slots_of[f"{sd.average}_{label}"] = ((wi, si), (wi, ni))
        self.session_slots: list[tuple[int, int]] = []
        if defs.session:
            for w in defs.session.windows:
                self.session_slots.append(self._slot(w, f"sessions_{window_label(w)}"))
                wi, si = self.session_slots[-1]
                self.getters[f"sessions_{window_label(w)}"] = _window_getter(wi, si)
                self.slots_of[f"sessions_{window_label(w)}"] = ((wi, si),)
            self.getters["session_id"] = lambda u, at, t: u.session[0] if u.session else ""
            self.getters["session_events"] = lambda u, at, t: u.session[3] if u.session else 0
            self.getters["session_pages"] = lambda u, at, t: u.session[4] if u.session else 0
            self.getters["session_duration_s"] = lambda u, at, t: (u.session[2] - u.session[1]) // 1000 if u.session else 0
        if defs.rfm:
            self._rfm()
        if defs.lifecycle:
            self._lifecycle()
        for c in defs.counts:  # the last slots of their windows: a read of the others stops before them
            types = None if c.types == "any" else frozenset(c.types)
            for w in c.windows:
                for platform in c.by_platform:
                    self._window_feature(f"{c.name}_{window_label(w)}_{platform}", w, types, ONE, "", platform)

        self.distinct = list(defs.distinct)
        for di, d in enumerate(self.distinct):
            for w in d.windows:
                self.getters[f"{d.name}_{window_label(w)}"] = _distinct_getter(di, int(w * 1000))
        if defs.cart:
            self.getters["cart_items"] = lambda u, at, t: (u.cart_totals or _cart_totals(u))[0]
            self.getters["cart_quantity"] = lambda u, at, t: (u.cart_totals or _cart_totals(u))[1]
            self.getters["cart_value"] = lambda u, at, t: (u.cart_totals or _cart_totals(u))[2]
        if defs.affinity:
            self.getters["top_categories"] = lambda u, at, t: list(u.top)
            self.getters["category_affinity"] = _affinity_getter(defs.affinity.half_life * 1000)

        n = defs.buckets_per_window
        self.window_shapes = [(w, max(1, w // n)) for w in self._widths]
        distinct_ms = [int(w * 1000) for d in self.distinct for w in d.windows]
        gap_ms = [int(defs.session.gap * 1000)] if defs.session else []
        # a shopper back after ``dormant_within`` reads churned only if still held: kept ``remember``
        remember_ms = [int(defs.lifecycle.remember * 1000)] if defs.lifecycle else []
        #: how long a silent shopper is kept: the longest window, or ``lifecycle.remember``
        self.retention_ms = max(self._widths + distinct_ms + gap_ms + remember_ms + [0])
        self.names = sorted(self.getters)
        plain = {name for name, *_ in self._window_values if name in self.getters}
        by_window: dict[int, list[tuple[str, int, bool]]] = {}
        for name, wi, si, scaled in self._window_values:
            if name in plain:
                by_window.setdefault(wi, []).append((name, si, scaled))
        self._by_window = sorted(by_window.items())
        self._other = [(n, g) for n, g in sorted(self.getters.items()) if n not in plain]

    def _slot(self, window_s: float, name: str) -> tuple[int, int]:
        w = int(window_s * 1000)
        if w not in self._widths:
            self._widths.append(w)
            self._slots.append([])
        wi = self._widths.index(w)
        if name not in self._slots[wi]:
            self._slots[wi].append(name)
        return wi, self._slots[wi].index(name)

    def _window_feature(
        self, name: str, window_s: float, types: frozenset[str] | None, mode: int, fld: str, platform: str | None = None
    ) -> tuple[int, int]:
        wi, si = self._slot(window_s, name)
        self._feeds.append((wi, si, types, mode, fld, platform))
        self.getters[name] = _sum_getter(wi, si) if mode == VALUE else _window_getter(wi, si)
        self.slots_of[name] = ((wi, si),)
        self._window_values.append((name, wi, si, mode == VALUE))
        return wi, si

    def values(self, u: UserState, at: int) -> dict[str, Any]:
        """Every feature of a user as of ``at``."""
        return self.reader(None)(u, at)

    def reader(self, names: Iterable[str] | None) -> Callable[[UserState, int], dict[str, Any]]:
        """A function computing the named features (all when None): each window a feature reads is totalled
        and unpacked once per read, up to the last slot any of them needs, and the other getters share it."""
        wanted = set(self.names if names is None else names)
        unknown = wanted - set(self.getters)
        if unknown:
            raise ValueError(f"unknown features: {sorted(unknown)}")
        upto: dict[int, int] = {}
        for name in wanted:
            for wi, si in self.slots_of.get(name, ()):
                upto[wi] = max(upto.get(wi, 0), si + 1)
        unpack = [(wi, unpacker(n, len(self._slots[wi]))) for wi, n in sorted(upto.items())]
        counts: list[tuple[int, tuple[str, ...], Callable[[tuple[int, ...]], tuple[int, ...]]]] = []
        sums: list[tuple[str, int, int]] = []
        for wi, entries in self._by_window:
            mine = [(name, si) for name, si, scaled in entries if name in wanted and not scaled]
            if mine:  # picked and named in C: one itemgetter and one zip per window
                idx = [si for _, si in mine] * (2 if len(mine) == 1 else 1)  # (a 1-item getter gives no tuple)
                counts.append((wi, tuple(name for name, _ in mine), itemgetter(*idx)))
            sums += [(name, wi, si) for name, si, scaled in entries if name in wanted and scaled]
        other = [(n, g) for n, g in self._other if n in wanted]
        empty: tuple[int, ...] = ()
        nwin = len(self._widths)

        def read(u: UserState, at: int) -> dict[str, Any]:
            t = [empty] * nwin
            wins = u.wins
            for wi, up in unpack:
                t[wi] = up(wins[wi].total(at))
            out: dict[str, Any] = {}
            for wi, names, pick in counts:
                out.update(zip(names, pick(t[wi])))
            for name, wi, si in sums:
                out[name] = round(t[wi][si] / SCALE, 2)
            for name, get in other:
                out[name] = get(u, at, t)
            return out

        return read

    def recipe(self, etype: str, platform: str | None) -> Recipe:
        """What an event of a type and platform updates, worked out once per pair (the per-event path only
        follows it). A platform features do not know is taken for none (and not kept as a key: any string
        may come)."""
        by_type = self.recipes.get(platform)
        if by_type is None:
            return self.recipe(etype, None)
        r = by_type.get(etype)
        if r is None:
            by_window: dict[int, tuple[list[int], list[tuple[int, str]], list[tuple[int, str]]]] = {}
            for wi, si, types, mode, fld, only in self._feeds:
                if (types is None or etype in types) and (only is None or only == platform):
                    ones, values, present = by_window.setdefault(wi, ([], [], []))
                    shift = si * SLOT_BITS
                    if mode == ONE:
                        ones.append(1 << shift)
                    else:
                        (values if mode == VALUE else present).append((shift if mode == VALUE else 1 << shift, fld))
            windows = sorted(by_window.items())
            r = by_type[etype] = Recipe(
                tuple((wi, sum(o)) for wi, (o, v, p) in windows if not v and not p),
                tuple((wi, sum(o), tuple(v), tuple(p)) for wi, (o, v, p) in windows if v or p),
                tuple(gi for gi, t in enumerate(self.recency_types) if t is None or etype in t),
                tuple(
                    (di, d.field, None if d.field is not None else platform, d.max_values)
                    for di, d in enumerate(self.distinct)
                    if (d.types == "any" or etype in d.types) and (d.field is not None or platform is not None)
                ),
                platform,
            )
        return r

    def _rfm(self) -> None:
        r = self.defs.rfm
        assert r is not None
        types = frozenset([r.order_type])
        wi, oi = self._window_feature("rfm_frequency", r.horizon, types, ONE, "")
        _, mi = self._window_feature("rfm_monetary", r.horizon, types, VALUE, r.amount_field)
        og = self.order_group
        g = self.getters

        def days(u: UserState, at: int) -> float:
            ts = u.last[og]
            return (at - ts) / 86_400_000 if ts >= 0 else -1.0

        g["rfm_recency_days"] = lambda u, at, t: round(days(u, at), 2)
        g["rfm_r"] = lambda u, at, t: 1 if (d := days(u, at)) < 0 else _score_down(d, r.recency_days)
        g["rfm_f"] = lambda u, at, t: _score_up(t[wi][oi], r.frequency)
        g["rfm_m"] = lambda u, at, t: _score_up(t[wi][mi] / SCALE, r.monetary)
        g["rfm_segment"] = lambda u, at, t: f"{g['rfm_r'](u, at, t)}{g['rfm_f'](u, at, t)}{g['rfm_m'](u, at, t)}"
        repeat = self.defs.lifecycle.repeat_orders if self.defs.lifecycle else 2
        g["repeat_buyer"] = lambda u, at, t: t[wi][oi] >= repeat
        for name in ("rfm_f", "rfm_m", "rfm_segment", "repeat_buyer"):
            self.slots_of[name] = ((wi, oi), (wi, mi))

    def _lifecycle(self) -> None:
        lc = self.defs.lifecycle
        assert lc is not None
        new_ms, active_ms = lc.new_within * 1000, lc.active_within * 1000
        at_risk_ms, dormant_ms = lc.at_risk_within * 1000, lc.dormant_within * 1000
        og = self.order_group

        def stage(u: UserState, at: int, t: Totals) -> str:
            """The stage the user was in when this event came: a returning dormant user says so."""
            if at - u.first_ts <= new_ms and u.last[og] < 0:
                return "new"
            gap = at - u.prev_ts if u.prev_ts >= 0 else 0
            if gap <= active_ms:
                return "active"
            if gap <= at_risk_ms:
                return "at_risk"
            if gap <= dormant_ms:
                return "dormant"
            return "churned"

        self.getters["lifecycle_stage"] = stage


def _window_getter(wi: int, si: int) -> Getter:
    return lambda u, at, t: t[wi][si]


def _sum_getter(wi: int, si: int) -> Getter:
    return lambda u, at, t: round(t[wi][si] / SCALE, 2)


def _average(wi: int, si: int, ni: int) -> Getter:
    def avg(u: UserState, at: int, t: Totals) -> float:
        n = t[wi][ni]
        return round(t[wi][si] / SCALE / n, 2) if n else 0.0

    return avg


def _affinity_getter(half_ms: float) -> Getter:
    """The top categories' interest decayed to ``at`` (every score shares one factor, see ``_affinity``)."""

    def affinity(u: UserState, at: int, t: Totals) -> dict[str, float]:
        decay, aff = 2.0 ** (-(at - u.ref_ts) / half_ms), u.aff
        return {c: round(aff[c] * decay, 3) for c in u.top}

    return affinity


def _last_getter(gi: int) -> Getter:
    return lambda u, at, t: u.last[gi]


def _since_getter(gi: int) -> Getter:
    def since(u: UserState, at: int, t: Totals) -> int:
        ts = u.prev[gi] if u.last[gi] == at else u.last[gi]
        return (at - ts) // 1000 if ts >= 0 else -1

    return since


def _distinct_getter(di: int, window_ms: int) -> Getter:
    """Values seen within the window; a read is as of the user's newest event, so none is seen after ``at``."""
    return lambda u, at, t: sum(map((at - window_ms).__lt__, u.distinct[di].values()))


class ShardState:
    """The users, the dedup memory and the event-time high mark of one shard."""

    __slots__ = ("users", "dedup", "max_ts", "since_evict", "swept_ts", "compacted", "changed", "accepted", "zdict",
                 "looked_ts", "looked", "looks_due", "clock")

    def __init__(self, dedup_window_ms: int):
        #: users changed since the last flush are never Frozen (the flush reads them)
        self.users: dict[str, UserState | Frozen] = {}
        self.dedup = Deduper(dedup_window_ms)
        self.max_ts = 0
        self.since_evict = 0
        #: ``max_ts`` at the last sweep (:meth:`FeatureEngine.evict`), and the users it left compacted
        self.swept_ts = self.compacted = 0
        self.changed: set[str] = set()
        #: events accepted since this process started (not snapshotted: a run's count)
        self.accepted = 0
        #: the dictionary its Frozen users are compressed with (:class:`Frozen`), made at its first compaction
        self.zdict: bytes | None = None
        #: event time at the last scan for looks at quiet users (not snapshotted: a restored shard scans at once),
        #: and the looks taken since this process started (``nudgeflow_idle_looks``)
        self.looked_ts = self.looked = 0
        #: looks taken as users came back, out with the batch (``apply_batch``) or the next ``look``
        self.looks_due: list[Enriched] = []
        #: event time per source partition, for the looks' watermark (fed only when looks are configured)
        self.clock = PartitionClock()

    def __getstate__(self) -> tuple[Any, ...]:
        # ``changed``: users not yet published; after a restart they are published from the restored state
        return (self.users, self.dedup.ids, self.dedup.window_ms, self.max_ts, self.changed, self.zdict, self.clock)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.users, ids, window_ms, self.max_ts, self.changed, *rest = state
        # a snapshot of a version without dictionaries: its compacted users were compressed without one
        self.zdict = rest[0] if rest else b""
        self.clock = rest[1] if len(rest) > 1 else PartitionClock()  # a snapshot from before looks: none yet
        self.dedup = Deduper(window_ms)
        self.dedup.ids = ids
        self.since_evict = self.swept_ts = self.compacted = 0
        self.accepted = self.looked_ts = self.looked = 0
        self.looks_due = []


class FeatureEngine:
    """Pure feature logic: ``apply`` events to a shard, ``flush`` the users they changed.

    ``needed`` names the features each enriched event carries (those trigger
    conditions and models read); ``None`` means all of them.

    >>> from nudgeflow.settings import EventsConfig, FeatureDefs, FeaturesConfig
    >>> defs = FeatureDefs.model_validate({"counts": [{"name": "views", "types": ["browse"], "windows": ["1h"]}]})
    >>> eng = FeatureEngine(defs, FeaturesConfig(), EventsConfig(), needed=["views_1h"])
    >>> st = eng.new_state()
    >>> out = [eng.apply(st, Event(f"e{i}", "u1", "browse", 1_000_000 + i * 60_000)) for i in range(3)]
    >>> out[-1].features
    {'views_1h': 3}
    >>> eng.apply(st, Event("e1", "u1", "browse", 1_200_000)).reason
    'duplicate'
    >>> [(f.user_id, f.features["views_1h"]) for f in eng.flush(st)]
    [('u1', 3)]
    """

    def __init__(
        self, defs: FeatureDefs, cfg: FeaturesConfig, events: EventsConfig, needed: Iterable[str] | None = None,
        enrich: bool = True, follow: tuple[Reloadable, Callable[[TriggersFile], set[str]]] | None = None,
    ):
        self.plan = plan = FeaturePlan(defs)
        #: False: accepted events produce no Enriched (nothing downstream reads them)
        self.enrich = enrich
        #: a trigger file that may change, and the features a version of it needs enriched events to carry
        self.follow = follow
        self.version = follow[0].version if follow else 0
        self.lateness_ms = int(cfg.allowed_lateness * 1000)
        self.dedup_ms = int(events.dedup_window * 1000)
        self.idle_ms = plan.retention_ms + self.lateness_ms
        #: users idle this long are compacted at the next sweep (never: longer than any span of event time)
        self.compact_ms = 1 << 62 if cfg.compact_after is None else int(cfg.compact_after * 1000)
        #: a shard also sweeps at a flush once event time moved this far since its last sweep, so that a
        #: shard with few events still compacts its idle users
        self.sweep_ms = 1 << 62 if cfg.compact_after is None else self.compact_ms // 2
        #: ``idle`` looks (ms of silence, shortest first), taken at a flush once the shard's watermark moved
        #: ``look_ms`` since its last scan (a scan is O(users in the shard), at most one a publication): a look
        #: comes at most that late, 1/96 of the shortest span (15 min for a day)
        self.idle = [int(d * 1000) for d in defs.idle] if enrich else []
        self.look_ms = max(1, self.idle[0] // 96) if self.idle else 1 << 62
        #: wall time after which a silent source partition stops holding the looks' watermark back
        self.silent_ms = int(cfg.idle_timeout * 1000)
        #: the newest event time any shard of this process has seen: at the end of a bounded input every
        #: partition is read, and the last looks go by it
        self.max_ts = 0
        #: per distinct feature, its longest window: older values are never counted again (see ``evict``)
        self.distinct_ms = [int(max(d.windows) * 1000) for d in plan.distinct]
        self.read_needed = plan.reader(needed)
        self.read_all = plan.reader(None)
        d = defs
        self.session_gap = int(d.session.gap * 1000) if d.session else 0
        self.page_types = frozenset(d.session.page_types) if d.session else frozenset()
        self.cart_types = CART_TYPES if d.cart else frozenset()
        self.aff_weights = d.affinity.weights if d.affinity else {}
        self.aff_field = d.affinity.field if d.affinity else ""
        self.aff_half = d.affinity.half_life * 1000 if d.affinity else 1.0
        self.aff_top = d.affinity.top if d.affinity else 0
        self.aff_max = d.affinity.max_categories if d.affinity else 0

    @property
    def names(self) -> list[str]:
        return self.plan.names

    def refresh(self) -> None:
        """Carry the features a reloaded trigger file reads, before the trigger step sees its events."""
        if self.follow is None:
            return
        source, needed_of = self.follow
        source.poll()
        if source.version != self.version:
            self.version = source.version
            self.read_needed = self.plan.reader(needed_of(source.current))

    def new_state(self) -> ShardState:
        return ShardState(self.dedup_ms)

    def apply_batch(self, st: ShardState, events: list[Event]) -> list[Enriched | DeadLetter]:
        """Apply events in order: their Enriched (if enriching) and the refusals; a look taken as a quiet user
        came back (:meth:`look`) goes just before the event that brought them back. With looks configured,
        the way in for events: it feeds the shard's partition clock, which :meth:`apply` alone does not."""
        apply = self.apply
        if not self.idle:
            out = [apply(st, ev) for ev in events]
            return out if self.enrich else [r for r in out if r is not None]
        out, see, now = [], st.clock.see, wall_ms()
        for ev in events:
            see(ev.position, ev.ts, now)
            r = apply(st, ev)
            if st.looks_due:
                out += st.looks_due
                st.looked += len(st.looks_due)
                st.looks_due = []
            out.append(r)
        return out

    def apply(self, st: ShardState, ev: Event) -> Enriched | DeadLetter | None:
        """One event: its Enriched (None when not enriching), or a refusal."""
        ts, seen = ev.ts, st.dedup.ids  # the Deduper's dict, read and written here without two calls an event
        if ev.event_id in seen:
            return _refuse(ev, "duplicate", f"event_id {ev.event_id[:60]!r} seen within events.dedup_window")
        user = st.users.get(ev.user_id)
        if type(user) is Frozen:
            user = st.users[ev.user_id] = user.thaw(st.zdict)
        if ev.type in FEEDBACK_TYPES:  # about our messages, not shopping: it changes no feature (see _feedback)
            return self._feedback(st, ev, user)
        if user is not None and ts < user.last_ts - self.lateness_ms:
            return _refuse(ev, "too_late", f"{(user.last_ts - ts) / 1000:.0f}s behind the user's newest event")
        seen[ev.event_id] = ts
        if user is None or ts - user.last_ts > self.idle_ms:
            # a user back after the longest retention starts afresh, evicted yet or not: results never
            # depend on when the eviction scan ran
            user = st.users[ev.user_id] = UserState(ts, self.plan)
        elif ts < user.first_ts:
            user.first_ts = ts
        if ts > user.last_ts:
            if self.idle and user.looks < len(self.idle) and user.last_ts + self.idle[user.looks] < ts:
                # back after a look's moment: no event of theirs before ts minus the lateness can still come
                until = max(ts - self.lateness_ms, st.clock.wm)
                st.looks_due += self._take(ev.user_id, user, until, ts, st.zdict)
            user.prev_ts, user.last_ts = user.last_ts, ts
            user.looks = 0
        elif ts > user.prev_ts and ts != user.last_ts:
            user.prev_ts = ts
        if ts > st.max_ts:
            st.max_ts = ts
            if ts > self.max_ts:
                self.max_ts = ts
        self._update(user, ev)
        st.changed.add(ev.user_id)
        st.accepted += 1
        st.since_evict += 1
        if st.since_evict >= EVICT_EVERY:
            self.evict(st)
        return Enriched(ev, self.read_needed(user, user.last_ts)) if self.enrich else None

    def _feedback(self, st: ShardState, ev: Event, user: UserState | None) -> Enriched | None:
        """A delivery, open, click or unsubscribe of one of our messages passes with the shopper's features as
        they are: counted as activity it would make a shopper just sent a win-back message look active
        (``events_*``, ``since_last_event_s``, sessions, lifecycle). The ``feedback`` query measures them."""
        st.dedup.ids[ev.event_id] = ev.ts
        st.accepted += 1
        if ev.ts > st.max_ts:  # event time moved on all the same (evictions, compaction and looks go by it)
            st.max_ts = ev.ts
            if ev.ts > self.max_ts:
                self.max_ts = ev.ts
        if not self.enrich:
            return None
        return Enriched(ev, self.read_needed(user, user.last_ts) if user is not None
                        else self.read_needed(UserState(ev.ts, self.plan), ev.ts))

    def _update(self, u: UserState, ev: Event) -> None:
        ts, etype, props = ev.ts, ev.type, ev.props
        r = self.plan.recipes.get(ev.platform, _NO_RECIPES).get(etype) or self.plan.recipe(etype, ev.platform)
        wins = u.wins
        for wi, d in r.counts:  # PackedWindow.add, inlined: the hottest lines of the feature step
            w = wins[wi]
            b = ts // w.bucket_ms
            buckets = w.buckets
            buckets[b] = buckets.get(b, 0) + d
            w.tot += d
            if b < w.lo:
                w.lo = b
        for wi, d, values, present in r.valued:
            for shift, fld in values:
                v = props.get(fld)
                if (type(v) is int or type(v) is float) and -MAX_VALUE <= v <= MAX_VALUE:
                    d += round(v * SCALE) << shift
            for one, fld in present:
                v = props.get(fld)
                if (type(v) is int or type(v) is float) and -MAX_VALUE <= v <= MAX_VALUE:
                    d += one
            wins[wi].add(ts, d)
        last, prev = u.last, u.prev
        for gi in r.recency:
            if ts > last[gi]:
                prev[gi], last[gi] = last[gi], ts
            elif ts > prev[gi]:
                prev[gi] = ts
        for di, fld, value, max_values in r.distinct:
            v = props.get(fld) if fld is not None else value
            if v is not None:
                seen = u.distinct[di]
                key = v if type(v) is str else str(v)
                if seen.get(key, -1) < ts:
                    seen.pop(key, None)  # re-insert: dict order is recency order
                    seen[key] = ts
                    if len(seen) > max_values:
                        del seen[next(iter(seen))]
        platform = r.platform
        if platform is not None and (ts > u.plat_ts or (ts == u.plat_ts and platform > u.platform)):  # type: ignore[operator]
            u.plat_ts, u.platform = ts, platform  # of two at the same time, the greater: any order agrees
        if self.session_gap:
            self._session(u, ev)
        if etype in self.cart_types:
            _cart(u, etype, ts, props)
        weight = self.aff_weights.get(etype)
        if weight is not None:
            self._affinity(u, ts, props.get(self.aff_field), weight)

    def _session(self, u: UserState, ev: Event) -> None:
        s = u.session
        key = ev.session_id
        new = s is None or (key is not None and key != s[0] and ev.ts >= s[1]) or (
            key is None and ev.ts - s[2] > self.session_gap
        )
        if new:
            u.session = s = [key or f"{ev.user_id}-{ev.ts}", ev.ts, ev.ts, 0, 0, ev.ts]
            for wi, si in self.plan.session_slots:
                u.wins[wi].add(ev.ts, 1 << (si * SLOT_BITS))
        assert s is not None
        s[1] = min(s[1], ev.ts)
        s[2] = max(s[2], ev.ts)
        s[3] += 1
        if ev.type in self.page_types:
            s[4] += 1

    def _affinity(self, u: UserState, ts: int, category: Any, weight: float) -> None:
        """Add a decayed weight; scores are kept scaled to the user's reference time.

        ``score(c, t) = Σ w · 2^-((t - ts)/half)``; storing ``Σ w · 2^((ts - ref)/half)``
        makes every category share one decay factor, so ranking needs no decay at all,
        and adding is commutative: late events need no special case.
        """
        if category is None:
            return
        c = category if type(category) is str else str(category)
        aff = u.aff
        aff[c] = aff.get(c, 0.0) + weight * 2.0 ** ((ts - u.ref_ts) / self.aff_half)
        top = u.top
        rank = _ranker(aff)
        if len(aff) > self.aff_max:  # forget the weakest category (it may be this one)
            gone = min(aff, key=rank)
            del aff[gone]
            if gone in top:
                top.remove(gone)
            if gone == c:
                return
        if c in top:  # its score only grew: re-rank only if it passed the one before it
            i = top.index(c)
            if i and rank(c) > rank(top[i - 1]):
                top.sort(key=rank, reverse=True)
        elif len(top) < self.aff_top or rank(c) > rank(top[-1]):
            top.append(c)
            top.sort(key=rank, reverse=True)
            del top[self.aff_top:]

    def release(self, st: ShardState, uid: str) -> UserState | None:
        """Take a shopper out of the shard, whole, to be absorbed by the user it now is (None when the shard
        knows nothing of it); it is not published again."""
        st.changed.discard(uid)
        return _thawed(st.users.pop(uid, None), st.zdict)

    def absorb(self, st: ShardState, uid: str, part: UserState) -> list[FeatureOut]:
        """Merge a released shopper into ``uid`` (new to the shard or not); ``uid`` is published on the shard's
        schedule, so nothing is returned.

        The result is the state ``uid`` would have had, had every event of both carried ``uid`` from the
        start. **Exact**: every window count and sum (buckets are absolute: they add), first, newest and
        previous event times, recency per group (the two newest of both), ``last_platform`` (the newest;
        of two at the same time the greater name), distinct values (union with each value's newest time)
        while both hold no more than ``max_values`` together, the cart (each line's changes since its
        newest purchase), affinity (one side rescaled to the other's reference time and added, top
        recomputed; up to float rounding, and ties in the top list may rank either way) while both hold no
        more than ``max_categories`` together, and the idle rule: a part whose newest event is idle past
        ``idle_ms`` before ``uid``'s first is dropped, and ``uid`` is replaced by a part whose first event
        comes idle past ``idle_ms`` after ``uid``'s newest, as applying the events would have done.

        **Rules**, not exact: sessions (the interleaving of two ids' sessions is not kept): the current
        session is the one with the newest event; the two current sessions combine when they share a key
        or lie within ``session.gap`` of each other (earliest start, newest event, events and pages
        summed; ``sessions_<window>`` then counts them once). A generated session id names the id that
        opened it. Over the caps above, the newest distinct values and the strongest categories are kept.
        An id whose own events were idle past ``idle_ms`` had already started afresh: the other id's
        events do not bring its older events back (they are older than every window).
        """
        if part.last_ts > st.max_ts:
            st.max_ts = part.last_ts
            self.max_ts = max(self.max_ts, part.last_ts)
        st.changed.add(uid)
        user = _thawed(st.users.get(uid), st.zdict)
        if user is None or part.first_ts - user.last_ts > self.idle_ms:
            st.users[uid] = part
            return []
        st.users[uid] = user
        if user.first_ts - part.last_ts <= self.idle_ms:
            self._merge(user, part)
        return []

    def _merge(self, u: UserState, p: UserState) -> None:
        """Fold ``p`` into ``u`` (both within ``idle_ms`` of each other): see :meth:`absorb`."""
        times = (u.last_ts, u.prev_ts, p.last_ts, p.prev_ts)
        # looks taken at the newest event time of both stand: the merged shopper has been quiet since then
        u.looks = u.looks if u.last_ts > p.last_ts else p.looks if p.last_ts > u.last_ts else max(u.looks, p.looks)
        u.last_ts = max(times)
        u.prev_ts = max((t for t in times if t < u.last_ts), default=-1)
        u.first_ts = min(u.first_ts, p.first_ts)
        for w, other in zip(u.wins, p.wins):
            w.merge(other)
        for gi, both in enumerate(zip(u.last, u.prev, p.last, p.prev)):
            u.last[gi], u.prev[gi] = sorted(both, reverse=True)[:2]
        if (p.plat_ts, p.platform or "") > (u.plat_ts, u.platform or ""):
            u.plat_ts, u.platform = p.plat_ts, p.platform
        for di, d in enumerate(self.plan.distinct):
            u.distinct[di] = _union(u.distinct[di], p.distinct[di], d.max_values)
        self._merge_session(u, p.session)
        for item, line in p.cart.items():
            mine = u.cart.get(item)
            if mine is None:
                u.cart[item] = line
            else:
                mine.merge(line)
        u.cart_cut = cut = max(u.cart_cut, p.cart_cut)
        for line in u.cart.values():
            line.buy(cut)
        u.cart_totals = None
        self._merge_affinity(u, p)

    def _merge_session(self, u: UserState, other: list[Any] | None) -> None:
        """The rule of :meth:`absorb`: the newest session is current; two current sessions close enough combine."""
        mine = u.session
        if other is None:
            return
        if mine is None:
            u.session = other
            return
        cur, old = (other, mine) if (other[2], other[0]) > (mine[2], mine[0]) else (mine, other)
        u.session = cur
        if cur[0] == old[0] or max(cur[1], old[1]) - min(cur[2], old[2]) <= self.session_gap:
            later = cur[5] if cur[5] > old[5] else old[5]
            for wi, si in self.plan.session_slots:  # one session now: forget the count of the later opening
                u.wins[wi].add(later, -(1 << (si * SLOT_BITS)))
            u.session = [cur[0], min(cur[1], old[1]), max(cur[2], old[2]), cur[3] + old[3], cur[4] + old[4],
                         min(cur[5], old[5])]

    def _merge_affinity(self, u: UserState, p: UserState) -> None:
        """Scores are scaled to each user's reference time (see :meth:`_affinity`): rescale, add, re-rank."""
        if not p.aff:
            return
        aff = u.aff
        scale = 2.0 ** ((p.ref_ts - u.ref_ts) / self.aff_half)
        for c, score in p.aff.items():
            aff[c] = aff.get(c, 0.0) + score * scale
        ranked = sorted(aff, key=_ranker(aff), reverse=True)
        for c in ranked[self.aff_max:]:
            del aff[c]
        u.top = ranked[:self.aff_top]

    def flush(self, st: ShardState) -> list[FeatureOut]:
        """Every feature of each user changed since the last flush (one per user). Those of them idle past
        ``compact_after`` by the shard's clock are compacted once published, not at the next sweep: a shard's
        clock runs ahead of a user's where their partition is behind the others, and replaying history, an
        hour between sweeps is a second (measured: 70 % of some shards' users left uncompacted at the end of
        a 200k-event replay, idle for days by the shard's clock)."""
        out, quiet, cold = [], [], st.max_ts - self.compact_ms
        for uid in st.changed:
            u = _thawed(st.users.get(uid), st.zdict)
            if u is not None:
                at = u.last_ts
                out.append(UserFeatures(uid, at, self.read_all(u, at)))
                if at <= cold:
                    quiet.append(uid)
        st.changed.clear()
        if st.max_ts - st.swept_ts >= self.sweep_ms:
            self.evict(st)
        elif quiet:
            st.compacted += self._freeze(st, quiet)
        if self.idle and st.clock.watermark(self.lateness_ms, self.silent_ms, wall_ms()) - st.looked_ts >= self.look_ms:
            out += self.look(st)
        return out

    def look(self, st: ShardState, final: bool = False) -> list[Enriched]:
        """An ``idle`` event for each look due at a quiet user, and those taken as users came back.

        A look at moment ``m`` (``idle[k]`` after the user's newest event) is taken once the shard's
        watermark passes ``m`` (the oldest of its source partitions' newest event times, less the allowed
        lateness, as the label and trigger steps keep theirs: a partition behind the others, say catching
        up after a restart, holds the looks at its shoppers back; one silent for ``idle_timeout`` of wall
        time does not, so looks come due in a shop gone quiet), by this scan or, when the user's next
        event comes first, as it is applied (no event of theirs from before it less the lateness can then
        come). So a look is taken exactly when the user stays quiet until ``m`` plus the allowed lateness;
        one back in between may or may not get it, by when the scans ran. Each look is taken once per quiet
        spell (``UserState.looks`` counts them, also while compacted; a new event starts the next spell).
        ``final``: the input has ended, every partition is read, and the newest event time counts.

        Its features are as of ``m`` (windows expired, ``since_*`` grown, the lifecycle stage moved on),
        read from a copy, so the state stays as its events made it; the event id names the user and the
        moment, so a replay takes the same looks.

        >>> from nudgeflow.settings import EventsConfig, FeatureDefs, FeaturesConfig
        >>> defs = FeatureDefs.model_validate({"recency": {"event": "any"}, "idle": ["1d"]})
        >>> eng = FeatureEngine(defs, FeaturesConfig(allowed_lateness=0), EventsConfig(), needed=["since_last_event_s"])
        >>> st = eng.new_state()
        >>> _ = eng.apply_batch(st, [Event("e1", "u1", "browse", 0), Event("e2", "u2", "browse", 90_000_000)])
        >>> [(x.event.type, x.event.user_id, x.event.ts, x.features) for x in eng.look(st)]
        [('idle', 'u1', 86400000, {'since_last_event_s': 86400})]
        >>> eng.look(st)  # once
        []
        """
        wm = st.clock.watermark(self.lateness_ms, self.silent_ms, wall_ms())
        until = max(self.max_ts, st.max_ts) - self.lateness_ms if final else wm
        st.looked_ts = wm
        out, st.looks_due = st.looks_due, []
        idle, n = self.idle, len(self.idle)
        for uid, u in st.users.items():
            k = u.looks
            if k < n and u.last_ts + idle[k] <= until:
                out += self._take(uid, u, until, 1 << 62, st.zdict)
        st.looked += len(out)
        return out

    def _take(self, uid: str, u: UserState | Frozen, until: int, before: int, zdict: bytes | None) -> list[Enriched]:
        """The looks at ``u`` due by ``until`` and before ``before`` (its next event), counted in ``u.looks``."""
        copy = u.thaw(zdict) if type(u) is Frozen else pickle.loads(pickle.dumps(u, pickle.HIGHEST_PROTOCOL))
        k, last, idle, now = u.looks, u.last_ts, self.idle, wall_ms()
        out = []
        while k < len(idle) and last + idle[k] <= until and last + idle[k] < before:
            at = last + idle[k]
            k += 1
            ev = Event(f"{IDLE}:{uid}:{at}", uid, IDLE, at, platform=copy.platform, ingest_ms=now,
                       props={"idle_s": idle[k - 1] // 1000, "look": k})
            out.append(Enriched(ev, self.read_needed(copy, at)))
        u.looks = k
        return out

    def evict(self, st: ShardState) -> None:
        """Drop users idle past the retention (every window, and ``lifecycle.remember``), ids past the dedup
        window, and distinct values past their feature's longest window (features are read at the user's
        newest time, which only moves on: such a value is never counted again; without this a busy shopper
        keeps ``max_values`` of them), then compact the users idle past ``compact_after`` (:class:`Frozen`),
        but for those changed since the last flush, which compacts them once it has read them."""
        st.since_evict, st.swept_ts = 0, st.max_ts
        horizon = st.max_ts - self.idle_ms
        idle = [uid for uid, u in st.users.items() if u.last_ts < horizon]
        for uid in idle:
            del st.users[uid]
        st.dedup.expire(st.max_ts - self.lateness_ms)
        cold, compacted, candidates = st.max_ts - self.compact_ms, 0, []
        for uid, u in st.users.items():
            if type(u) is Frozen:
                compacted += 1
                continue
            distinct = u.distinct
            for di, keep_ms in enumerate(self.distinct_ms):
                seen = distinct[di]
                cut = u.last_ts - keep_ms
                if seen and next(iter(seen.values())) <= cut:  # the oldest first (recency order)
                    distinct[di] = {v: ts for v, ts in seen.items() if ts > cut}
            if u.last_ts <= cold:
                candidates.append(uid)
        st.compacted = compacted + self._freeze(st, candidates)

    def _freeze(self, st: ShardState, uids: list[str]) -> int:
        """Compact those of ``uids`` still held uncompacted, idle past ``compact_after`` and not changed since the
        last flush; how many. The shard's first compaction makes its dictionary of its first shoppers, active
        ones too (their pickles have the same structure): of only the one or two idle at that moment, it would
        be the raw pickles of those, ~20 % more bytes a shopper for good."""
        users, changed, cold = st.users, st.changed, st.max_ts - self.compact_ms
        ready: list[tuple[str, UserState]] = []
        for uid in uids:
            u = users.get(uid)
            if type(u) is UserState and u.last_ts <= cold and uid not in changed:
                ready.append((uid, u))
        if ready and st.zdict is None:
            st.zdict = shard_dictionary(islice(users.values(), DICT_USERS))  # type: ignore[arg-type]  # none Frozen yet
        for uid, u in ready:
            users[uid] = Frozen(u, st.zdict)  # a value replaced, not a key added
        return len(ready)


def _cart(u: UserState, etype: str, ts: int, props: dict[str, Any]) -> None:
    """Adds and removes change a line by their quantity; an order buys each item it lists, whatever the
    quantity, or, without lines, the whole cart: what was added before it is gone, what comes after
    counts. A function of the events, not of their order (see :class:`CartLine`)."""
    u.cart_totals = None
    if etype == "add_to_cart":
        if ts > u.cart_cut:
            _line(u, props).change(ts, props.get("quantity", 1), props.get("price", 0.0))
    elif etype == "remove_from_cart":
        if ts > u.cart_cut:  # a remove before its add is kept: the add may still come (late, or merged)
            _line(u, props).change(ts, -props.get("quantity", 1), None)
    elif etype == "order":
        items = props.get("items")
        if items:
            for it in items:  # the line stays, emptied, as a mark: an older add arriving later was bought
                _line(u, it).buy(ts)
        elif ts > u.cart_cut:
            u.cart_cut = ts
            for line in u.cart.values():
                line.buy(ts)


def _cart_totals(u: UserState) -> tuple[int, int, float]:
    """Items, quantity and value of the lines with a positive quantity (kept until the cart changes: the
    features read them on every event, and bought lines stay in ``cart`` as marks)."""
    lines = [line for line in u.cart.values() if line.net > 0]
    u.cart_totals = (len(lines), sum(line.net for line in lines), round(sum(line.net * line.price for line in lines), 2))
    return u.cart_totals


def _line(u: UserState, props: dict[str, Any]) -> CartLine:
    item = str(props.get("item_id", ""))
    line = u.cart.get(item)
    if line is None:
        line = u.cart[item] = CartLine(u.cart_cut)
    return line


def _ranker(aff: dict[str, float]) -> Callable[[str], tuple[float, str]]:
    """The order of categories by interest; of two equal scores the greater name ranks first, so the
    ranking does not depend on the order the events (or the ids of one shopper) came in.

    >>> sorted(["bags", "shoes", "hats"], key=_ranker({"bags": 1.0, "shoes": 1.0, "hats": 2.0}), reverse=True)
    ['hats', 'shoes', 'bags']
    """
    return lambda c: (aff[c], c)


def _union(mine: dict[str, int], theirs: dict[str, int], cap: int) -> dict[str, int]:
    """Distinct values of two users: each value's newest time, in time order, the newest ``cap`` kept.

    >>> _union({"a": 5, "b": 1}, {"b": 7, "c": 3}, 2)
    {'a': 5, 'b': 7}
    """
    if not theirs:
        return mine
    both = dict(mine)
    for value, ts in theirs.items():
        if both.get(value, -1) < ts:
            both[value] = ts
    return dict(sorted(both.items(), key=lambda kv: kv[1])[-cap:])


def _refuse(ev: Event, reason: str, detail: str) -> DeadLetter:
    """A refusal after parsing, still carrying the record as it was received."""
    return DeadLetter(reason, detail, ev.raw, ev.position, ev.ingest_ms)


FeatureOut = Enriched | DeadLetter | UserFeatures


class FeatureLogic(StatefulBatchLogic[list[Event | Merge], FeatureOut | Merge, bytes]):
    """Bytewax adapter: one shard's state; emits enriched events and refusals as they come, and each
    changed user once per ``publish_s`` of wall time (woken by Bytewax when the shard goes quiet), with
    the looks at quiet shoppers due by then (``features.idle``: woken on that schedule while it holds any).

    ``recover``: whether recovery is on. Bytewax 0.21 asks every stateful step for a snapshot at the end
    of each epoch whether or not anything stores it; without recovery we skip pickling the shard.
    ``handoff``: where merged shoppers travel between shards (:mod:`operators.merge`); merges are passed
    on where they stand among the enriched events, for the later per-user steps, and a merged-away
    shopper's Redis hash is deleted (``UserFeatures.gone``).
    """

    def __init__(
        self, engine: FeatureEngine, resume: bytes | None, recover: bool = True, publish_s: float = 0.0,
        handoff: Handoff | None = None,
    ):
        self.engine = engine
        self.state, waiting = restore(resume, engine.new_state)
        self.desk = MergeDesk("features", handoff, waiting) if handoff is not None else None
        self.recover = recover
        self.publish = Deadline(publish_s)

    def on_batch(self, lists: list[list[Event | Merge]]) -> tuple[list[FeatureOut | Merge], bool]:
        """``lists``: the shard's events and merges, a list per upstream batch (``flows.common.shard_batches``)."""
        values = lists[0] if len(lists) == 1 else [v for b in lists for v in b]
        eng, st, desk = self.engine, self.state, self.desk
        eng.refresh()
        for v in values:
            if type(v) is Merge:
                break
        else:  # no merge in the batch, the common case
            desk = None
        if desk is None:
            out: list[FeatureOut | Merge] = eng.apply_batch(st, values)
        else:
            out, start = [], 0
            for i, v in enumerate(values):  # a release must follow the user's earlier events of the batch
                if type(v) is Merge:
                    out.extend(eng.apply_batch(st, values[start:i]))
                    out.extend(desk.take(eng, st, v))
                    if v.side != "absorb":
                        out.append(UserFeatures(v.src, GONE_TS, {}, gone=True))
                    if eng.enrich:
                        out.append(v)
                    start = i + 1
            out.extend(eng.apply_batch(st, values[start:]))
        if self.desk is not None:
            out.extend(self.desk.settle(eng, st))
        if self.publish.due():
            out.extend(self._publish())
        return out, StatefulBatchLogic.RETAIN

    def _publish(self) -> list[FeatureOut | Merge]:
        self.publish.reset()
        return self.engine.flush(self.state)  # type: ignore[return-value]

    def on_notify(self) -> tuple[list[FeatureOut | Merge], bool]:
        """Settle hand-overs; publish only when due: a shard awaiting a hand-over, or holding one back, wakes
        every ``RETRY_S`` (publishing on every wake published ten times a second per shard in live runs)."""
        out = self.desk.settle(self.engine, self.state) if self.desk is not None else []
        if self.publish.due(_EARLY_S):
            out += self._publish()
        return out, StatefulBatchLogic.RETAIN

    def on_eof(self) -> tuple[list[FeatureOut | Merge], bool]:
        """Settle, publish, and take the looks the input's end leaves due (a bounded run's last ones)."""
        out = self.desk.finish(self.engine, self.state) if self.desk is not None else []
        out += self._publish()
        if self.engine.idle:
            out += self.engine.look(self.state, final=True)
        return out, StatefulBatchLogic.RETAIN

    def notify_at(self) -> datetime | None:
        # a shard whose shoppers are all quiet still wakes on the publishing schedule: its looks come due
        at = self.publish.at if self.state.changed or (self.engine.idle and self.state.users) else None
        return self.desk.wake(at) if self.desk is not None else at

    def snapshot(self) -> bytes:
        return snapshot(self.state, self.desk) if self.recover else b""
