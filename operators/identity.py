"""Cross-platform identity: one shopper behind a web cookie, an app device, a mini-program account and a login.

Every event passes through one identity step before features. Each other id a record carried
(``Event.aliases``) is *linked* to its ``user_id``; linked ids form a cluster with one *canonical* id (its
root), and the event goes on under the canonical id, keeping the id it carried in ``origin_id``. When a link
joins two clusters (a *merge*), the step emits a :class:`~nudgeflow.events.Merge` so that every per-user step
moves what it keeps about the losing root to the canonical one, exactly once (merges are numbered by ``seq``).

The graph is small and needs one total order of links, so the step runs under a single key. An event whose id
the graph does not know and that carries no other id costs one dict lookup.

**Rules** (product rules, judged in this order for a link ``src -> dst`` of kind ``identify``, ``alias`` or
``implicit``, an ordinary event carrying a user id and another id). *Known* ids are customer ids: those
without an anonymous prefix (``anon:``, ``device:``, ``account:``).

- ``self_alias`` (rejected): ``src`` is ``dst``.
- ``repeat``: ``src`` already resolves to ``dst``'s canonical and is not that canonical itself. Nothing
  happens and nothing is reported: every post-login event repeats its link. A ``conflict`` or
  ``cluster_too_big`` refusal of the same link again within ``identity.storm_window`` is a repeat too
  (the second customer of a shared device sends it with every event): reported once per window.
- ``cycle`` (rejected): ``src`` is the root of ``dst``'s own cluster (alias A->B, then B->A).
- ``alias_storm`` (rejected): ``src`` has attempted links to ``identity.max_links_per_id`` other distinct ids
  within ``identity.storm_window`` of event time (a shared kiosk, a bot). Repeats are not attempts; every
  other link is, rejected ones included. Attempts older than the window are forgotten.
- ``conflict`` (rejected): both roots are known and the link is not an ``alias``: two customers on one
  shared device are not merged, and the device stays with its first customer. Only an ``alias`` (the shop
  saying so) merges two customers.
- ``cluster_too_big`` (rejected): the merged cluster would hold more than ``identity.max_cluster_ids`` ids.
- ``merged``: which root survives as canonical: a known root beats an anonymous one; otherwise (both
  anonymous, or a known-known alias) ``dst``'s root. The losing root and its whole cluster now resolve to the
  canonical (``Link.moved``, the losing root first), and ``seq`` counts the merge.

A rejected link changes no resolution. Order matters only where a rule picks a side (``dst``'s root between
two anonymous roots or two aliased customers, the first customer of a shared device, the storm's first
links): when no cluster would hold two known ids and no link storms, any order of the same links gives the
same clusters, each with its known id as canonical.

>>> g = IdentityGraph()
>>> g.link("anon:c1", "u1", "implicit", 0).outcome, g.resolve("anon:c1")
('merged', 'u1')
>>> g.link("anon:c1", "u1", "implicit", 1).outcome
'repeat'
>>> g.link("device:d1", "anon:c1", "implicit", 2).canonical  # dst resolves to u1: the known root wins
'u1'
>>> g.link("device:d1", "u2", "implicit", 3).reason  # u1's device seen with another customer
'conflict'
>>> m = g.link("u1", "u2", "alias", 4)  # the shop says u1 is u2: u1's whole cluster moves
>>> (m.outcome, m.canonical, m.seq, sorted(m.moved))
('merged', 'u2', 3, ['anon:c1', 'device:d1', 'u1'])
>>> g.link("u2", "u1", "alias", 5).reason
'cycle'
"""

from __future__ import annotations

import pickle
from collections.abc import Callable

from bytewax.operators import StatefulBatchLogic
from msgspec.structs import replace

from nudgeflow.events import ID_FIELDS, DeadLetter, Event, Link, Merge
from nudgeflow.settings import IdentityConfig

_ANONYMOUS = tuple(ID_FIELDS.values())
#: link kind by event type; other events link ``implicit``ly
_KINDS = {"identify": "identify", "alias": "alias"}

IdentityOut = Event | DeadLetter | Merge | Link


def is_known(uid: str) -> bool:
    """Whether ``uid`` is a customer id rather than a namespaced cookie, device or account id.

    >>> is_known("u1"), is_known("anon:c1")
    (True, False)
    """
    return not uid.startswith(_ANONYMOUS)


class IdentityGraph:
    """Which canonical id every linked id resolves to.

    ``canon`` holds only ids that resolve to another one: an unlinked id, and a cluster's root, is its own
    canonical. ``members[root]`` lists the other ids of the root's cluster, so a merge re-points a cluster in
    O(its size). ``cfg`` (the limits) comes from the running configuration, never from a snapshot.
    """

    def __init__(self, cfg: IdentityConfig | None = None):
        self.cfg = cfg if cfg is not None else IdentityConfig()
        self.canon: dict[str, str] = {}
        self.members: dict[str, list[str]] = {}
        #: merges so far: the number of the newest
        self.seq = 0
        #: per src: the distinct ids it attempted links to -> the newest event time it did (alias_storm)
        self.attempts: dict[str, dict[str, int]] = {}
        self.newest_ts = 0
        #: forget idle srcs when ``attempts`` grows past this (amortised O(1) per attempt)
        self.sweep_at = 1024

    @classmethod
    def from_canon(cls, canon: dict[str, str], seq: int, cfg: IdentityConfig | None = None) -> IdentityGraph:
        """The graph a mirror of ``canon`` describes (as Redis keeps it), ``seq`` merges on.

        >>> IdentityGraph.from_canon({"anon:c1": "u1", "device:d1": "u1"}, 2).members
        {'u1': ['anon:c1', 'device:d1']}
        """
        g = cls(cfg)
        g.canon = canon
        for uid, root in canon.items():
            g.members.setdefault(root, []).append(uid)
        g.seq = seq
        return g

    def __getstate__(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k != "cfg"}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self.cfg = IdentityConfig()

    def resolve(self, uid: str) -> str:
        """The canonical id of ``uid`` (itself when it is unlinked or a root)."""
        return self.canon.get(uid, uid)

    def repeat(self, src: str, dst: str) -> bool:
        """Whether linking ``src`` to ``dst`` would be a ``repeat``: it changes nothing and says nothing new."""
        root = self.canon.get(src, src)
        return root != src and root == self.canon.get(dst, dst)

    def link(self, src: str, dst: str, kind: str, ts: int) -> Link:
        """Judge one link by the module's rules, and merge if it says so."""
        if src == dst:
            return Link(ts, src, dst, kind, "rejected", "self_alias")
        if self.repeat(src, dst):
            return Link(ts, src, dst, kind, "repeat", canonical=self.resolve(dst))
        rs, rd = self.resolve(src), self.resolve(dst)
        if rs == rd:
            return Link(ts, src, dst, kind, "rejected", "cycle")
        prior = self.attempts.get(src)
        again = prior is not None and prior.get(dst, ts - self.cfg.storm_window * 1000) > ts - self.cfg.storm_window * 1000
        if not self._attempt(src, dst, ts):
            return Link(ts, src, dst, kind, "rejected", "alias_storm")
        ks, kd = is_known(rs), is_known(rd)
        # a refusal repeated within the storm window (every event of a shared device's second customer) is
        # reported once: outcome ``repeat``, with the reason
        if ks and kd and kind != "alias":
            return Link(ts, src, dst, kind, "repeat" if again else "rejected", "conflict")
        winner, loser = (rs, rd) if ks and not kd else (rd, rs)
        if len(self.members.get(winner, ())) + len(self.members.get(loser, ())) + 2 > self.cfg.max_cluster_ids:
            return Link(ts, src, dst, kind, "repeat" if again else "rejected", "cluster_too_big")
        moved = (loser, *self.members.pop(loser, ()))
        for uid in moved:
            self.canon[uid] = winner
        self.members.setdefault(winner, []).extend(moved)
        self.seq += 1
        return Link(ts, src, dst, kind, "merged", canonical=winner, seq=self.seq, moved=moved)

    def _attempt(self, src: str, dst: str, ts: int) -> bool:
        """Count an attempted link of ``src`` to ``dst``; False when it is one distinct id too many."""
        window = int(self.cfg.storm_window * 1000)
        seen = self.attempts.get(src)
        if seen is None:
            seen = self.attempts[src] = {}
        else:
            for old in [d for d, t in seen.items() if t <= ts - window]:
                del seen[old]
        if dst not in seen and len(seen) >= self.cfg.max_links_per_id:
            return False
        seen[dst] = max(ts, seen.get(dst, ts))
        if ts > self.newest_ts:
            self.newest_ts = ts
        if len(self.attempts) > self.sweep_at:
            horizon = self.newest_ts - window
            self.attempts = {s: d for s, d in self.attempts.items() if max(d.values(), default=horizon) > horizon}
            self.sweep_at = 2 * len(self.attempts) + 1024
        return True


class IdentityEngine:
    """Resolves a batch of events through a graph: links their other ids, then renames them."""

    def __init__(self, cfg: IdentityConfig):
        self.cfg = cfg

    def apply_batch(self, graph: IdentityGraph, items: list[Event | DeadLetter]) -> list[IdentityOut]:
        """Per event, in order: each judged link that is not a repeat (a merge's ``Link`` then its ``Merge``, a
        rejected one's ``Link`` then a ``DeadLetter``), then the event under its canonical id. Refusals pass.

        >>> eng, g = IdentityEngine(IdentityConfig()), IdentityGraph()
        >>> out = eng.apply_batch(g, [Event("e1", "u1", "browse", 5, aliases=("anon:c1",))])
        >>> [type(x).__name__ for x in out], out[1].src, out[2].user_id
        (['Link', 'Merge', 'Event'], 'anon:c1', 'u1')
        >>> later = eng.apply_batch(g, [Event("e2", "anon:c1", "browse", 6)])[0]
        >>> (later.user_id, later.origin_id)
        ('u1', 'anon:c1')
        """
        graph.cfg = self.cfg  # the running limits, whatever snapshot or mirror the graph came from
        canon = graph.canon
        out: list[IdentityOut] = []
        for x in items:
            if type(x) is not Event:
                out.append(x)
                continue
            uid = x.user_id
            for alias in x.aliases:
                if not graph.repeat(alias, uid):
                    link = graph.link(alias, uid, _KINDS.get(x.type, "implicit"), x.ts)
                    if link.outcome != "repeat":
                        _report(link, x, out)
            c = canon.get(uid)
            out.append(x if c is None else replace(x, user_id=c, origin_id=uid))
        return out


def _report(link: Link, ev: Event, out: list[IdentityOut]) -> None:
    """A judged link, traced to its event, and what it means downstream: a merge or a refusal."""
    link.platform = ev.platform or ""
    link.event_id = ev.event_id
    link.position = ev.position
    out.append(link)
    if link.outcome == "merged":
        out.append(Merge(link.moved[0], link.canonical, link.seq, ev.ts, "merge"))
    else:
        detail = f"{link.kind} link {link.src[:60]!r} -> {link.dst[:60]!r}: {link.reason}"
        out.append(DeadLetter(link.reason, detail, ev.raw, ev.position, ev.ingest_ms))


class IdentityLogic(StatefulBatchLogic[list[Event | DeadLetter], list[IdentityOut], bytes]):
    """Bytewax adapter of the single-key identity step: holds the graph.

    Items are whole upstream batches, and each call answers with one list: Bytewax routes and calls
    back per item, which for a step every event passes would cost more than resolving it.

    Without a snapshot to resume from, the graph is ``load()``-ed (the Redis mirror), so a restart without
    recovery resolves ids as before. ``recover``: whether recovery is on (see ``FeatureLogic``).
    """

    def __init__(
        self, engine: IdentityEngine, resume: bytes | None, load: Callable[[], IdentityGraph], recover: bool = True
    ):
        self.engine = engine
        self.graph = pickle.loads(resume) if resume is not None else load()
        self.recover = recover

    def on_batch(self, values: list[list[Event | DeadLetter]]) -> tuple[list[list[IdentityOut]], bool]:
        items = values[0] if len(values) == 1 else [x for batch in values for x in batch]
        return [self.engine.apply_batch(self.graph, items)], StatefulBatchLogic.RETAIN

    def snapshot(self) -> bytes:
        return pickle.dumps(self.graph, protocol=pickle.HIGHEST_PROTOCOL) if self.recover else b""
