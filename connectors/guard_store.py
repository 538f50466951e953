"""The shared guards, applied atomically in Redis: idempotency, consent, cooldown, frequency caps, budget, rate limit.

Every candidate action runs one Lua script that checks all of its guards and
commits its counters only if it passes, so two workers can never both take
the last message a cap allows. A batch's candidates are sent in one pipeline,
ordered so that for each user the highest-priority trigger goes first: the
priority decides who gets the last message.

Consent statements (``consent`` events, passed on by the trigger step where
they stand in the user's stream) are written to the consent store
(:mod:`connectors.consent_store`) in the same pipeline, between the user's
candidates that came before and after them, and the guard script refuses a
candidate whose channel the store says was refused (``no_consent``): a refusal
written into Redis by another system counts too.

Counters are keyed by event time (UTC day, ISO week), so a replay or a
backtest counts like the live run did. The idempotency key (trigger, user,
occurrence) is set when an action fires, so a replay after a restart is
suppressed as ``duplicate`` and never delivered twice (at-most-once: a crash
between this script and the sink loses that action rather than sending it
twice).

When an identity link merges two shoppers, :meth:`RedisGuards.merge` moves the
merged-away id's counters and consent into the canonical user's (each merge
``seq`` applied once), so what was sent to an anonymous cookie counts against
the shopper's caps, and a refusal the cookie made stays unless the shopper said
otherwise later.

Key layout (``{user}`` is a Redis Cluster hash tag): ``<p>:idem:<action>``,
``<p>:consent:{<user>}``, ``<p>:{<user>}:cd:<trigger>``, ``<p>:{<user>}:cap:d:<day>``,
``<p>:{<user>}:cap:w:<week>``, ``<p>:budget:<trigger>:<day>``, ``<p>:rl:<channel>``,
``<p>:merged:<seq>`` (a merge applied).

Under a Redis Cluster (:mod:`connectors.redis_client`) a script may touch one
slot only, so the guards run in two scripts: the user's (idempotency, now
``<p>:{<user>}:idem:<action>``, consent, cooldown, caps) and, when the trigger
has a budget or its channel a rate limit, the shared one (``<p>:{guards}:budget:…``,
``<p>:{guards}:rl:…``, one slot). The user's script reserves its counters, the
shared one decides, and a refusal there gives the reservation back; a user has
one candidate in flight at a time, so the user's decisions come out as on a
single server. A merge takes the merged-away user's keys out in one script
(kept under ``<p>:{<src>}:moved:<seq>`` so a replay takes the same) and adds
them to the canonical user in another (marker ``<p>:{<dst>}:merged:<seq>``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson

from connectors.consent_store import CONSENT_LUA, SAID_LUA, SET_CONSENT, consent_key, stated
from connectors.redis_client import Call, Scripts, is_cluster, redis_client
from connectors.redis_retry import until_redis_answers
from nudgeflow.events import Action, Consent, Decision, Merge
from nudgeflow.settings import Reloadable, TriggersFile
from operators.guards import effective

log = logging.getLogger(__name__)

DAY_MS = 86_400_000

# The pieces the guard scripts are made of. Every script gets the same ARGV:
# idem_ttl_s, cooldown_ms, per_day, per_week, budget, rate, burst, now_ms, event_ts, channel
# (the user's script under a cluster also: reserve; its undo: the cooldown's last value and life)
_ARGS = """
local idem_ttl, cooldown, per_day, per_week = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local budget, rate, burst = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local now, event_ts = tonumber(ARGV[8]), tonumber(ARGV[9])
local channel = ARGV[10]
"""
_USER_KEYS = """
local k_idem, k_consent, k_cd, k_capd, k_capw = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
"""
_USER_CHECKS = """
if redis.call('EXISTS', k_idem) == 1 then return 'duplicate' end
local said = redis.call('HGET', k_consent, channel)
if said and refused(said) then return 'no_consent' end
if cooldown > 0 then
  local last = redis.call('GET', k_cd)
  if last and math.abs(event_ts - tonumber(last)) < cooldown then return 'cooldown' end
end
if per_day >= 0 and tonumber(redis.call('GET', k_capd) or '0') >= per_day then return 'frequency_cap' end
if per_week >= 0 and tonumber(redis.call('GET', k_capw) or '0') >= per_week then return 'frequency_cap' end
"""
_SHARED_CHECKS = """
if budget >= 0 and tonumber(redis.call('GET', k_budget) or '0') >= budget then return 'budget' end
if rate > 0 then
  local b = redis.call('HMGET', k_rl, 'tokens', 'ts')
  local tokens = tonumber(b[1]) or burst
  local ts = tonumber(b[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - ts) / 1000 * rate)
  if tokens < 1 then
    redis.call('HSET', k_rl, 'tokens', tokens, 'ts', now)
    return 'rate_limited'
  end
  redis.call('HSET', k_rl, 'tokens', tokens - 1, 'ts', now)
end
"""
_USER_COMMIT = """
redis.call('SET', k_idem, 1, 'EX', idem_ttl)
if cooldown > 0 then redis.call('SET', k_cd, event_ts, 'PX', cooldown) end
if per_day >= 0 then redis.call('INCR', k_capd); redis.call('EXPIRE', k_capd, 2 * 86400) end
if per_week >= 0 then redis.call('INCR', k_capw); redis.call('EXPIRE', k_capw, 8 * 86400) end
"""
_SHARED_COMMIT = """
if budget >= 0 then redis.call('INCR', k_budget); redis.call('EXPIRE', k_budget, 2 * 86400) end
"""

#: a single server: every guard in one script. KEYS: idem, consent, cooldown, cap_day, cap_week, budget, bucket
GUARD_SCRIPT = (
    SAID_LUA + _ARGS + _USER_KEYS + "local k_budget, k_rl = KEYS[6], KEYS[7]\n"
    + _USER_CHECKS + _SHARED_CHECKS + _USER_COMMIT + _SHARED_COMMIT + "return 'fired'\n"
)

#: a cluster, the user's slot. KEYS: idem, consent, cooldown, cap_day, cap_week; ARGV[11]: '1' when the
#: shared guards follow: the counters are then reserved, and the reply says how to restore the cooldown
USER_SCRIPT = SAID_LUA + _ARGS + _USER_KEYS + _USER_CHECKS + """
local reserve = ARGV[11] == '1'
local last, life = false, 0
if reserve then last, life = redis.call('GET', k_cd), redis.call('PTTL', k_cd) end
""" + _USER_COMMIT + """
if reserve then return {'reserved', last or '', life} end
return 'fired'
"""

#: a cluster, the shared slot. KEYS: budget, bucket
SHARED_SCRIPT = (
    _ARGS + "local k_budget, k_rl = KEYS[1], KEYS[2]\n" + _SHARED_CHECKS + _SHARED_COMMIT + "return 'fired'\n"
)

#: a cluster, the user's slot: give back what USER_SCRIPT reserved (ARGV[12], ARGV[13]: the cooldown's
#: value and life before). Deleting the idempotency key first makes a retried undo a no-op.
UNDO_SCRIPT = _ARGS + _USER_KEYS + """
if redis.call('DEL', k_idem) == 0 then return 0 end
if per_day >= 0 then redis.call('DECR', k_capd) end
if per_week >= 0 then redis.call('DECR', k_capw) end
if cooldown > 0 then
  if ARGV[12] == '' then redis.call('DEL', k_cd)
  elseif tonumber(ARGV[13]) > 0 then redis.call('SET', k_cd, ARGV[12], 'PX', ARGV[13])
  else redis.call('SET', k_cd, ARGV[12]) end
end
return 1
"""

# Merges. fold(dst, v, life, add): a counter adds up, a last-sent time keeps the later; the longer life stays
_FOLD = """
local function fold(dst, v, life, add)
  life = math.max(life, redis.call('PTTL', dst))
  if add then
    redis.call('INCRBY', dst, v)
  else
    local cur = redis.call('GET', dst)
    if not cur or tonumber(v) > tonumber(cur) then redis.call('SET', dst, v) end
  end
  if life > 0 then redis.call('PEXPIRE', dst, life) end
end
"""

#: a single server, one link (or several). KEYS: per link, its marker, then (src, dst) key pairs: counters
#: first, then last-sent times, then the consent hashes. ARGV: marker_ttl_s, then per link: counter pairs,
#: last-sent pairs
MERGE_SCRIPT = CONSENT_LUA + _FOLD + """
local k, merged = 1, 0
for a = 2, #ARGV, 2 do
  local adds, maxes = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local n = adds + maxes
  if redis.call('SET', KEYS[k], 1, 'NX', 'EX', ARGV[1]) then
    merged = merged + 1
    for i = 0, n - 1 do
      local src, dst = KEYS[k + 1 + 2 * i], KEYS[k + 2 + 2 * i]
      local v = redis.call('GET', src)
      if v then
        fold(dst, v, redis.call('PTTL', src), i < adds)
        redis.call('DEL', src)
      end
    end
    local src = KEYS[k + 1 + 2 * n]
    fold_consent(KEYS[k + 2 + 2 * n], redis.call('HGETALL', src))
    redis.call('DEL', src)
  end
  k = k + 3 + 2 * n
end
return merged
"""

#: a cluster, the merged-away user's slot. KEYS: where the taken keys are kept, the counters and last-sent
#: times, the consent hash; ARGV: how long they are kept. Returns them (JSON: values, lives, consent fields)
#: and deletes them; a repeat returns what the first took.
TAKE_SCRIPT = """
local kept = redis.call('GET', KEYS[1])
if kept then return kept end
local vals, lives = {}, {}
for i = 2, #KEYS - 1 do
  local v = redis.call('GET', KEYS[i])
  vals[i - 1], lives[i - 1] = v or '', v and redis.call('PTTL', KEYS[i]) or 0
  redis.call('DEL', KEYS[i])
end
local consent = redis.call('HGETALL', KEYS[#KEYS])
redis.call('DEL', KEYS[#KEYS])
kept = cjson.encode({vals, lives, consent})
redis.call('SET', KEYS[1], kept, 'EX', ARGV[1])
return kept
"""

#: a cluster, the canonical user's slot. KEYS: the merge's marker, the counters and last-sent times, the
#: consent hash; ARGV: marker_ttl_s, how many are counters, (value, life) per key, then consent fields
PUT_SCRIPT = CONSENT_LUA + _FOLD + """
if not redis.call('SET', KEYS[1], 1, 'NX', 'EX', ARGV[1]) then return 0 end
local adds, n = tonumber(ARGV[2]), #KEYS - 2
for i = 1, n do
  local v = ARGV[1 + 2 * i]
  if v ~= '' then fold(KEYS[1 + i], v, tonumber(ARGV[2 + 2 * i]), i <= adds) end
end
local fields = {}
for i = 3 + 2 * n, #ARGV do fields[#fields + 1] = ARGV[i] end
fold_consent(KEYS[#KEYS], fields)
return 1
"""


def cap_keys(day: int) -> tuple[str, str]:
    """The per-user cap counters an action on UTC ``day`` (days since the epoch) counts in: day and ISO week.

    >>> cap_keys(19_000)
    ('cap:d:19000', 'cap:w:2714')
    """
    return f"cap:d:{day}", f"cap:w:{(day + 3) // 7}"


def in_order(items: list[Action | Decision | Consent]) -> list[Action | Consent]:
    """Candidates and consent statements in the order their scripts run: grouped by user; within a user,
    the statements where they stand in the stream and, between two of them, the highest priority first.

    >>> a = lambda t, p: Action(t, t, "u", "email", t, 0, 0, 0, {}, {}, priority=p)
    >>> stream = [a("x", 1), Consent("u", "email", False, 0), a("y", 2), a("z", 3)]
    >>> [getattr(x, "trigger_id", "consent") for x in in_order(stream)]
    ['x', 'consent', 'z', 'y']
    """
    if not any(type(x) is Consent for x in items):  # most batches
        return sorted((x for x in items if type(x) is Action), key=lambda a: (a.user_id, -a.priority, a.event_ts))
    said: dict[str, int] = {}
    keyed: list[tuple[tuple[str, int, int, int, int], Action | Consent]] = []
    for x in items:
        if type(x) is Action:
            keyed.append(((x.user_id, said.get(x.user_id, 0), 0, -x.priority, x.event_ts), x))
        elif type(x) is Consent:
            n = said.get(x.user_id, 0)
            keyed.append(((x.user_id, n, 1, 0, 0), x))
            said[x.user_id] = n + 1
    keyed.sort(key=lambda kx: kx[0])
    return [x for _, x in keyed]


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


class RedisGuards:
    """Decides candidate actions against the shared guards of a trigger file."""

    def __init__(self, triggers: TriggersFile | Reloadable, url: str, prefix: str):
        self.client = redis_client(url)
        self.cluster = is_cluster(url)
        self.scripts = Scripts(self.client, *(
            (USER_SCRIPT, SHARED_SCRIPT, UNDO_SCRIPT, SET_CONSENT, TAKE_SCRIPT, PUT_SCRIPT) if self.cluster
            else (GUARD_SCRIPT, SET_CONSENT, MERGE_SCRIPT)
        ))
        if self.cluster:
            self.user_script, self.shared_script, self.undo_script, self.consent_script, self.take_script, \
                self.put_script = self.scripts.registered
        else:
            self.script, self.consent_script, self.merge_script = self.scripts.registered
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

    def _plan(self, a: Action, now: int) -> tuple[list[str], list[str], list[Any]]:
        """The user's keys, the shared keys and the arguments of ``a``'s guard scripts."""
        # a trigger removed by a reload while its action was held gets the file's defaults
        g, p, cap = self.guards.get(a.trigger_id, self.tf.defaults), self.prefix, self.tf.frequency_cap
        day = a.event_ts // DAY_MS
        limit = self.tf.channels.get(a.channel)
        rate, burst = (limit.rate, limit.burst) if limit is not None and limit.rate is not None else (0, 0)
        cap_day, cap_week = cap_keys(day)
        shared = f"{p}:{{guards}}" if self.cluster else p
        user = [
            self._user_key(a.user_id, f"idem:{a.action_id}") if self.cluster else f"{p}:idem:{a.action_id}",
            consent_key(p, a.user_id),
            self._user_key(a.user_id, f"cd:{a.trigger_id}"),
            self._user_key(a.user_id, cap_day),
            self._user_key(a.user_id, cap_week),
        ]
        args = [
            int(self.tf.idempotency_ttl), int((g.cooldown or 0) * 1000),
            -1 if cap.per_day is None else cap.per_day, -1 if cap.per_week is None else cap.per_week,
            -1 if g.daily_budget is None else g.daily_budget, rate, burst, now, a.event_ts, a.channel,
        ]
        return user, [f"{shared}:budget:{a.trigger_id}:{day}", f"{shared}:rl:{a.channel}"], args

    def _check(self, a: Action, now: int) -> Call:
        """A single server: every guard of ``a`` in one script."""
        user, shared, args = self._plan(a, now)
        return self.script, user + shared, args

    def _write_consent(self, c: Consent) -> Call:
        return self.consent_script, [consent_key(self.prefix, c.user_id)], [c.channel, stated(c.granted, c.ts)]

    def decide_batch(self, items: list[Action | Decision | Merge | Consent]) -> list[Decision]:
        """Every candidate becomes a decision; decisions taken upstream pass through (Bytewax ``flat_map_batch``).

        A merge (identity) moves the merged-away shopper's counters where it stands in the stream: after
        the candidates its shard decided for that shopper, before anything later. On a single server the
        merges run in the candidates' pipeline (one round trip for the batch); a cluster takes a round
        trip per merge.
        """
        self._follow()
        out = [x for x in items if type(x) is Decision]
        calls: list[Action | Consent | Merge] = []
        upto = 0
        for i, x in enumerate(items):
            if type(x) is Merge:
                calls += in_order(items[upto:i])  # type: ignore[arg-type]
                calls.append(x)
                upto = i + 1
        calls += in_order(items[upto:] if upto else items)  # type: ignore[arg-type]
        if not calls:
            return out
        verdicts = self._cluster_merging(calls) if self.cluster else self._verdicts(calls)
        for a, v in verdicts:
            out.append(Decision(a, "fired", "") if v == "fired" else Decision(a, "suppressed", v))
        return out

    def _cluster_merging(self, calls: list[Action | Consent | Merge]) -> list[tuple[Action, str]]:
        """A cluster: the candidates between two merges decided together, each merge between them."""
        verdicts: list[tuple[Action, str]] = []
        upto = 0
        for i, c in enumerate(calls + [None]):  # type: ignore[list-item]
            if c is None or type(c) is Merge:
                if i > upto:
                    verdicts += self._cluster_verdicts(calls[upto:i])  # type: ignore[arg-type]
                if c is not None and c.src != c.dst:
                    what = self._merge_what(c)
                    self._merge_across_slots(c, what, len(what) - len(self.guards), int(self.tf.idempotency_ttl))
                upto = i + 1
        return verdicts

    def _verdicts(self, calls: list[Action | Consent | Merge]) -> list[tuple[Action, str]]:
        """A single server: one script per candidate, statement or merge, all in one pipeline."""
        ttl = int(self.tf.idempotency_ttl)

        def script(c: Action | Consent | Merge, now: int) -> Call | None:
            if type(c) is Action:
                return self._check(c, now)
            if type(c) is Consent:
                return self._write_consent(c)
            return self._merge_call(c, ttl)  # type: ignore[arg-type]

        def check() -> list[Any]:
            now = int(time.time() * 1000)
            return self.scripts.run([call for c in calls if (call := script(c, now)) is not None])

        # never skip a guard: hold the flow until Redis answers; a retry after a lost answer is safe for
        # merges too: their markers make one that did apply a no-op
        results = until_redis_answers(f"guard check of {len(calls)} candidates", check, self._failed)
        sent = [c for c in calls if type(c) is not Merge or c.src != c.dst]
        return [(c, _text(v)) for c, v in zip(sent, results) if type(c) is Action]

    def _cluster_verdicts(self, calls: list[Action | Consent]) -> list[tuple[Action, str]]:
        """A cluster: the user's script (and the statements) in one pipeline, then the shared one for the
        candidates that need it, then the undos of those it refused. A user whose candidate waits for the
        shared script has its later calls sent in the next round, after that candidate is decided."""
        verdicts: dict[int, str] = {}
        pending = list(range(len(calls)))
        while pending:
            now = int(time.time() * 1000)
            this: list[int] = []
            later: list[int] = []
            waiting: set[str] = set()
            plans: dict[int, tuple[list[str], list[str], list[Any]]] = {}
            reserve: set[int] = set()
            for i in pending:
                c = calls[i]
                if c.user_id in waiting:
                    later.append(i)
                    continue
                this.append(i)
                if type(c) is Action:
                    plans[i] = plan = self._plan(c, now)
                    if plan[2][4] >= 0 or plan[2][5] > 0:  # a budget or a rate limit
                        waiting.add(c.user_id)
                        reserve.add(i)
            first = [
                (self.user_script, plans[i][0], [*plans[i][2], int(i in reserve)])
                if i in plans else self._write_consent(calls[i])  # type: ignore[arg-type]
                for i in this
            ]
            answers = until_redis_answers(
                f"guard check of {len(first)} candidates", lambda: self.scripts.run(first), self._failed
            )
            reserved = [(i, r) for i, r in zip(this, answers) if i in plans and isinstance(r, list)]
            verdicts.update((i, _text(r)) for i, r in zip(this, answers) if i in plans and not isinstance(r, list))
            if reserved:
                shared = [(self.shared_script, plans[i][1], plans[i][2]) for i, _ in reserved]
                decided = until_redis_answers(
                    f"shared guards of {len(shared)} candidates", lambda: self.scripts.run(shared), self._failed
                )
                undo: list[Call] = []
                for (i, (_, last, life)), v in zip(reserved, decided):
                    verdicts[i] = _text(v)
                    if verdicts[i] != "fired":
                        undo.append((self.undo_script, plans[i][0], [*plans[i][2], 0, _text(last), life]))
                if undo:
                    until_redis_answers(
                        f"undoing {len(undo)} reservations", lambda: self.scripts.run(undo), self._failed
                    )
            pending = later
        return [(c, verdicts[i]) for i, c in enumerate(calls) if type(c) is Action]  # type: ignore[misc]

    def _merge_what(self, m: Merge) -> list[str]:
        """The keys a merge moves (see :meth:`_merge_call`): cap counters of three days, then cooldowns."""
        day = m.ts // DAY_MS
        return sorted({k for d in (day - 1, day, day + 1) for k in cap_keys(d)}) + [f"cd:{tid}" for tid in self.guards]

    def _merge_call(self, m: Merge, ttl: int) -> Call | None:
        """The script that moves the guard counters and consent of the shopper an identity merge merged away
        (``src``, the id its actions were counted under) into the canonical user (``dst``) on a single
        server; None when the ids are the same. Cap counters add up, cooldowns keep the later last-sent
        time, each key the longer remaining life; consent, channel by channel, the newer statement (at equal
        times the refusal); the merged-away keys are deleted. Each merge ``seq`` is applied once, even when
        a replay after a crash sends the same merge again: a marker per ``seq`` (kept for
        ``idempotency_ttl``) makes the replay a no-op, so it does not move what the id was counted for
        since (a held message delivered to it after the merge).

        Which keys: the cooldown of every trigger of the file, and the cap counters of the merge's UTC day,
        the day before and the day after, with their ISO weeks. Those are all a later check can read: a
        cap counts per day (week) of event time, and the canonical user's later actions fall on or after
        the merge's day (or up to a day before it, for late events). Older counters are left to expire.
        """
        if m.src == m.dst:
            return None
        what = self._merge_what(m)
        keys = [f"{self.prefix}:merged:{m.seq}"]
        for w in what:
            keys += [self._user_key(m.src, w), self._user_key(m.dst, w)]
        keys += [consent_key(self.prefix, m.src), consent_key(self.prefix, m.dst)]
        return self.merge_script, keys, [ttl, len(what) - len(self.guards), len(self.guards)]

    def _merge_across_slots(self, m: Merge, what: list[str], adds: int, ttl: int) -> None:
        """A cluster: take the merged-away user's keys out (its slot), then fold them into the canonical
        user's (another slot). Each step is idempotent per ``seq``, so a retry or a replay repeats neither."""
        src = [self._user_key(m.src, f"moved:{m.seq}"), *(self._user_key(m.src, w) for w in what),
               consent_key(self.prefix, m.src)]
        kept = until_redis_answers(f"guard merge of {m.src}", lambda: self.take_script(keys=src, args=[ttl]),
                                   self._failed)
        vals, lives, consent = (x or [] for x in orjson.loads(kept))
        dst = [self._user_key(m.dst, f"merged:{m.seq}"), *(self._user_key(m.dst, w) for w in what),
               consent_key(self.prefix, m.dst)]
        args = [ttl, adds, *(x for pair in zip(vals, lives) for x in pair), *consent]
        until_redis_answers(f"guard merge into {m.dst}", lambda: self.put_script(keys=dst, args=args), self._failed)
