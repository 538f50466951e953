"""Feature snapshots for training and audit: a user's features at most once per interval of event time.

The feature step publishes every changed user's features once per batch; writing all of them to
ClickHouse would store a user's features again and again. :class:`SnapshotSampler` keeps the first
publication of each user in each slot of event time (``ts // every``) and drops the others, with one
dictionary lookup per published user, never per event.
"""

from __future__ import annotations

import threading

from operators.features import UserFeatures

#: ``(slot start in epoch ms, features)``: the slot keys the snapshot row, so a second sample of the same
#: slot (the sampler forgot the user, or restarted) collapses with the first in ClickHouse
Sample = tuple[int, UserFeatures]


class SnapshotSampler:
    """Samples published features: at most one per user per ``every_ms`` slot of event time.

    The workers of a process share one sampler (a user is always published by the same worker), hence
    the lock. Memory stays bounded by the active users: past ``max_users`` entries (or twice the users
    kept at the last clean-up, if more), users last sampled before the previous slot of the newest event
    time are forgotten. A forgotten user seen again in the same slot is sampled twice, which the table's
    (user_id, slot) key collapses.
    """

    def __init__(self, every_ms: int, max_users: int = 100_000):
        if every_ms <= 0:
            raise ValueError("every_ms must be positive")
        self.every_ms = every_ms
        self.max_users = max_users
        self._limit = max_users
        self._slots: dict[str, int] = {}
        self._newest = 0
        self._lock = threading.Lock()

    def sample_batch(self, batch: list[UserFeatures]) -> list[Sample]:
        every, out = self.every_ms, []
        with self._lock:
            slots = self._slots
            for uf in batch:
                if uf.gone:  # a shopper merged into another (identity): nothing to snapshot
                    continue
                slot = uf.ts // every
                if slot > slots.get(uf.user_id, -1):
                    slots[uf.user_id] = slot
                    out.append((slot * every, uf))
                    self._newest = max(self._newest, slot)
            if len(slots) > self._limit:
                self._forget()
        return out

    def __len__(self) -> int:
        """The users remembered."""
        return len(self._slots)

    def _forget(self) -> None:
        """Drop the users not sampled in the newest two slots; the next clean-up waits for twice as many
        users as are left, so cleaning up costs O(1) per user sampled."""
        keep = self._newest - 1
        self._slots = {u: s for u, s in self._slots.items() if s >= keep}
        self._limit = max(self.max_users, 2 * len(self._slots))
