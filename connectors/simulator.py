"""A seeded, reproducible shopper simulator: the engine's embedded default source.

It also feeds benchmarks and, later, model training, so it is written for two
things: speed (a record costs several microseconds: one dict, one heap step,
one ``orjson.dumps``) and a purchase decision that depends on *observable* behaviour, so a
model fed the engine's features can learn it.

Wire format
-----------
One JSON object per record (orjson bytes) with ``event_id``, ``user_id`` (and/or
an anonymous id, see Identity), ``type``, ``ts`` (epoch ms UTC), ``session_id``,
``platform`` and ``props``.
A known user's first appearance starts with ``identify`` (timezone, locale,
birthday, tier) and, for some users, ``consent`` events; then come sessions of
``browse``/``search``/``click``/``favourite``/``add_to_cart``/
``remove_from_cart`` and possibly one ``order`` of the whole cart.

Identity
--------
A share ``anonymous_share`` of shoppers start anonymous on their platform,
carrying no ``user_id`` but the id that platform gives: ``anonymous_id`` (a web
cookie, ``c…``), ``device_id`` (app, ``d…``) or ``account_id`` (mini-program,
``m…``); their sessions stay on that platform and are named after that id. A
share ``login_share`` of them log in after ``1 + floor(Exp(mean 5))`` behaviour
events (mostly in their first or second session), or earlier when they go to
check out. The login is an ``identify`` (profile props, then consents)
carrying both ``user_id`` and the anonymous id, as does the rest of that
session. Afterwards they shop across platforms (60 % of sessions on their first
one) under ``user_id``, their web sessions also carrying ``anonymous_id``, their
web cookie, as web SDKs do (a cookie first seen after the login links
implicitly). The others never log in and check out as guests. Known shoppers
carry only ``user_id``; ``anonymous_share=0`` makes every shopper known and
spends no random draw on identity.

Behaviour model
---------------
Each user draws hidden traits from the seed: *intent* ``i ~ Beta(1, 3)``,
*activity* ``a ~ (0.4 + 2 i) * LogNormal(0, 0.35)`` (so frequent visitors tend
to buy), 2-3 preferred categories, a platform and a timezone. Sessions have
``1 + floor(Exp(mean 1.5 + 14 i))`` actions seconds to minutes apart; between
sessions the gap is ``20 min + Exp(mean G / a)`` hours to days, pushed out of
the user's local night (00:00-07:00). ``G`` is calibrated so that
``cfg.events`` spread over about 70 % of ``span_s`` (with ``start_ms``
defaulting to the UTC midnight before now minus that span, the newest events
land before now, and the stream is the same whatever the hour; when
that would need mean gaps under 30 min the history is lengthened instead).

After a product view in category ``c`` (the ``k``-th view of ``c`` in this
session) the next action is an add to cart with probability
``i * (0.15 + 0.10 * min(k, 4))``. Carts persist across sessions. When a
session's actions run out and the cart is not empty, the user orders the whole
cart with probability ``sigmoid(z)``::

    z = -2.2 + 0.18 * min(views, 20)            # product views this session
             + 0.60 * min(cart_lines, 5)        # distinct items in the cart
             + 0.50 * min(past_orders, 4)
             - 0.35 * ln(1 + hours_since_last_session)   # 720 for a new user
             + 2.0 * intent                     # hidden, but tied to activity

otherwise the cart is abandoned (until a later session orders it).

Bad records
-----------
With ``bad_rate > 0`` that fraction of records is *replaced* (the good event
is lost, as in a real broken producer) by one of :data:`BAD_KINDS`, drawn from
a separate seeded RNG so the good stream is otherwise unchanged.

Event time
----------
Each partition keeps a heap of per-user next-event times and a simulated clock
starting at ``start_ms``, so its records come in nondecreasing ``ts`` order.
With ``rate`` set (live mode) ``ts`` is the wall clock instead. With
``events=None`` and no ``rate`` the simulated clock eventually passes now.

>>> cfg = SimulatorConfig(users=20, events=5, seed=7, start_ms=1_700_000_000_000)
>>> recs = list(ShopperSimulator(cfg))
>>> [(r["type"], r["platform"], r.get("user_id"), r.get("anonymous_id")) for r in map(orjson.loads, recs[:2])]
[('browse', 'web', None, 'c00009'), ('identify', 'web', 'u00009', 'c00009')]
>>> len(recs), orjson.loads(recs[0])["event_id"], recs == list(ShopperSimulator(cfg))
(5, 'sim-0-0', True)
"""

from __future__ import annotations

import datetime as _dt
import math
import pickle
import random
import time
from bisect import bisect_right
from collections.abc import Iterator
from functools import lru_cache
from heapq import heapify, heapreplace
from statistics import NormalDist
from typing import Any

import orjson
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from pydantic import BaseModel, ConfigDict, Field

from nudgeflow.events import ID_FIELDS

_dumps = orjson.dumps
_log = math.log

__all__ = [
    "BAD_KINDS",
    "CATEGORIES",
    "ShopperSimulator",
    "SimulatorConfig",
    "SimulatorSource",
    "iter_records",
    "resolve_start_ms",
]


class SimulatorConfig(BaseModel):
    """How many shoppers, how many events, how fast, and how dirty."""

    model_config = ConfigDict(extra="forbid")

    users: int = Field(1000, gt=0)
    #: total records across partitions; None = unbounded
    events: int | None = Field(10_000, ge=0)
    seed: int = 42
    #: user i lives in partition i % partitions
    partitions: int = Field(1, ge=1)
    #: total records/s across partitions (live mode, ts = wall clock); None = as fast as possible
    rate: float | None = Field(None, gt=0)
    #: first simulated event time; None = now - span (resolved once per source)
    start_ms: int | None = None
    span_s: int = Field(7 * 86400, gt=0)
    bad_rate: float = Field(0.0, ge=0.0, le=1.0)
    #: shoppers who start anonymous (a web cookie, app device or mini-program account, no user_id)
    anonymous_share: float = Field(0.3, ge=0.0, le=1.0)
    #: of those, who ever log in (an identify carrying user_id and the anonymous id); the rest stay guests
    login_share: float = Field(0.7, ge=0.0, le=1.0)


CATEGORIES = (
    "electronics", "fashion", "home", "beauty", "sports", "toys",
    "books", "grocery", "garden", "auto", "pets", "jewelry",
)  # fmt: skip
_BASE_PRICE = (180.0, 45.0, 60.0, 25.0, 50.0, 30.0, 15.0, 8.0, 35.0, 70.0, 20.0, 120.0)
ITEMS_PER_CATEGORY = 50
_CLICK_TARGETS = ("banner:home", "nav:category", "recommendation", "promo:weekly", "footer:help", "push:open")
_QUERY_WORDS = ("sale", "best", "new", "cheap", "gift", "premium", "kids", "set")
#: (IANA zone, locale, standard UTC offset in hours, weight)
_ZONES = (
    ("America/New_York", "en-US", -5, 14), ("America/Los_Angeles", "en-US", -8, 8),
    ("Europe/London", "en-GB", 0, 8), ("Europe/Berlin", "de-DE", 1, 10),
    ("Europe/Paris", "fr-FR", 1, 6), ("Europe/Madrid", "es-ES", 1, 4),
    ("America/Sao_Paulo", "pt-BR", -3, 6), ("Asia/Shanghai", "zh-CN", 8, 16),
    ("Asia/Tokyo", "ja-JP", 9, 8), ("Asia/Kolkata", "en-IN", 5.5, 10),
    ("Asia/Singapore", "en-SG", 8, 4), ("Australia/Sydney", "en-AU", 10, 6),
)  # fmt: skip
_N_CATS = len(CATEGORIES)
_STD_NORMAL = NormalDist()
_ZONE_CUM = [sum(z[3] for z in _ZONES[: k + 1]) for k in range(len(_ZONES))]
_PLATFORMS = ("web", "app", "mini_program")
_PLATFORM_CUM = (0.45, 0.85, 1.0)
#: the id field an anonymous shopper carries on each platform, and the first letter of its values
_ANON_ID = {"web": ("anonymous_id", "c"), "app": ("device_id", "d"), "mini_program": ("account_id", "m")}
_ID_KEYS = ("user_id", *ID_FIELDS)
#: probability that a session is on the shopper's own platform: known shoppers, and logged-in ones who started anonymous
_STAY = 0.85
_STAY_MULTI = 0.6
_MEAN_LOGIN_WAIT = 5.0  # a login comes after 1 + floor(Exp(this)) behaviour events unless a checkout asks earlier
_CHANNELS = ("email", "push", "sms")

#: The kinds of bad record ``bad_rate`` injects.
BAD_KINDS = (
    "malformed_json", "missing_field", "mistyped_field", "unknown_type",
    "oversized", "future_ts", "duplicate",
)  # fmt: skip
_BLOB = "x" * 100_000
_DAY_MS = 86400 * 1000
_FUTURE_MS = 10 * _DAY_MS

# Behaviour constants shared by the generator and the calibration in _plan().
_IN_GAP_S = 40.0  # mean gap between actions of a session (plus 2 s)
_IN_GAP_MS = _IN_GAP_S * 1000
_MIN_SESSION_GAP_S = 1200.0
_NIGHT_EXTRA_S = 5250.0  # average delay per long gap from moving starts out of the night
_NIGHT_BLOCKED = 8.5 / 15.5  # night + average morning delay over the active hours
_PROFILE_EVENTS = 2.2  # identify + mean consents at first appearance
_MIN_MEAN_GAP_S = 1800.0
_NATURAL_GAP_S = 86400.0  # mean gap when events is unbounded
_FILL = 0.7  # fraction of span the calibrated events cover (margin: the end of a small stream varies ~25 %)


def _draw_traits(rng: random.Random) -> tuple[float, float, tuple[int, ...], str, int]:
    """(intent, activity, preferred categories, platform, zone index) of one user."""
    rnd = rng.random
    intent = 1.0 - (1.0 - rnd()) ** (1.0 / 3.0)  # Beta(1, 3) by inverse CDF
    activity = min(4.0, max(0.1, (0.4 + 2.0 * intent) * rng.lognormvariate(0.0, 0.35)))
    c1 = int(rnd() * _N_CATS)
    c2 = (c1 + 1 + int(rnd() * (_N_CATS - 1))) % _N_CATS
    cats: tuple[int, ...] = (c1, c2)
    if rnd() < 0.5:
        c3 = int(rnd() * _N_CATS)
        if c3 != c1 and c3 != c2:
            cats = (c1, c2, c3)
    r = rnd()
    plat = _PLATFORMS[0 if r < _PLATFORM_CUM[0] else 1 if r < _PLATFORM_CUM[1] else 2]
    zone = bisect_right(_ZONE_CUM, rnd() * _ZONE_CUM[-1])
    return intent, activity, cats, plat, zone


def _mean_actions(intent: float) -> float:
    """E[1 + floor(Exp(mean m))], the expected actions of a session."""
    m = 1.5 + 14.0 * intent
    return 1.0 + 1.0 / math.expm1(1.0 / m)


def _plan(cfg: SimulatorConfig) -> tuple[float, float]:
    """(mean gap scale G in s, history length in s) so cfg.events fit before now."""
    return _plan_for(cfg.events, cfg.users, cfg.span_s)


@lru_cache(maxsize=64)
def _plan_for(events: int | None, users: int, span_s: int) -> tuple[float, float]:
    """The calibration behind `_plan`, cached: every partition asks the same question.

    A renewal estimate over quantiles of the trait distribution: a user with
    activity ``a`` has cycles of ``G/a + fixed`` seconds, each worth ``E_s``
    events. Depends only on cfg (not the partition or the seed), so every
    partition and `resolve_start_ms` agree.
    """
    if events is None:
        return _NATURAL_GAP_S, float(span_s)
    # Stratified quantiles of the trait distributions of _draw_traits (deterministic).
    sample = []
    for qi in range(40):
        intent = 1.0 - (1.0 - (qi + 0.5) / 40) ** (1.0 / 3.0)
        es = _mean_actions(intent) + 0.25
        fixed = _MIN_SESSION_GAP_S + es * (_IN_GAP_S + 2.0)
        for qa in range(10):
            z = _STD_NORMAL.inv_cdf((qa + 0.5) / 10)
            activity = min(4.0, max(0.1, (0.4 + 2.0 * intent) * math.exp(0.35 * z)))
            sample.append((activity, es, fixed))
    target = events / users

    def per_user(g: float, t: float) -> float:
        total = 0.0
        for a, es, fixed in sample:
            c0 = g / a + fixed
            # starts landing in local night wait for the morning: a long cycle
            # loses ~7/24 x 5 h, short back-to-back cycles lose the whole night
            cycles = t / (c0 + 1.0 / (1.0 / _NIGHT_EXTRA_S + 1.0 / (c0 * _NIGHT_BLOCKED)))
            total += es * cycles - _PROFILE_EVENTS * math.expm1(-cycles)  # P(appeared) = 1 - e^-cycles
        return total / len(sample)

    t = _FILL * span_s
    if per_user(_MIN_MEAN_GAP_S, t) < target:  # cannot fit: keep gaps, lengthen history
        lo, hi = t, t
        while per_user(_MIN_MEAN_GAP_S, hi) < target:
            hi *= 2
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if per_user(_MIN_MEAN_GAP_S, mid) < target else (lo, mid)
        return _MIN_MEAN_GAP_S, hi / _FILL
    lo, hi = _MIN_MEAN_GAP_S, 1e12
    for _ in range(80):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if per_user(mid, t) > target else (lo, mid)
    return lo, float(span_s)


def resolve_start_ms(cfg: SimulatorConfig) -> int:
    """``cfg.start_ms``, else now minus the history the events need (at least span_s), at UTC midnight.

    Behaviour depends on the time of day (local nights), so a start taken to
    the minute made a different stream every minute: one that ended hours
    before now, or after it. Starting at midnight makes the stream the same
    whenever it is made, but for whole days of shift, so a configuration that
    ends before now does so every time. Resolve once per run and pass the
    result to every partition, so all partitions share one clock origin.
    """
    if cfg.start_ms is not None:
        return cfg.start_ms
    start = time.time_ns() // 1_000_000 - int(_plan(cfg)[1] * 1000)
    return start - start % _DAY_MS


def _partition_share(cfg: SimulatorConfig, partition: int) -> int | None:
    """Records partition `partition` must produce (only partitions with users get any)."""
    if cfg.events is None:
        return None
    active = min(cfg.partitions, cfg.users)
    if partition >= active:
        return 0
    return cfg.events // active + (partition < cfg.events % active)


class _User:
    """Mutable per-user state; slotted because there is one per simulated user."""

    __slots__ = (
        "idx", "uid", "intent", "activity", "cats", "plat", "zone", "anon", "login", "known", "extra", "web_extra",
        "seen", "pending", "active", "sess", "n_sess", "splat", "left", "views",
        "cat_views", "cart", "orders", "last_end", "hours", "last_item", "add_next", "ordering",
    )  # fmt: skip

    def __init__(self, idx: int, traits: tuple[float, float, tuple[int, ...], str, int],
                 anon: tuple[str, str] | None = None, login: int = 0):
        self.idx = idx
        self.uid = f"u{idx:05d}"
        self.intent, self.activity, self.cats, self.plat, self.zone = traits
        #: (id field, id) when the shopper started anonymous (kept after the login: their guest sessions' name)
        self.anon = anon
        #: behaviour events until an anonymous shopper logs in, plus one (0: known, logged in, or never will)
        self.login = login
        self.known = anon is None
        #: id fields the next records carry besides user_id (instead of it until an anonymous shopper logs in)
        self.extra = None if anon is None else {anon[0]: anon[1]}
        #: the extra of a known shopper's web sessions: the cookie, once an anonymous shopper logged in
        self.web_extra: dict[str, str] | None = None
        self.seen = False
        self.pending: list[tuple[str, dict[str, Any]]] = []
        self.active = False
        self.sess: str | None = None
        self.n_sess = 0
        self.splat = self.plat
        self.left = 0
        self.views = 0
        self.cat_views: dict[int, int] = {}
        #: item_id -> [category index, item index, quantity]
        self.cart: dict[str, list[int]] = {}
        self.orders = 0
        self.last_end: int | None = None
        self.hours = 720.0
        self.last_item: tuple[int, int] | None = None
        self.add_next: tuple[int, int] | None = None
        self.ordering = False


class ShopperSimulator:
    """One partition's reproducible stream of wire records.

    All state (users, heap, RNGs) is plain picklable data, so a pickled
    simulator resumes exactly; the catalogue is rebuilt from the seed on
    unpickle to keep snapshots small.
    """

    def __init__(self, cfg: SimulatorConfig, partition: int = 0):
        if not 0 <= partition < cfg.partitions:
            raise ValueError(f"partition {partition} outside 0..{cfg.partitions - 1}")
        self.cfg = cfg
        self.partition = partition
        self.live = cfg.rate is not None
        self.bad_rate = cfg.bad_rate
        self._id_prefix = f"sim-{partition}-"
        self.index = 0  # records emitted so far (the position index)
        self.remaining = _partition_share(cfg, partition)
        self._gap_scale, history_s = _plan(cfg)
        self._start_ms = resolve_start_ms(cfg)
        #: where the planned history ends: at most a day before now for a start resolved from the clock (``future_ts`` goes past it)
        self._end_ms = self._start_ms + int(history_s * 1000)
        self._rng = random.Random(f"nudgeflow-sim:{cfg.seed}:{partition}")
        self._bad_rng = random.Random(f"nudgeflow-sim-bad:{cfg.seed}:{partition}")
        self._last_good: bytes | None = None
        self._last_wall = 0
        self._n_orders = 0
        rng = self._rng
        self._users = [self._new_user(i, rng) for i in range(partition, cfg.users, cfg.partitions)]
        if not self._users:  # more partitions than users: this one has nothing to say
            self.remaining = 0
        heap = []
        for k, u in enumerate(self._users):
            # roughly the stationary wait until a user's next session, so the
            # event rate is steady from the first record (what _plan assumes)
            wait_s = rng.random() * _MIN_SESSION_GAP_S - _log(1.0 - rng.random()) * self._gap_scale / u.activity
            heap.append((self._start_ms + int(wait_s * 1000), k))
        heapify(heap)
        self._heap = heap
        self._build_catalogue()

    # -- pickling: drop what the seed rebuilds

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_item_ids", "_prices", "_browse_props", "_fav_props"):
            del state[key]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._build_catalogue()

    def _new_user(self, idx: int, rng: random.Random) -> _User:
        """A user with drawn traits, anonymous with ``anonymous_share`` (no draw at all when that is 0)."""
        traits = _draw_traits(rng)
        share = self.cfg.anonymous_share
        if not share or rng.random() >= share:
            return _User(idx, traits)
        field, letter = _ANON_ID[traits[3]]
        login = 0
        if rng.random() < self.cfg.login_share:
            login = 2 + int(-_log(1.0 - rng.random()) * _MEAN_LOGIN_WAIT)
        return _User(idx, traits, (field, f"{letter}{idx:05d}"), login)

    def _build_catalogue(self) -> None:
        """12 categories x 50 items with fixed prices; identical for every partition."""
        rng = random.Random(f"nudgeflow-sim-catalogue:{self.cfg.seed}")
        self._item_ids = [[f"sku-{c:02d}-{j:03d}" for j in range(ITEMS_PER_CATEGORY)] for c in range(len(CATEGORIES))]
        self._prices = [
            [max(0.99, round(base * rng.lognormvariate(0.0, 0.45), 2)) for _ in range(ITEMS_PER_CATEGORY)]
            for base in _BASE_PRICE
        ]
        # Shared, never mutated props dicts: serialised immediately, so reuse is safe.
        self._browse_props = [
            [{"item_id": self._item_ids[c][j], "category": CATEGORIES[c], "price": self._prices[c][j]}
             for j in range(ITEMS_PER_CATEGORY)]
            for c in range(len(CATEGORIES))
        ]  # fmt: skip
        self._fav_props = [
            [{"item_id": self._item_ids[c][j], "category": CATEGORIES[c]} for j in range(ITEMS_PER_CATEGORY)]
            for c in range(len(CATEGORIES))
        ]

    # -- public

    def next_record(self) -> bytes | None:
        """The next wire record of this partition, or None once its share is done."""
        remaining = self.remaining
        if remaining is not None:
            if remaining <= 0:
                return None
            self.remaining = remaining - 1
        heap = self._heap
        ts, k = heap[0]
        u = self._users[k]
        etype, props, nxt = self._advance(u, ts)
        heapreplace(heap, (nxt, k))
        if self.live:
            now = time.time_ns() // 1_000_000
            ts = self._last_wall = now if now > self._last_wall else self._last_wall
        n = self.index
        self.index = n + 1
        rec = {
            "event_id": f"{self._id_prefix}{n}",
            "user_id": u.uid,
            "type": etype,
            "ts": ts,
            "session_id": u.sess,
            "platform": u.splat,
            "props": props,
        }
        extra = u.extra
        if extra is not None:  # an anonymous id: alone until the login, beside user_id after it
            if not u.known:
                del rec["user_id"]
            rec.update(extra)
        if self.bad_rate and self._bad_rng.random() < self.bad_rate:
            return self._bad(rec)
        raw = self._last_good = _dumps(rec)
        return raw

    def __iter__(self) -> Iterator[bytes]:
        next_record = self.next_record
        while (rec := next_record()) is not None:
            yield rec

    # -- behaviour

    def _advance(self, u: _User, t: int) -> tuple[str, dict[str, Any], int]:
        """One event of user `u` at time `t`: (type, props, the user's next event time).

        The hot path: product views are inlined, RNG calls are bound locally.
        """
        rnd = self._rng.random
        if not u.active:
            self._start_session(u, t)
        if u.pending:
            etype, props = u.pending.pop()
            return etype, props, t + 1000 + int(rnd() * 4000)
        login = u.login
        if login:  # an anonymous shopper who will log in: now, when it is time or a checkout asks for it
            if login == 1 or u.ordering:
                self._login(u)
                etype, props = u.pending.pop()
                return etype, props, t + 1000 + int(rnd() * 4000)
            u.login = login - 1
        if u.ordering:
            return "order", self._order(u), self._end_session(u, t)
        u.left -= 1
        add = u.add_next
        r = rnd()
        if add is not None:
            u.add_next = None
            etype, props = "add_to_cart", self._add_to_cart(u, add)
        elif r < 0.66 or u.views == 0:
            # product view: preferred category 70 %, popular items first
            cats = u.cats
            c = cats[int(rnd() * len(cats))] if rnd() < 0.7 else int(rnd() * _N_CATS)
            x = rnd()
            j = int(ITEMS_PER_CATEGORY * x * x)
            u.views += 1
            cv = u.cat_views
            kv = cv[c] = cv.get(c, 0) + 1
            u.last_item = (c, j)
            if rnd() < u.intent * (0.15 + 0.10 * (kv if kv < 4 else 4)) and len(u.cart) < 8:
                u.add_next = (c, j)
            etype, props = "browse", self._browse_props[c][j]
        elif r < 0.76:
            c = u.cats[int(rnd() * len(u.cats))]
            word = _QUERY_WORDS[int(rnd() * len(_QUERY_WORDS))]
            etype, props = "search", {"query": f"{CATEGORIES[c]} {word}", "results": int(rnd() * 120)}
        elif r < 0.88:
            etype, props = "click", {"target": _CLICK_TARGETS[int(rnd() * len(_CLICK_TARGETS))]}
        elif r < 0.94 and u.last_item is not None:
            c, j = u.last_item
            etype, props = "favourite", self._fav_props[c][j]
        elif u.cart and rnd() < 0.5:
            etype, props = "remove_from_cart", self._remove(u)
        else:  # a view that does not lead to a cart add (keeps this branch cheap)
            c, j = u.last_item or (u.cats[0], 0)
            u.views += 1
            etype, props = "browse", self._browse_props[c][j]
        if u.left > 0:
            return etype, props, t + 2000 - int(_log(1.0 - rnd()) * _IN_GAP_MS)
        if u.cart and rnd() < self._p_order(u):
            u.ordering = True
            return etype, props, t + 20_000 + int(rnd() * 100_000)
        return etype, props, self._end_session(u, t)

    def _start_session(self, u: _User, t: int) -> None:
        rng = self._rng
        u.active = True
        u.n_sess += 1
        if u.known:
            u.sess = f"{u.uid}-s{u.n_sess}"
            if rng.random() >= (_STAY if u.anon is None else _STAY_MULTI):
                u.splat = _PLATFORMS[int(rng.random() * 3)]
            else:
                u.splat = u.plat
            u.extra = u.web_extra if u.splat == "web" else None
        else:  # anonymous: one platform and one id until the login
            u.sess = f"{u.anon[1]}-s{u.n_sess}"  # type: ignore[index]
        u.left = 1 - int(_log(1.0 - rng.random()) * (1.5 + 14.0 * u.intent))
        u.views = 0
        u.cat_views = {}
        u.last_item = None
        u.add_next = None
        u.hours = 720.0 if u.last_end is None else (t - u.last_end) / 3_600_000
        if not u.seen:
            u.seen = True
            if u.known:
                u.pending = self._profile_events(u)

    def _login(self, u: _User) -> None:
        """An anonymous shopper logs in: identify (then consents) carrying ``user_id`` and the anonymous id, as
        the rest of this session does; later web sessions carry the web cookie too."""
        u.known = True  # extra still holds the anonymous id: user_id joins it
        u.login = 0
        u.web_extra = {"anonymous_id": f"c{u.idx:05d}"}
        u.pending = self._profile_events(u)

    def _end_session(self, u: _User, t: int) -> int:
        """Close the session at `t`; return the next session's start, out of local night."""
        rng = self._rng
        u.active = False
        u.last_end = t
        gap_s = _MIN_SESSION_GAP_S - _log(1.0 - rng.random()) * self._gap_scale / u.activity
        nxt = t + int(gap_s * 1000)
        local_s = (nxt // 1000 + int(_ZONES[u.zone][2] * 3600)) % 86400
        if local_s < 7 * 3600:
            nxt += int((7 * 3600 - local_s + rng.random() * 3 * 3600) * 1000)
        return nxt

    def _p_order(self, u: _User) -> float:
        """The documented purchase probability (see the module docstring)."""
        z = (
            -2.2
            + 0.18 * min(u.views, 20)
            + 0.60 * min(len(u.cart), 5)
            + 0.50 * min(u.orders, 4)
            - 0.35 * math.log1p(u.hours)
            + 2.0 * u.intent
        )
        return 1.0 / (1.0 + math.exp(-z))

    def _add_to_cart(self, u: _User, item: tuple[int, int]) -> dict[str, Any]:
        c, j = item
        r = self._rng.random()
        qty = 1 if r < 0.8 else 2 if r < 0.95 else 3
        item_id = self._item_ids[c][j]
        line = u.cart.get(item_id)
        if line is None:
            u.cart[item_id] = [c, j, qty]
        else:
            line[2] += qty
        return {"item_id": item_id, "category": CATEGORIES[c], "price": self._prices[c][j], "quantity": qty}

    def _remove(self, u: _User) -> dict[str, Any]:
        """Remove one whole cart line, so adds minus removes always equals the cart."""
        keys = list(u.cart)
        item_id = keys[int(self._rng.random() * len(keys))]
        c, j, qty = u.cart.pop(item_id)
        return {"item_id": item_id, "category": CATEGORIES[c], "price": self._prices[c][j], "quantity": qty}

    def _order(self, u: _User) -> dict[str, Any]:
        u.ordering = False
        items = []
        amount = 0.0
        for item_id, (c, j, qty) in u.cart.items():
            price = self._prices[c][j]
            amount += price * qty
            items.append({"item_id": item_id, "category": CATEGORIES[c], "price": price, "quantity": qty})
        u.cart = {}
        u.orders += 1
        self._n_orders += 1
        return {
            "order_id": f"o-{self.partition}-{self._n_orders}",
            "amount": round(amount, 2),
            "currency": "USD",
            "items": items,
        }

    def _profile_events(self, u: _User) -> list[tuple[str, dict[str, Any]]]:
        """identify plus optional consents, stored in reverse so pop() yields identify first."""
        rng = self._rng
        zone, locale, _, _ = _ZONES[u.zone]
        birthday = _dt.date(1955, 1, 1) + _dt.timedelta(days=int(rng.random() * 51 * 365))
        r = u.intent + rng.gauss(0.0, 0.15)
        tier = "gold" if r > 0.55 else "silver" if r > 0.3 else "basic"
        events: list[tuple[str, dict[str, Any]]] = [
            ("identify", {"timezone": zone, "locale": locale, "birthday": birthday.isoformat(), "tier": tier})
        ]
        if rng.random() < 0.6:
            for ch in rng.sample(_CHANNELS, 1 + int(rng.random() * 3)):
                events.append(("consent", {"channel": ch, "granted": rng.random() < 0.7}))
        events.reverse()
        return events

    # -- bad records

    def _bad(self, rec: dict[str, Any]) -> bytes:
        """Replace a good record by one of BAD_KINDS (the good event is lost)."""
        rng = self._bad_rng
        kind = BAD_KINDS[int(rng.random() * len(BAD_KINDS))]
        if kind == "duplicate" and self._last_good is None:
            kind = "malformed_json"
        if kind == "duplicate":
            assert self._last_good is not None
            return self._last_good
        if kind == "malformed_json":
            good = orjson.dumps(rec)
            return good[: max(1, len(good) // 2)]
        if kind == "missing_field":
            field = ("event_id", "user_id", "type", "ts")[int(rng.random() * 4)]
            if field == "user_id":  # no id at all: an anonymous id alone makes a good record
                for key in _ID_KEYS:
                    rec.pop(key, None)
            else:
                del rec[field]
        elif kind == "mistyped_field":
            if rng.random() < 0.5:
                rec["ts"] = "yesterday"
            else:
                key = next(k for k in _ID_KEYS if k in rec)
                rec[key] = int(rec[key][1:])
        elif kind == "unknown_type":
            rec["type"] = "teleport"
        elif kind == "oversized":
            rec["props"] = {**rec["props"], "blob": _BLOB}
        else:  # future_ts: past the end of the history, not only past the record's own time, which in a
            # month of history lay in the past, so a parser took it for a record ten days ahead of its neighbours
            rec["ts"] = max(rec["ts"], self._end_ms) + _FUTURE_MS
        return orjson.dumps(rec)


def iter_records(cfg: SimulatorConfig) -> Iterator[bytes]:
    """All partitions merged round-robin (for a file or a Kafka topic), paced to cfg.rate."""
    cfg = cfg.model_copy(update={"start_ms": resolve_start_ms(cfg)})
    sims = [ShopperSimulator(cfg, p) for p in range(cfg.partitions)]
    t0 = time.monotonic()
    sent = 0
    while sims:
        alive = []
        for sim in sims:
            rec = sim.next_record()
            if rec is None:
                continue
            alive.append(sim)
            if cfg.rate is not None:
                wait = t0 + sent / cfg.rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
            sent += 1
            yield rec
        sims = alive


class _SimPartition(StatefulSourcePartition[tuple[str, bytes], bytes]):
    """One simulator partition; pacing state is not snapshotted, the stream is."""

    def __init__(self, sim: ShopperSimulator, rate: float | None, batch_size: int):
        self.sim = sim
        self.prefix = f"sim:{sim.partition}:"
        self.rate = rate
        self.batch_size = batch_size
        self.t0 = time.time()
        self.sent = 0

    def next_batch(self) -> list[tuple[str, bytes]]:
        n = self.batch_size
        if self.rate is not None:
            due = int((time.time() - self.t0) * self.rate) + 1 - self.sent
            n = max(0, min(n, due))
        sim = self.sim
        prefix = self.prefix
        batch = []
        for _ in range(n):
            idx = sim.index
            rec = sim.next_record()
            if rec is None:
                break
            batch.append((f"{prefix}{idx}", rec))
        if not batch and n > 0:
            raise StopIteration
        self.sent += len(batch)
        return batch

    def next_awake(self) -> _dt.datetime | None:
        if self.rate is None:
            return None
        return _dt.datetime.fromtimestamp(self.t0 + self.sent / self.rate, tz=_dt.timezone.utc)

    def snapshot(self) -> bytes:
        return pickle.dumps(self.sim, protocol=pickle.HIGHEST_PROTOCOL)


class SimulatorSource(FixedPartitionedSource[tuple[str, bytes], bytes]):
    """Bytewax source: one partition per cfg.partitions; emits (position, raw_bytes) tuples where position = f"sim:{partition}:{index}" (index counts records of that partition from 0).

    The snapshot is the pickled simulator, so recovery resumes at the exact
    record; ``rate`` is split evenly over the partitions that have users.
    """

    def __init__(self, cfg: SimulatorConfig, batch_size: int = 500):
        self.cfg = cfg.model_copy(update={"start_ms": resolve_start_ms(cfg)})
        self.batch_size = batch_size

    def list_parts(self) -> list[str]:
        return [str(p) for p in range(self.cfg.partitions)]

    def build_part(self, step_id: str, for_part: str, resume_state: bytes | None) -> _SimPartition:
        sim = pickle.loads(resume_state) if resume_state is not None else ShopperSimulator(self.cfg, int(for_part))
        rate = self.cfg.rate
        if rate is not None:
            rate /= min(self.cfg.partitions, self.cfg.users)
        return _SimPartition(sim, rate, self.batch_size)
