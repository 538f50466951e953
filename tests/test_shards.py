"""Shard keys: a user's shard is the same in every process, the balanced names share out evenly over the workers
of real Bytewax clusters, and a recovery store keeps the names it was made with."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from bytewax.recovery import init_db_dir

from flows.common import SHARD_KEYS_FILE, init_recovery_store, shard_keys
from nudgeflow.settings import Settings
from nudgeflow.shardgen import routes
from operators.shards import BALANCED, numeric, shard_names, shard_of


def test_a_users_shard_is_stable_and_shards_are_spread() -> None:
    # crc32, not Python's salted hash: the same in every process and after every restart, and a store made
    # before balanced names finds its users where they were
    assert (shard_of("u1", numeric(16)), shard_of("user-42", numeric(64))) == ("6", "51")
    names = shard_names(16)
    assert shard_of("u1", names) == names[6] and shard_of(b"u1", names) == names[6]
    counts = dict.fromkeys(names, 0)
    for i in range(16_000):
        counts[shard_of(f"user-{i}", names)] += 1
    assert min(counts.values()) > 800 and max(counts.values()) < 1200
    assert len(set(BALANCED)) == len(BALANCED) == 256


def busiest_over_even(names: tuple[str, ...], workers: int) -> int:
    """How many shards the busiest worker of a real ``workers``-thread Bytewax cluster holds above an even share."""
    where = routes(list(names), workers)
    held = [0] * workers
    for name in names:
        held[where[name]] += 1
    return max(held) - math.ceil(len(names) / workers)


@pytest.mark.parametrize("workers", [2, 3, 4, 8, 16])
def test_bytewax_gives_no_worker_more_than_one_shard_above_an_even_share(workers: int) -> None:
    for shards in (16, 64, 256):
        assert busiest_over_even(shard_names(shards), workers) <= 1, (shards, workers)


def test_numeric_names_share_out_unevenly_which_is_why_they_are_not_the_default() -> None:
    assert busiest_over_even(numeric(64), 2) == 3  # 35 and 29
    assert busiest_over_even(numeric(64), 8) == 5  # 13 on one worker, 5 on another


def _settings(store: Path, shards: int = 64) -> Settings:
    return Settings.model_validate({"shards": shards, "recovery": {"dir": str(store)}})


def test_a_recovery_store_keeps_the_shard_names_it_was_made_with(tmp_path: Path) -> None:
    assert shard_keys(Settings(), tmp_path) == shard_names(64)  # no recovery: balanced
    fresh = _settings(tmp_path / "fresh")
    assert shard_keys(fresh, tmp_path) == shard_names(64)  # a store not made yet
    assert init_recovery_store(fresh, tmp_path) is not None
    assert shard_keys(fresh, tmp_path) == shard_names(64)
    old = tmp_path / "old"  # a store made before balanced names: partitions, no SHARD_KEYS_FILE
    old.mkdir()
    init_db_dir(old, 1)
    assert shard_keys(_settings(old, 8), tmp_path) == numeric(8)
    (old / SHARD_KEYS_FILE).write_text("balanced-9\n")
    with pytest.raises(ValueError, match="balanced-9"):
        shard_keys(_settings(old), tmp_path)
