"""The event model every step after parsing sees: one shape, already normalised.

Events travel as ``msgspec.Struct`` objects rather than dicts, dataclasses or
pydantic models because they are built once per input record on the hot path:
a Struct is built in C (about four times faster than a dataclass) and, holding no
cycles, is left out of the garbage collector's scans. Validation lives in
:mod:`operators.parse`, which is the only place that constructs them from the
wire.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

#: Shopper behaviour the engine understands natively.
BEHAVIOUR_TYPES = frozenset(
    {"click", "browse", "search", "add_to_cart", "remove_from_cart", "favourite", "order"}
)
#: Profile events: they change what we may do (consent) or know (identify).
PROFILE_TYPES = frozenset({"consent", "identify", "alias"})
#: Feedback from action channels, closing the loop for analytics.
FEEDBACK_TYPES = frozenset({"delivered", "opened", "clicked", "unsubscribed"})
BUILTIN_TYPES = BEHAVIOUR_TYPES | PROFILE_TYPES | FEEDBACK_TYPES
#: A look at a shopper gone quiet (``idle`` in ``features.yaml``): made by the feature step from its state, never
#: read from the wire. Models and triggers may score and fire on it; it is no activity and no event of the shop.
IDLE = "idle"
#: What a model's ``any`` label event and the feature counts never take for shopping activity
NOT_ACTIVITY = FEEDBACK_TYPES | {IDLE}

PLATFORM_ALIASES = {
    "web": "web",
    "desktop": "web",
    "mweb": "web",
    "app": "app",
    "ios": "app",
    "android": "app",
    "mini_program": "mini_program",
    "miniprogram": "mini_program",
    "mini-program": "mini_program",
    "wechat": "mini_program",
}


class Event(msgspec.Struct, gc=False):
    """One normalised shopper event.

    ``ts`` is event time and ``ingest_ms`` arrival time, both epoch
    milliseconds UTC; ``position`` names where the record came from
    (``topic:partition:offset``, ``file:line`` or ``sim:partition:index``) so
    any row downstream can be traced to its input.

    >>> e = Event("e1", "u1", "browse", 1_700_000_000_000)
    >>> (e.user_id, e.type, e.props)
    ('u1', 'browse', {})
    """

    event_id: str
    user_id: str
    type: str
    ts: int
    session_id: str | None = None
    platform: str | None = None
    props: dict[str, Any] = {}  # msgspec gives every event its own empty dict
    ingest_ms: int = 0
    position: str = ""
    #: the record as received (a reference, not a copy): later refusals keep the original bytes
    raw: bytes = b""
    #: other ids the record carried, namespaced (``anon:…``, ``device:…``, ``account:…``, or a known user id
    #: from ``previous_id``): the identity step links them to ``user_id``
    aliases: tuple[str, ...] = ()
    #: the id the record carried when the identity step resolved it to another canonical ``user_id``
    #: ("" when it carried the canonical id): ClickHouse keeps both
    origin_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The canonical JSON shape (what replays and sinks write)."""
        return {
            "event_id": self.event_id,
            "user_id": self.user_id,
            "type": self.type,
            "ts": self.ts,
            "session_id": self.session_id,
            "platform": self.platform,
            "props": self.props,
        }


class Merge(msgspec.Struct, gc=False, frozen=True):
    """Move everything a per-user step keeps about ``src`` to ``dst``: an identity link merged two shoppers.

    The identity step emits one per step side: ``local`` when both users live in the same shard,
    otherwise ``release`` (to ``src``'s shard: hand its part over) and ``absorb`` (to ``dst``'s shard:
    take it over). ``seq`` numbers merges in the identity graph's history; handovers are keyed by it,
    so a replayed merge is recognised.

    >>> Merge("anon:c1", "u1", 7, 1_700_000_000_000, "local").dst
    'u1'
    """

    src: str
    dst: str
    seq: int
    ts: int
    side: str


class Consent(msgspec.Struct, gc=False, frozen=True):
    """A shopper's consent statement for a channel, made at event time ``ts``: the trigger step passes it on
    where it stands in the user's stream, and the guards step writes it to the Redis consent store
    (``connectors.consent_store``) before deciding the candidates that follow it.

    >>> Consent("u1", "email", False, 1_700_000_000_000).granted
    False
    """

    user_id: str
    channel: str
    granted: bool
    ts: int


#: event fields that carry a not-yet-known shopper's id, and the prefix that namespaces each in ``user_id``
#: (a cookie can never collide with a customer id)
ID_FIELDS = {"anonymous_id": "anon:", "device_id": "device:", "account_id": "account:"}


@dataclass(slots=True)
class Link:
    """One identity link as the identity step judged it: a row of ``identity_links`` and an update of the
    Redis id graph.

    ``outcome``: ``merged`` (two shoppers became one: ``canonical`` is who they are now, ``seq`` the
    merge's number, ``moved`` the ids now resolving to ``canonical``), ``repeat`` (already linked) or
    ``rejected`` (``reason``: self_alias, cycle, conflict, alias_storm, cluster_too_big).
    """

    ts: int
    src: str
    dst: str
    #: identify | alias | implicit (an ordinary event carrying both a user id and another id)
    kind: str
    outcome: str
    reason: str = ""
    canonical: str = ""
    seq: int = 0
    moved: tuple[str, ...] = ()
    platform: str = ""
    event_id: str = ""
    position: str = ""


@dataclass(slots=True)
class DeadLetter:
    """Input the engine refused, kept whole so it can be inspected and replayed.

    ``raw`` is the original bytes exactly as received; ``reason`` is a short
    stable code (``malformed_json``, ``missing_field`` …) for counting, and
    ``detail`` the human explanation.
    """

    reason: str
    detail: str
    raw: bytes
    position: str
    ingest_ms: int


@dataclass(slots=True)
class Action:
    """A decision to message a shopper, with everything needed to deliver and audit it.

    ``action_id`` is the idempotency key: the same trigger, user and occurrence
    always give the same id, so a replay can be recognised downstream.
    """

    action_id: str
    trigger_id: str
    user_id: str
    channel: str
    #: the event that opened this occurrence of the trigger
    occurrence: str
    event_ts: int
    ingest_ms: int
    decided_ms: int
    features: dict[str, Any]
    payload: dict[str, Any]
    variant: str = ""
    scores: dict[str, float] = field(default_factory=dict)
    #: the trigger's priority: who wins the last message a frequency cap allows
    priority: int = 0
    #: the id the triggering event carried when it was not the canonical ``user_id`` (see ``Event.origin_id``)
    origin_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "action_id": self.action_id,
            "trigger_id": self.trigger_id,
            "user_id": self.user_id,
            "channel": self.channel,
            "occurrence": self.occurrence,
            "event_ts": self.event_ts,
            "ingest_ms": self.ingest_ms,
            "decided_ms": self.decided_ms,
            "variant": self.variant,
            "features": self.features,
            "scores": self.scores,
            "payload": self.payload,
        }


@dataclass(slots=True)
class Decision:
    """What became of a candidate action: ``fired``, ``suppressed`` (with the guard that stopped it),
    ``holdout`` (would have fired: for uplift) or ``held`` (quiet hours; decided again when they end)."""

    action: Action
    outcome: str
    reason: str
