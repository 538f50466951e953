"""Guards a fired trigger must pass before it becomes an action: the parts decided in keyed state.

A trigger firing is a *candidate*. Guards that depend only on the user's own
history are decided here, in the trigger step's keyed state, where every event
of the user is seen in order (so an opt-out is never overtaken by a message):

- the **global control group** and per-trigger **holdout**, by a stable hash of
  the user (and trigger): held-out users are logged as "would have fired";
- **consent** per channel, from ``consent`` events (``opt_in`` triggers, and every
  trigger on an ``opt_in`` channel, need a grant; ``opt_out`` ones only the absence
  of a refusal). The statement made last in event time wins, at equal times a
  refusal: the rule of the Redis consent store (:mod:`connectors.consent_store`),
  which the guards step checks again, so that both agree whatever order the
  statements arrive in;
- **quiet hours** in the user's time zone (from ``identify``): dropped, or
  held until the window opens (in event time).

The rest (cooldown, frequency caps with priority, daily budget, channel rate
limit, idempotency) are shared counters, applied atomically in Redis by
:mod:`connectors.guard_store`.

>>> round(bucket("u1", "cart"), 2) == round(bucket("u1", "cart"), 2)
True
>>> quiet_until(1_700_000_000_000, "Europe/Berlin", QuietHours(start="21:00", end="08:00"))  # 23:13 in Berlin
1700031600000
"""

from __future__ import annotations

import hashlib
from datetime import datetime, time, timedelta, timezone
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo

from nudgeflow.events import Action, Decision
from nudgeflow.settings import Guards, QuietHours, TriggerDef, TriggersFile, Variant


def bucket(*parts: str) -> float:
    """A stable number in [0, 100) from the parts: the same user always lands in the same group."""
    h = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") % 1_000_000 / 10_000


def variant_of(user_id: str, trigger: TriggerDef) -> Variant | None:
    """The A/B variant of a user, by weight, stable for the (user, trigger) pair."""
    if not trigger.variants:
        return None
    total = sum(v.weight for v in trigger.variants)
    point = bucket(user_id, trigger.id, "variant") / 100 * total
    for v in trigger.variants:
        point -= v.weight
        if point < 0:
            return v
    return trigger.variants[-1]


@lru_cache(maxsize=512)
def zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def quiet_until(ts_ms: int, tz: str, qh: QuietHours) -> int | None:
    """If ``ts_ms`` falls in the quiet window in zone ``tz``, the UTC ms it ends; else None."""
    local = datetime.fromtimestamp(ts_ms / 1000, tz=zone(tz))
    start = time.fromisoformat(qh.start)
    end = time.fromisoformat(qh.end)
    now = local.time()
    inside = (start <= now or now < end) if start > end else (start <= now < end)
    if not inside:
        return None
    day = local.date() if now < end else local.date() + timedelta(days=1)
    opens = datetime.combine(day, end, tzinfo=local.tzinfo)
    return int(opens.astimezone(timezone.utc).timestamp() * 1000)


def effective(trigger: TriggerDef, defaults: Guards) -> Guards:
    """A trigger's guards with the file's defaults filled in."""
    g = trigger.guards
    own = {k: getattr(g, k) for k in g.model_fields_set if getattr(g, k) is not None}  # models stay models
    return defaults.model_copy(update=own)


class Profile:
    """What a user told us about themselves: consent per channel (``consent`` events) and attributes
    (``identify``: time zone, locale, birthday, tier …), which conditions read as ``user``.

    >>> p = Profile()
    >>> p.state("email", True, 20), p.state("email", False, 10), p.state("email", False, 20), p.consent
    (True, False, True, {'email': False})
    """

    __slots__ = ("consent", "attrs", "said")

    def __init__(self) -> None:
        self.consent: dict[str, bool] = {}
        self.attrs: dict[str, Any] = {}
        #: the event time of each channel's statement
        self.said: dict[str, int] = {}

    def state(self, channel: str, granted: bool, ts: int) -> bool:
        """Take a consent statement made at ``ts`` unless a newer one is known (at equal times a refusal
        stays); whether it was taken."""
        before = self.said.get(channel)
        if before is not None and (ts < before or (ts == before and (granted or not self.consent[channel]))):
            return False
        self.consent[channel] = granted
        self.said[channel] = ts
        return True

    def take_consent(self, other: Profile) -> None:
        """Fold another profile's statements in (an identity merge), channel by channel by the same rule."""
        for channel, granted in other.consent.items():
            self.state(channel, granted, other.said.get(channel, _LONG_AGO))

    @property
    def tz(self) -> str | None:
        tz = self.attrs.get("timezone")
        return tz if isinstance(tz, str) else None

    def __getstate__(self) -> tuple[dict[str, bool], dict[str, Any], dict[str, int]]:
        return (self.consent, self.attrs, self.said)

    def __setstate__(self, s: tuple[Any, ...]) -> None:
        # a snapshot from before statements had times: what it knew counts as said long ago
        self.consent, self.attrs = s[0], s[1]
        self.said = s[2] if len(s) > 2 else dict.fromkeys(self.consent, _LONG_AGO)


_LONG_AGO = -(1 << 62)


class StateGuards:
    """The in-state guards of every trigger of a file."""

    def __init__(self, tf: TriggersFile, default_tz: str = "UTC"):
        self.control = tf.control_group
        self.defaults = tf.defaults
        self.guards = {t.id: effective(t, tf.defaults) for t in tf.triggers}
        #: channels every trigger needs a grant for
        self.opt_in = {name for name, c in tf.channels.items() if c.consent == "opt_in"}
        self.default_tz = default_tz

    def check(self, a: Action, profile: Profile | None, at: int) -> tuple[Decision | None, int | None]:
        """(a final decision, or None to go on), and the event time to hold it until, if held.

        ``at`` is the event time of the check: the firing, or the end of a hold.
        """
        g = self.guards.get(a.trigger_id, self.defaults)  # a trigger a reload removed: the file's defaults
        if self.control and bucket(a.user_id, "control") < self.control:
            return Decision(a, "holdout", "control_group"), None
        if g.holdout and bucket(a.user_id, a.trigger_id) < g.holdout:
            return Decision(a, "holdout", "holdout"), None
        granted = profile.consent.get(a.channel) if profile else None
        if granted is False or ((g.consent == "opt_in" or a.channel in self.opt_in) and granted is not True):
            return Decision(a, "suppressed", "no_consent"), None
        if g.quiet_hours is not None:
            tz = (profile.tz if profile else None) or self.default_tz
            until = quiet_until(at, tz, g.quiet_hours)
            if until is not None:
                if g.quiet_hours.mode == "drop":
                    return Decision(a, "suppressed", "quiet_hours"), None
                return Decision(a, "held", "quiet_hours"), until
        return None, None
