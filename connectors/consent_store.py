"""Consent per shopper and channel in Redis, where the flow and the shop's other systems both read and write it.

Layout: one hash per shopper, ``<prefix>:consent:{<user>}`` (``{user}`` is the Redis Cluster hash tag the
shopper's guard counters carry too, so the guard script reads it in the same slot), one field per channel,
the value ``granted:<ms>`` or ``denied:<ms>``: the statement and the event time it was made at (epoch
milliseconds). No TTL: a refusal must not expire.

Precedence: the statement made last in event time wins; at equal times a refusal wins. The flow writes
every ``consent`` event (``connectors.guard_store`` does, in stream order), a preference centre or a CRM
writes with :meth:`ConsentStore.set` (or the :data:`SET_CONSENT` script), so a replay, a late event and
an older statement from elsewhere never overwrite a newer one. An identity merge folds the merged-away
shopper's statements into the canonical shopper's by the same rule, channel by channel.

>>> stated(False, 1_700_000_000_000), statement("denied:1700000000000")
('denied:1700000000000', (False, 1700000000000))
"""

from __future__ import annotations

from connectors.identity_store import canon_key
from connectors.redis_client import redis_client


def consent_key(prefix: str, user: str) -> str:
    """The hash of a shopper's consent statements.

    >>> consent_key("nf", "u42")
    'nf:consent:{u42}'
    """
    return f"{prefix}:consent:{{{user}}}"


def stated(granted: bool, ts: int) -> str:
    """A statement as stored: ``granted:<ms>`` or ``denied:<ms>``."""
    return f"{'granted' if granted else 'denied'}:{ts}"


def statement(value: str | bytes) -> tuple[bool, int]:
    """(granted, event time) of a stored value; a value without a time (written by hand) counts at time 0."""
    word, _, ms = (value.decode() if isinstance(value, bytes) else value).partition(":")
    return word != "denied", int(ms or 0)


#: Lua: ``said(v)`` (refused?, event time) and ``refused(v)`` of a stored value, for the scripts that read it
SAID_LUA = """
local function said(v)
  local word, ms = string.match(v, '^(%a+):?(-?%d*)$')
  return (word or v) == 'denied', tonumber(ms) or 0
end
local function refused(v) local no = said(v); return no end
"""

#: Lua: the precedence rule, ``newer(v, cur)``, and ``fold_consent``, for the scripts that write consent
CONSENT_LUA = SAID_LUA + """
local function newer(v, cur)
  if not cur then return true end
  local vno, vt = said(v)
  local cno, ct = said(cur)
  return vt > ct or (vt == ct and vno and not cno)
end
local function fold_consent(key, fields)
  for i = 1, #fields, 2 do
    if newer(fields[i + 1], redis.call('HGET', key, fields[i])) then
      redis.call('HSET', key, fields[i], fields[i + 1])
    end
  end
end
"""

#: KEYS: the shopper's consent hash; ARGV: channel, statement. Returns 1 when written, 0 when a newer one stays.
SET_CONSENT = CONSENT_LUA + """
if newer(ARGV[2], redis.call('HGET', KEYS[1], ARGV[1])) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
return 0
"""


class ConsentStore:
    """What a preference centre or a CRM imports: read and set consent by any id the shopper is known by
    (resolved through the identity graph, ``<prefix>:id:canon``, as :class:`FeatureReader` does).

    A refusal set here is honoured by the next decision the flow takes for the shopper. A grant set here
    is recorded, but a flow that saw the shopper refuse keeps refusing until a ``consent`` event grants it
    (its keyed state sees only events): grants come in as events, with their record in ClickHouse.
    """

    def __init__(self, url: str, key_prefix: str = "nf"):
        self.client = redis_client(url, decode_responses=True)
        self.prefix = key_prefix
        self.script = self.client.register_script(SET_CONSENT)

    def _canonical(self, user: str) -> str:
        return self.client.hget(canon_key(self.prefix), user) or user

    def set(self, user: str, channel: str, granted: bool, ts: int) -> bool:
        """Record a statement made at event time ``ts`` (ms); False when a newer one is there already."""
        key = consent_key(self.prefix, self._canonical(user))
        return bool(self.script(keys=[key], args=[channel.lower(), stated(granted, ts)]))

    def get(self, user: str) -> dict[str, tuple[bool, int]]:
        """Channel -> (granted, event time) of the shopper's newest statements."""
        h = self.client.hgetall(consent_key(self.prefix, self._canonical(user)))
        return {channel: statement(v) for channel, v in h.items()}
