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
