"""Identity in ClickHouse on the real engine (chDB): the 008 migration, origin_id and identity_links rows, PII
hashing of every shopper id, and the cross_platform saved query on a hand-made history."""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import orjson
import pytest
from clickhouse_connect.driver.client import Client

from connectors.clickhouse import (
    ACTION_COLUMNS, DECISION_COLUMNS, DLQ_COLUMNS, EVENT_COLUMNS, LINK_COLUMNS, Pii, action_row, batch_token, connect,
    decision_row, dlq_row, event_row, insert_batch, link_row, migrate,
)
from nudgeflow.events import Action, DeadLetter, Decision, Event, Link
from nudgeflow.queries import run_query
from nudgeflow.settings import PiiConfig

T = 1_772_409_600_000  # 2026-03-02 00:00 UTC
H = 3_600_000
D = 24 * H
ORIGIN_TABLES = ("events", "decisions", "actions")


@pytest.fixture
def client(chdb_path: Path, ch_database: str) -> Iterator[Client]:
    c = connect(f"chdb://{chdb_path}")
    try:
        yield c
    finally:
        c.command(f"DROP DATABASE IF EXISTS {ch_database}")
        c.close()


def rows(c: Client, sql: str) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in c.query(sql).result_rows]


def schema(c: Client, db: str) -> dict[str, str]:
    return dict(rows(c, f"SELECT name, create_table_query FROM system.tables WHERE database = '{db}'"))


def hashing() -> Pii:
    p = Pii.of(PiiConfig.model_validate({"hash": ["user_id"], "salt": "pepper-0123456789abcdef"}))
    assert p is not None
    return p


def action(i: int, user: str, origin: str) -> Action:
    return Action(f"a{i}", "cart_abandonment", user, "email", f"e{i}", T + i, T + i, T + i + 5, {}, {"coupon": "C"},
                  origin_id=origin)


# -- the migration


def test_the_migration_applies_on_a_fresh_database_and_again_changes_nothing(client: Client, ch_database: str) -> None:
    db = ch_database
    assert "008_identity.sql" in migrate(client, db, {"identity_links": 30 * 86400.0})
    before = schema(client, db)
    assert rows(client, f"SELECT table, type, default_expression FROM system.columns WHERE database = '{db}' "
                        f"AND name = 'origin_id' ORDER BY table") == [(t, "String", "''") for t in sorted(ORIGIN_TABLES)]
    links = before["identity_links"]
    assert "`moved` Array(String)" in links and "PARTITION BY toDate(ts)" in links
    assert "non_replicated_deduplication_window = 1000" in links  # the writer's batch tokens hold here too
    assert "TTL toDateTime(ts) + toIntervalSecond(2592000)" in links
    assert migrate(client, db, {"identity_links": 30 * 86400.0}) == []
    client.command(f"TRUNCATE TABLE {db}.schema_migrations")  # a crash before the record: every statement again
    assert len(migrate(client, db, {"identity_links": 30 * 86400.0})) >= 8
    assert schema(client, db) == before


def test_the_migration_upgrades_a_database_holding_rows(client: Client, ch_database: str) -> None:
    """A deployment from before identity: its rows read origin_id '', new rows keep theirs."""
    db = ch_database
    migrate(client, db)
    for table in ORIGIN_TABLES:  # back to the schema of migration 007, as an older deployment has it
        client.command(f"ALTER TABLE {db}.{table} DROP COLUMN origin_id")
    client.command(f"DROP TABLE {db}.identity_links")
    client.command(f"DELETE FROM {db}.schema_migrations WHERE version = 8")
    old = Event("old", "u1", "browse", T, platform="web")
    insert_batch(client, db, "events", EVENT_COLUMNS[:-1], [event_row(old)[:-1]], "old")
    insert_batch(client, db, "actions", ACTION_COLUMNS[:-1], [action_row(action(0, "u1", ""))[:-1]], "old")

    assert migrate(client, db) == ["008_identity.sql"]
    new = Event("new", "u1", "browse", T + 1, platform="app", origin_id="device:d1")
    insert_batch(client, db, "events", EVENT_COLUMNS, [event_row(new)], "new")
    assert rows(client, f"SELECT event_id, user_id, origin_id FROM {db}.events ORDER BY event_id") == [
        ("new", "u1", "device:d1"), ("old", "u1", "")]
    assert rows(client, f"SELECT action_id, origin_id FROM {db}.actions") == [("a0", "")]
    assert rows(client, f"SELECT sum(events) FROM {db}.events_per_minute") == [(2,)]  # the rollup still follows


# -- rows


def test_rows_round_trip_with_origin_id(client: Client, ch_database: str) -> None:
    db = ch_database
    migrate(client, db)
    evs = [Event("e1", "anon:c1", "browse", T, platform="web"),
           Event("e2", "u1", "identify", T + 1, platform="web", origin_id="anon:c1"),
           Event("e3", "u1", "order", T + 2, platform="app", props={"amount": 12.5})]
    insert_batch(client, db, "events", EVENT_COLUMNS, [event_row(e) for e in evs], "e")
    acts = [action(1, "u1", "anon:c1"), action(2, "u2", "")]
    insert_batch(client, db, "actions", ACTION_COLUMNS, [action_row(a) for a in acts], "a")
    insert_batch(client, db, "decisions", DECISION_COLUMNS, [decision_row(Decision(a, "fired", "")) for a in acts], "d")
    assert rows(client, f"SELECT event_id, user_id, origin_id, amount FROM {db}.events FINAL ORDER BY event_id") == [
        ("e1", "anon:c1", "", 0.0), ("e2", "u1", "anon:c1", 0.0), ("e3", "u1", "", 12.5)]
    for table, key in (("actions", "action_id"), ("decisions", "decision_id")):
        assert rows(client, f"SELECT {key}, user_id, origin_id FROM {db}.{table} FINAL ORDER BY {key}") == [
            ("a1", "u1", "anon:c1"), ("a2", "u2", "")]


def test_pii_hashes_every_shopper_id_alike_so_they_still_join(client: Client, ch_database: str) -> None:
    db = ch_database
    migrate(client, db)
    p = hashing()
    before = Event("e1", "anon:c1", "browse", T, platform="web")
    after = Event("e2", "u1", "browse", T + 1, platform="web", origin_id="anon:c1")
    insert_batch(client, db, "events", EVENT_COLUMNS, [event_row(e, p) for e in (before, after)], "e")
    link = Link(T + 1, "anon:c1", "u1", "identify", "merged", canonical="u1", seq=1, moved=("anon:c1",),
                platform="web", event_id="e2", position="t:0:2")
    insert_batch(client, db, "identity_links", LINK_COLUMNS, [link_row(link, p)], "l")
    a = action(1, "u1", "anon:c1")
    insert_batch(client, db, "actions", ACTION_COLUMNS, [action_row(a, p)], "a")
    insert_batch(client, db, "decisions", DECISION_COLUMNS, [decision_row(Decision(a, "fired", ""), p)], "d")

    stored = rows(client, f"SELECT user_id, origin_id FROM {db}.events ORDER BY event_id")
    assert stored == [(p.digest("anon:c1"), ""), (p.digest("u1"), p.digest("anon:c1"))]  # "" stays "": no origin
    for table in ("actions", "decisions"):
        assert rows(client, f"SELECT user_id, origin_id FROM {db}.{table}") == [(p.digest("u1"), p.digest("anon:c1"))]
    assert rows(client, f"SELECT src, dst, canonical, moved, event_id FROM {db}.identity_links") == [
        (p.digest("anon:c1"), p.digest("u1"), p.digest("u1"), [p.digest("anon:c1")], "e2")]
    # the hashed cookie still joins its rows from before the login to the link and to the later rows
    joined = f"""SELECT count() FROM {db}.events AS e
                 INNER JOIN {db}.identity_links AS l ON e.user_id = l.src OR e.origin_id = l.src"""
    assert rows(client, joined) == [(2,)]
    assert "c1" not in str(rows(client, f"SELECT * FROM {db}.events")) + str(rows(client, f"SELECT * FROM {db}.identity_links"))

    # a dead letter's ids are hashed like user_id; other fields are left alone
    raw = orjson.dumps({"event_id": "x", "anonymous_id": "c1", "device_id": "d1", "account_id": "m1",
                        "previous_id": "u0", "type": "teleport", "ts": T})
    doc = orjson.loads(dict(zip(DLQ_COLUMNS, dlq_row(DeadLetter("unknown_type", "", raw, "t:0:9", T), p)))["raw"])
    assert doc == {"event_id": "x", "anonymous_id": p.digest("c1"), "device_id": p.digest("d1"),
                   "account_id": p.digest("m1"), "previous_id": p.digest("u0"), "type": "teleport", "ts": T}


def test_identity_links_insert_once_and_a_replay_judged_otherwise_adds_a_row(client: Client, ch_database: str) -> None:
    db = ch_database
    migrate(client, db)
    links = [Link(T, "device:d1", "u1", "identify", "merged", canonical="u1", seq=1, moved=("device:d1",),
                  platform="app", event_id="e1", position="t:0:1"),
             Link(T + D, "anon:c9", "u1", "alias", "rejected", reason="conflict", event_id="e2", position="t:0:2")]
    batch = [link_row(x) for x in links]
    insert_batch(client, db, "identity_links", LINK_COLUMNS, batch, batch_token("identity_links", batch))
    insert_batch(client, db, "identity_links", LINK_COLUMNS, batch, batch_token("identity_links", batch))  # a retry
    assert rows(client, f"SELECT count(), uniqExact(partition) FROM system.parts "
                        f"WHERE database = '{db}' AND table = 'identity_links' AND active") == [(2, 2)]
    assert rows(client, f"SELECT count() FROM {db}.identity_links") == [(2,)]
    got = rows(client, f"SELECT toUnixTimestamp64Milli(ts), seq, src, dst, canonical, kind, outcome, reason, moved, "
                       f"platform, event_id, position FROM {db}.identity_links ORDER BY ts")
    assert got == [tuple(r) for r in batch]
    # replayed after a crash: the same judgement collapses into its row, a merge seen again as a repeat is kept beside it
    replay = [link_row(links[0]), link_row(Link(T, "device:d1", "u1", "identify", "repeat", canonical="u1",
                                                 platform="app", event_id="e1", position="t:0:1"))]
    insert_batch(client, db, "identity_links", LINK_COLUMNS, replay, "replay")
    assert rows(client, f"SELECT outcome, count() FROM {db}.identity_links FINAL GROUP BY outcome ORDER BY outcome") == [
        ("merged", 1), ("rejected", 1), ("repeat", 1)]


# -- the saved query


def history() -> tuple[list[Event], list[Link]]:
    """Four shoppers over three days (since = T, until = T + 3 days).

    u1 browsed the app as device:d1, logged in, ordered on web the next day: cross-platform, app → web.
    u2 only uses web; device:x9's link to u2 was rejected, so its app browsing is not u2's.
    u3 browsed the mini-program nine days before (outside the 7-day window), browsed web as anon:c2 (linked),
    ordered on the app; then u3 was merged into u4, who ordered on the app: both orders are u4's, web → app.
    Orders outside [since, until) and non-behaviour events (feedback on another platform) must not count.
    """
    evs = [
        Event("f1", "u1", "delivered", T - H, platform="mini_program"),
        Event("a1", "device:d1", "browse", T + H, platform="app"),
        Event("a2", "u1", "identify", T + 2 * H, platform="app", origin_id="device:d1"),
        Event("a3", "u1", "order", T + D + H, platform="web"),
        Event("a4", "u1", "order", T + 3 * D + H, platform="web"),  # at until: outside
        Event("b0", "u2", "order", T - H, platform="web"),  # before since: outside
        Event("b1", "u2", "browse", T + 3 * H, platform="web"),
        Event("x1", "device:x9", "browse", T + D + H, platform="app"),
        Event("b2", "u2", "order", T + D + 2 * H, platform="web"),
        Event("c0", "u3", "browse", T - 9 * D, platform="mini_program"),
        Event("c1", "anon:c2", "browse", T + D, platform="web"),
        Event("c2", "u3", "order", T + D + 3 * H, platform="app"),
        Event("d1", "u4", "order", T + 2 * D + H, platform="app"),
    ]
    links = [
        Link(T + 2 * H, "device:d1", "u1", "identify", "merged", canonical="u1", seq=1, moved=("device:d1",)),
        Link(T + D, "device:d1", "u1", "implicit", "repeat", canonical="u1"),
        Link(T + D + 1000, "anon:c2", "u3", "implicit", "merged", canonical="u3", seq=2, moved=("anon:c2",)),
        Link(T + D + 2 * H, "device:x9", "u2", "identify", "rejected", reason="conflict", canonical="u2"),
        Link(T + 2 * D, "u3", "u4", "alias", "merged", canonical="u4", seq=3, moved=("anon:c2", "u3")),
        Link(T + 3 * D, "anon:zz", "u2", "identify", "merged", canonical="u2", seq=4, moved=("anon:zz",)),  # at until
    ]
    return evs, links


def day(n: int) -> date:
    return date(2026, 3, 2 + n)


EXPECTED = {
    day(0): (0, 0, math.nan, 0, 0, {}, {"identify/merged": 1}),
    day(1): (3, 2, 2 / 3, 3, 2, {"app → web": 1, "web → app": 1},
             {"identify/rejected": 1, "implicit/merged": 1, "implicit/repeat": 1}),
    day(2): (1, 1, 1.0, 1, 1, {"web → app": 1}, {"alias/merged": 1}),
}


@pytest.mark.parametrize("hashed", [False, True])
def test_cross_platform_counts_journeys_of_canonical_shoppers(client: Client, ch_database: str, hashed: bool) -> None:
    """The expected figures by hand; hashed ids (PII) give the same figures, since they join alike."""
    db = ch_database
    migrate(client, db)
    p = hashing() if hashed else None
    evs, links = history()
    insert_batch(client, db, "events", EVENT_COLUMNS, [event_row(e, p) for e in evs], "e")
    insert_batch(client, db, "identity_links", LINK_COLUMNS, [link_row(x, p) for x in links], "l")
    columns, got = run_query(client, db, "cross_platform", since=T, until=T + 3 * D)
    assert columns == ["day", "orders", "cross_platform_orders", "cross_platform_share", "buyers",
                       "cross_platform_buyers", "journeys", "links"]
    assert [r[0] for r in got] == sorted(EXPECTED)
    for r in got:
        want = EXPECTED[r[0]]
        assert r[1:3] + r[4:] == want[:2] + want[3:], r
        assert r[3] == pytest.approx(want[2], nan_ok=True), r

    # a one-day window: u4's journey no longer reaches back to anon:c2's web visit
    _, short = run_query(client, db, "cross_platform", since=T, until=T + 3 * D, window="1d")
    assert {r[0]: r[1:7] for r in short}[day(2)] == (1, 0, 0.0, 1, 0, {})
    assert {r[0]: r[1:3] for r in short}[day(1)] == (3, 2)  # u1's browse is exactly one day before: included
