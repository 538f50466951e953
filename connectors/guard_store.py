"""The shared guards, applied atomically in Redis: idempotency, cooldown, frequency caps, budget, rate limit.

Every candidate action runs one Lua script that checks all of its guards and
commits its counters only if it passes, so two workers can never both take
the last message a cap allows. A batch's candidates are sent in one pipeline,
ordered so that for each user the highest-priority trigger goes first: the
priority decides who gets the last message.

Counters are keyed by event time (UTC day, ISO week), so a replay or a
backtest counts like the live run did. The idempotency key (trigger, user,
occurrence) is set when an action fires, so a replay after a restart is
suppressed as ``duplicate`` and never delivered twice (at-most-once: a crash
between this script and the sink loses that action rather than sending it
twice).

When an identity link merges two shoppers, :meth:`RedisGuards.merge` moves the
merged-away id's counters into the canonical user's (one script for a batch of
links, each applied once per merge ``seq``), so what was sent to an anonymous
cookie counts against the shopper's caps.

Key layout (``{user}`` is a Redis Cluster hash tag): ``<p>:idem:<action>``,
``<p>:{<user>}:cd:<trigger>``, ``<p>:{<user>}:cap:d:<day>``,
``<p>:{<user>}:cap:w:<week>``, ``<p>:budget:<trigger>:<day>``, ``<p>:rl:<channel>``,
``<p>:merged:<seq>`` (a merge applied).
"""

from __future__ import annotations

import logging
import time

import redis

from connectors.redis_retry import until_redis_answers
from nudgeflow.events import Action, Decision, Merge
from nudgeflow.settings import Reloadable, TriggersFile
from operators.guards import effective

log = logging.getLogger(__name__)

DAY_MS = 86_400_000

# KEYS: idem, cooldown, cap_day, cap_week, budget, bucket
# ARGV: idem_ttl_s, cooldown_ms, per_day, per_week, budget, rate, burst, now_ms, event_ts
GUARD_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 'duplicate' end
local cooldown = tonumber(ARGV[2])
local event_ts = tonumber(ARGV[9])
if cooldown > 0 then
  local last = redis.call('GET', KEYS[2])
  if last and math.abs(event_ts - tonumber(last)) < cooldown then return 'cooldown' end
end
local per_day, per_week, budget = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if per_day >= 0 and tonumber(redis.call('GET', KEYS[3]) or '0') >= per_day then return 'frequency_cap' end
if per_week >= 0 and tonumber(redis.call('GET', KEYS[4]) or '0') >= per_week then return 'frequency_cap' end
if budget >= 0 and tonumber(redis.call('GET', KEYS[5]) or '0') >= budget then return 'budget' end
local rate = tonumber(ARGV[6])
if rate > 0 then
  local burst, now = tonumber(ARGV[7]), tonumber(ARGV[8])
  local b = redis.call('HMGET', KEYS[6], 'tokens', 'ts')
  local tokens = tonumber(b[1]) or burst
  local ts = tonumber(b[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - ts) / 1000 * rate)
  if tokens < 1 then
    redis.call('HSET', KEYS[6], 'tokens', tokens, 'ts', now)
    return 'rate_limited'
  end
  redis.call('HSET', KEYS[6], 'tokens', tokens - 1, 'ts', now)
end
redis.call('SET', KEYS[1], 1, 'EX', ARGV[1])
if cooldown > 0 then redis.call('SET', KEYS[2], event_ts, 'PX', cooldown) end
if per_day >= 0 then redis.call('INCR', KEYS[3]); redis.call('EXPIRE', KEYS[3], 2 * 86400) end
if per_week >= 0 then redis.call('INCR', KEYS[4]); redis.call('EXPIRE', KEYS[4], 8 * 86400) end
if budget >= 0 then redis.call('INCR', KEYS[5]); redis.call('EXPIRE', KEYS[5], 2 * 86400) end
return 'fired'
"""


# KEYS: per link, its marker, then (src, dst) key pairs: counters first, then last-sent times
# ARGV: marker_ttl_s, then per link: counter pairs, last-sent pairs
MERGE_SCRIPT = """
local k, merged = 1, 0
for a = 2, #ARGV, 2 do
  local adds, maxes = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  if redis.call('SET', KEYS[k], 1, 'NX', 'EX', ARGV[1]) then
    merged = merged + 1
    for i = 0, adds + maxes - 1 do
      local src, dst = KEYS[k + 1 + 2 * i], KEYS[k + 2 + 2 * i]
      local v = redis.call('GET', src)
      if v then
        local life = math.max(redis.call('PTTL', src), redis.call('PTTL', dst))
        if i < adds then
          redis.call('INCRBY', dst, v)
        else
          local cur = redis.call('GET', dst)
          if not cur or tonumber(v) > tonumber(cur) then redis.call('SET', dst, v) end
        end
        if life > 0 then redis.call('PEXPIRE', dst, life) end
        redis.call('DEL', src)
      end
    end
  end
  k = k + 1 + 2 * (adds + maxes)
end
return merged
"""


def cap_keys(day: int) -> tuple[str, str]:
    """The per-user cap counters an action on UTC ``day`` (days since the epoch) counts in: day and ISO week.

    >>> cap_keys(19_000)
    ('cap:d:19000', 'cap:w:2714')
    """
    return f"cap:d:{day}", f"cap:w:{(day + 3) // 7}"


class RedisGuards:
    """Decides candidate actions against the shared guards of a trigger file."""

    def __init__(self, triggers: TriggersFile | Reloadable, url: str, prefix: str):
        self.client = redis.Redis.from_url(url)
        self.script = self.client.register_script(GUARD_SCRIPT)
        self.merge_script = self.client.register_script(MERGE_SCRIPT)
        self.prefix = prefix
        #: a reloadable trigger file is followed: its new versions bring new guards
        self.source = None if isinstance(triggers, TriggersFile) else triggers
        self.version = 0
        #: failed round trips to Redis (each retried until Redis answers)
        self.failures = 0
        self._use(triggers if isinstance(triggers, TriggersFile) else triggers.current)

    def _use(self, tf: TriggersFile) -> None:
        self.tf = tf
        self.guards = {t.id: effective(t, tf.defaults) for t in tf.triggers}

    def _follow(self) -> None:
        """Take up a new version of a reloadable trigger file: its guards and its triggers' cooldowns."""
        if self.source is not None and self.source.version != self.version:
            self.version = self.source.version
            self._use(self.source.current)

    def _failed(self) -> None:
        self.failures += 1

    def _user_key(self, user: str, what: str) -> str:
        return f"{self.prefix}:{{{user}}}:{what}"

    def _call(self, pipe: redis.client.Pipeline, a: Action, now: int) -> None:
        # a trigger removed by a reload while its action was held gets the file's defaults
        g, p, cap = self.guards.get(a.trigger_id, self.tf.defaults), self.prefix, self.tf.frequency_cap
        day = a.event_ts // DAY_MS
        limit = self.tf.channels.get(a.channel)
        cap_day, cap_week = cap_keys(day)
        keys = [
            f"{p}:idem:{a.action_id}",
            self._user_key(a.user_id, f"cd:{a.trigger_id}"),
            self._user_key(a.user_id, cap_day),
            self._user_key(a.user_id, cap_week),
            f"{p}:budget:{a.trigger_id}:{day}",
            f"{p}:rl:{a.channel}",
        ]
        args = [
            int(self.tf.idempotency_ttl), int((g.cooldown or 0) * 1000),
            -1 if cap.per_day is None else cap.per_day, -1 if cap.per_week is None else cap.per_week,
            -1 if g.daily_budget is None else g.daily_budget,
            limit.rate if limit else 0, limit.burst if limit else 0, now, a.event_ts,
        ]
        self.script(keys=keys, args=args, client=pipe)

    def decide_batch(self, items: list[Action | Decision | Merge]) -> list[Decision]:
        """Every candidate becomes a decision; decisions taken upstream pass through (Bytewax ``flat_map_batch``).

        A merge (identity) moves the merged-away shopper's counters where it stands in the stream: after
        the candidates its shard decided for that shopper, before anything later.
        """
        if not any(type(x) is Merge for x in items):
            return self._decide(items)
        out: list[Decision] = []
        upto = 0
        for i, x in enumerate(items):
            if type(x) is Merge:
                out += self._decide(items[upto:i])  # type: ignore[arg-type]
                self.merge([x])
                upto = i + 1
        return out + self._decide(items[upto:])  # type: ignore[arg-type]

    def _decide(self, items: list[Action | Decision]) -> list[Decision]:
        self._follow()
        out = [x for x in items if type(x) is Decision]
        candidates = sorted((x for x in items if type(x) is Action), key=lambda a: (a.user_id, -a.priority, a.event_ts))
        if not candidates:
            return out

        def check() -> list[bytes | str]:
            pipe = self.client.pipeline(transaction=False)
            now = int(time.time() * 1000)
            for a in candidates:
                self._call(pipe, a, now)
            return pipe.execute()

        # never skip a guard: hold the flow until Redis answers
        verdicts = until_redis_answers(f"guard check of {len(candidates)} candidates", check, self._failed)
        for a, v in zip(candidates, verdicts):
            v = v.decode() if isinstance(v, bytes) else v
            out.append(Decision(a, "fired", "") if v == "fired" else Decision(a, "suppressed", v))
        return out

    def merge(self, merges: list[Merge]) -> None:
        """Move the guard counters of the shopper each identity merge merged away (``src``, the id its actions
        were counted under) into the canonical user (``dst``): cap counters add up, cooldowns keep the later
        last-sent time, each key the longer remaining life; the merged-away keys are deleted. One atomic
        script for the batch (one round trip). Each merge ``seq`` is applied once, even when a replay after a
        crash sends the same merge again: a
        marker per ``seq`` (kept for ``idempotency_ttl``) makes the replay a no-op, so it does not move
        what the id was counted for since (a held message delivered to it after the merge). On a single
        Redis only: the script spans both users' hash slots.

        Which keys: the cooldown of every trigger of the file, and the cap counters of the merge's UTC day,
        the day before and the day after, with their ISO weeks. Those are all a later check can read: a
        cap counts per day (week) of event time, and the canonical user's later actions fall on or after
        the merge's day (or up to a day before it, for late events). Older counters are left to expire.
        """
        self._follow()
        keys: list[str] = []
        args: list[int] = [int(self.tf.idempotency_ttl)]
        cooldowns = [f"cd:{tid}" for tid in self.guards]
        for m in merges:
            if m.src == m.dst:
                continue
            day = m.ts // DAY_MS
            counters = sorted({k for d in (day - 1, day, day + 1) for k in cap_keys(d)})
            keys.append(f"{self.prefix}:merged:{m.seq}")
            for what in counters + cooldowns:
                keys += [self._user_key(m.src, what), self._user_key(m.dst, what)]
            args += [len(counters), len(cooldowns)]
        if len(args) == 1:
            return
        # a retry after a lost answer is safe: the markers make a merge that did apply a no-op
        until_redis_answers(
            f"guard merge of {len(args) // 2} shoppers", lambda: self.merge_script(keys=keys, args=args), self._failed
        )
