"""ClickHouse storage on the real engine (chDB): migrations, TTLs, rollups, retry deduplication, outages, PII."""

from __future__ import annotations

import gc
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from bytewax.testing import run_main
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import OperationalError
from pydantic import ValidationError

from connectors.clickhouse import (
    ACTION_COLUMNS, DECISION_COLUMNS, DLQ_COLUMNS, EVENT_COLUMNS, SNAPSHOT_COLUMNS, ClickHouseWriter, Pii, action_row,
    apply_ttl, batch_token, connect, decision_row, dlq_row, event_row, insert_batch, migrate, snapshot_row,
)
from connectors.migrations import TTL_COLUMNS
from connectors.stopping import STOPPING, StoppedWaiting
from flows.common import clickhouse_dsn
from flows.main import build
from nudgeflow.configload import deployment
from nudgeflow.events import Action, DeadLetter, Decision, Event
from nudgeflow.settings import ClickHouseConfig, PiiConfig, Settings
from operators.features import UserFeatures
from tests.helpers import CART_AND_BIG_SPENDER, dead_endpoint

CONFIG_DIR = Path(__file__).parents[1] / "config"

T0 = 1_700_003_700_000  # 2023-11-14 23:15 UTC: the 90 minutes below cross midnight, so two daily partitions
MIN = 60_000
TYPES = ["browse", "add_to_cart", "order", "search"]
PLATFORMS = ["web", "app", ""]
TRIGGERS = ["cart_abandonment", "big_spender"]
OUTCOMES = [("fired", ""), ("suppressed", "cooldown"), ("suppressed", "frequency_cap"), ("holdout", "")]
REASONS = ["malformed_json", "missing_field", "too_late"]


@pytest.fixture
def client(chdb_path: Path, ch_database: str) -> Iterator[Client]:
    c = connect(f"chdb://{chdb_path}")
    migrate(c, ch_database)
    try:
        yield c
    finally:
        c.command(f"DROP DATABASE IF EXISTS {ch_database}")
        c.close()


def one(c: Client, sql: str) -> object:
    return c.query(sql).result_rows[0][0]


def events(n: int, seed: int = 1) -> list[Event]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        etype = rnd.choice(TYPES)
        props = {"amount": round(rnd.uniform(1, 200), 2)} if etype == "order" else {"item_id": f"i{rnd.randrange(9)}"}
        out.append(Event(f"e{seed}-{i}", f"u{rnd.randrange(20)}", etype, T0 + rnd.randrange(90 * MIN),
                         platform=rnd.choice(PLATFORMS) or None, props=props, ingest_ms=T0 + 95 * MIN))
    return out


def decisions(n: int, seed: int = 2) -> list[Decision]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        ts = T0 + rnd.randrange(90 * MIN)
        ingest = ts + rnd.randrange(5_000)
        a = Action(f"a{seed}-{i}", rnd.choice(TRIGGERS), f"u{rnd.randrange(20)}", "email", f"e{i}", ts, ingest,
                   ingest + rnd.randrange(1, 300), {}, {"template": "t"}, variant=rnd.choice(["", "b"]))
        out.append(Decision(a, *rnd.choice(OUTCOMES)))
    return out


def dead_letters(n: int, seed: int = 3) -> list[DeadLetter]:
    rnd = random.Random(seed)
    return [DeadLetter(rnd.choice(REASONS), "why", b"{", f"f:{i}", T0 + rnd.randrange(90 * MIN)) for i in range(n)]


def minute(ms: int) -> int:
    return ms // MIN * 60


def rollups(c: Client, db: str) -> dict[str, list[tuple]]:
    """Everything the rollups hold, merged per key: what a dashboard reads."""
    q = {
        "events_per_minute": f"SELECT toUnixTimestamp(minute), type, platform, sum(events), round(sum(revenue), 6) "
                  f"FROM {db}.events_per_minute GROUP BY ALL ORDER BY ALL",
        "decisions_per_minute": f"SELECT toUnixTimestamp(minute), trigger_id, outcome, reason, sum(decisions) "
                     f"FROM {db}.decisions_per_minute GROUP BY ALL ORDER BY ALL",
        "fire_latency_per_minute": f"SELECT toUnixTimestamp(minute), trigger_id, quantilesMerge(0.5, 0.9, 0.99)(latency_event_ms), "
                   f"quantilesMerge(0.5, 0.9, 0.99)(latency_ingest_ms) FROM {db}.fire_latency_per_minute "
                   f"GROUP BY ALL ORDER BY ALL",
        "dlq_per_minute": f"SELECT toUnixTimestamp(minute), reason, sum(dead_letters) FROM {db}.dlq_per_minute GROUP BY ALL ORDER BY ALL",
    }
    return {k: [tuple(r) for r in c.query(sql).result_rows] for k, sql in q.items()}


def schema(c: Client, db: str) -> dict[str, str]:
    return dict(c.query(f"SELECT name, create_table_query FROM system.tables WHERE database = '{db}'").result_rows)


def write(cfg: ClickHouseConfig, dsn: str, evs: list[Event], decs: list[Decision], dead: list[DeadLetter]) -> None:
    """Through the flow's writer, in many small batches."""
    writer = ClickHouseWriter(cfg.model_copy(update={"dsn": dsn}))
    try:
        for i in range(0, max(len(evs), len(decs), len(dead)), 37):
            writer.put("events", EVENT_COLUMNS, [event_row(e) for e in evs[i:i + 37]])
            writer.put("decisions", DECISION_COLUMNS, [decision_row(d) for d in decs[i:i + 37]])
            writer.put("dlq", DLQ_COLUMNS, [dlq_row(d) for d in dead[i:i + 37]])
    finally:
        writer.close()


# -- migrations and TTL


def test_migrations_are_idempotent_and_ttls_follow_the_config(chdb_path: Path, ch_database: str) -> None:
    c = connect(f"chdb://{chdb_path}")
    db = ch_database
    try:
        ttl = {"events": 90 * 86400.0, "events_per_minute": 400 * 86400.0, "feature_snapshots": 3600.0}
        assert len(migrate(c, db, ttl)) >= 7
        before = schema(c, db)
        assert {"feature_snapshots", "events_per_minute_mv", "fire_latency_per_minute", "dlq_per_minute"} <= set(before)
        assert "TTL toDateTime(ts) + toIntervalSecond(7776000)" in before["events"]
        assert "TTL toDateTime(slot) + toIntervalSecond(3600)" in before["feature_snapshots"]
        assert "TTL" not in before["dlq"]
        assert "non_replicated_deduplication_window = 1000" in before["decisions"]
        mutations = one(c, f"SELECT count() FROM system.mutations WHERE database = '{db}'")

        # applying again changes nothing: no migration, no ALTER (a TTL change would rewrite parts)
        assert migrate(c, db, ttl) == []
        assert schema(c, db) == before
        assert one(c, f"SELECT count() FROM system.mutations WHERE database = '{db}'") == mutations

        # every statement is idempotent: re-running all of them (a crash before their record) changes nothing
        c.command(f"TRUNCATE TABLE {db}.schema_migrations")
        assert len(migrate(c, db, ttl)) >= 7
        assert schema(c, db) == before

        # the config is the truth: a changed retention is altered, a removed one removed
        assert set(apply_ttl(c, db, {"events": 30 * 86400.0})) == {"events", "events_per_minute", "feature_snapshots"}
        after = schema(c, db)
        assert "TTL toDateTime(ts) + toIntervalSecond(2592000)" in after["events"]
        assert "TTL" not in after["events_per_minute"] and "TTL" not in after["feature_snapshots"]
    finally:
        c.command(f"DROP DATABASE IF EXISTS {db}")
        c.close()


def test_ttl_config_names_known_tables() -> None:
    ttl = ClickHouseConfig.model_validate({"ttl": {"events": "90d", "dlq_per_minute": "365d"}}).ttl
    assert ttl == {"events": 90 * 86400.0, "dlq_per_minute": 365 * 86400.0}
    with pytest.raises(ValidationError, match="unknown tables"):
        ClickHouseConfig.model_validate({"ttl": {"event": "90d"}})
    with pytest.raises(ValidationError, match="at least 1s"):
        ClickHouseConfig.model_validate({"ttl": {"events": 0}})


def test_every_table_with_a_ttl_column_exists(client: Client, ch_database: str) -> None:
    tables = set(schema(client, ch_database))
    assert set(TTL_COLUMNS) <= tables


def test_every_table_cleans_up_replaced_parts_within_30_s(client: Client, ch_database: str) -> None:
    """Else replaced parts pile up for five minutes between cleanups, in the flow's memory (009)."""
    tables = schema(client, ch_database)
    assert [t for t in TTL_COLUMNS if "max_cleanup_delay_period = 30" not in tables[t]] == []


# -- rollups


def test_rollups_equal_an_independent_count(client: Client, chdb_path: Path, ch_database: str) -> None:
    evs, decs, dead = events(700), decisions(400), dead_letters(150)
    write(ClickHouseConfig(database=ch_database, batch_rows=50, flush_interval=0.05), f"chdb://{chdb_path}", evs, decs, dead)

    ev_count: Counter[tuple] = Counter()
    revenue: defaultdict[tuple, float] = defaultdict(float)
    for e in evs:
        key = (minute(e.ts), e.type, e.platform or "")
        ev_count[key] += 1
        revenue[key] += e.props["amount"] if e.type == "order" else 0.0
    dec_count = Counter((minute(d.action.event_ts), d.action.trigger_id, d.outcome, d.reason) for d in decs)
    latencies: defaultdict[tuple, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
    for d in decs:
        if d.outcome == "fired":
            a = d.action
            latencies[(minute(a.event_ts), a.trigger_id)][0].append(a.decided_ms - a.event_ts)
            latencies[(minute(a.event_ts), a.trigger_id)][1].append(a.decided_ms - a.ingest_ms)
    dlq_count = Counter((minute(d.ingest_ms), d.reason) for d in dead)

    got = rollups(client, ch_database)
    assert [r[:4] for r in got["events_per_minute"]] == sorted((*k, n) for k, n in ev_count.items())
    assert [r[4] for r in got["events_per_minute"]] == pytest.approx([revenue[k] for k in sorted(ev_count)])
    assert got["decisions_per_minute"] == sorted((*k, n) for k, n in dec_count.items())
    assert got["dlq_per_minute"] == sorted((*k, n) for k, n in dlq_count.items())
    assert [r[:2] for r in got["fire_latency_per_minute"]] == sorted(latencies)
    for m, trigger, by_event, by_ingest in got["fire_latency_per_minute"]:
        want = latencies[(m, trigger)]
        assert by_event == pytest.approx(quantiles(want[0])) and by_ingest == pytest.approx(quantiles(want[1]))
    # and the base tables hold each row once
    assert one(client, f"SELECT count() FROM {ch_database}.events FINAL") == len(evs)


def quantiles(values: list[int], levels: tuple[float, ...] = (0.5, 0.9, 0.99)) -> list[float]:
    """Linear interpolation between the closest ranks: ClickHouse's ``quantiles`` below 8192 values."""
    s = sorted(values)
    out = []
    for q in levels:
        pos = q * (len(s) - 1)
        lo = int(pos)
        out.append(s[lo] + (pos - lo) * (s[min(lo + 1, len(s) - 1)] - s[lo]))
    return out


def test_feedback_joins_actions_through_the_materialized_action_id(client: Client, ch_database: str) -> None:
    db = ch_database
    decs = [d for d in decisions(30) if d.outcome == "fired"]
    acts = [d.action for d in decs]
    feedback = [Event(f"f{i}", a.user_id, kind, a.decided_ms + 1000, props={"action_id": a.action_id})
                for i, a in enumerate(acts) for kind in (("delivered", "opened") if i % 2 else ("delivered",))]
    other = Event("x", "u1", "browse", T0, props={"action_id": "not-feedback"})
    insert_batch(client, db, "actions", ACTION_COLUMNS, [action_row(a) for a in acts], "t1")
    insert_batch(client, db, "events", EVENT_COLUMNS, [event_row(e) for e in [*feedback, other]], "t2")

    rows = client.query(f"SELECT action_id, variant, status FROM {db}.actions FINAL ORDER BY action_id").result_rows
    assert rows == sorted((a.action_id, a.variant, "sent") for a in acts)
    joined = client.query(
        f"SELECT a.action_id, countIf(e.type = 'opened') FROM {db}.actions AS a FINAL "
        f"LEFT JOIN {db}.events AS e FINAL ON e.action_id = a.action_id GROUP BY a.action_id ORDER BY a.action_id"
    ).result_rows
    assert joined == sorted((a.action_id, i % 2) for i, a in enumerate(acts))
    # the column is only for feedback; the props stay whole, so extracting from them works as before
    assert one(client, f"SELECT action_id FROM {db}.events WHERE event_id = 'x'") == ""
    assert one(client, f"SELECT countIf(JSONExtractString(props, 'action_id') = action_id) FROM {db}.events "
                       f"WHERE type IN ('delivered', 'opened')") == len(feedback)


# -- retries


def test_a_retried_batch_is_stored_and_counted_once(client: Client, ch_database: str) -> None:
    """A retry resends the batch with the same token (the first attempt stored it, its answer was lost):
    the base table and every rollup are unchanged. The batch spans two days, so two partitions."""
    db = ch_database
    batches = {
        "events": (EVENT_COLUMNS, [event_row(e) for e in events(300)]),
        "decisions": (DECISION_COLUMNS, [decision_row(d) for d in decisions(200)]),
        "dlq": (DLQ_COLUMNS, [dlq_row(d) for d in dead_letters(80)]),
    }

    def send(token_of: str = "") -> dict[str, object]:
        for table, (columns, rows) in batches.items():
            insert_batch(client, db, table, columns, rows, batch_token(table + token_of, rows))
        counts = {t: one(client, f"SELECT count() FROM {db}.{t}") for t in batches}  # no FINAL: every stored row
        return {**counts, **rollups(client, db)}

    first = send()
    assert (first["events"], first["decisions"], first["dlq"]) == (300, 200, 80)
    assert one(client, f"SELECT uniqExact(partition) FROM system.parts WHERE database = '{db}' AND table = 'events'") == 2
    assert send() == first  # the retry: nothing stored twice, no rollup moved
    assert batch_token("events", batches["events"][1]) == batch_token("events", list(batches["events"][1]))
    # control: the same rows as a new batch (another token) are counted again, so the token is what held
    again = send(token_of="-new")
    assert again["decisions"] == 2 * first["decisions"]
    assert sum(r[4] for r in again["decisions_per_minute"]) == 2 * sum(r[4] for r in first["decisions_per_minute"])  # type: ignore[union-attr]


# -- outages


def test_an_outage_holds_the_flow_back_and_loses_nothing(client: Client, chdb_path: Path, ch_database: str) -> None:
    """ClickHouse refuses connections for a while: the writer buffers up to ``max_buffer_rows``, then
    ``put`` blocks (the flow is held back); when it answers again every row arrives exactly once."""
    down = threading.Event()
    down.set()
    dead, live = dead_endpoint(), f"chdb://{chdb_path}"
    attempts: Counter[str] = Counter()

    def factory() -> Client:
        """The real client on the real path: a dead endpoint during the outage, then the live engine."""
        attempts["down" if down.is_set() else "up"] += 1
        return connect(dead if down.is_set() else live)

    cfg = ClickHouseConfig(database=ch_database, batch_rows=10, flush_interval=0.02, max_buffer_rows=50)
    writer = ClickHouseWriter(cfg, client_factory=factory)
    evs = events(200, seed=7)
    done = [0]

    def produce() -> None:
        for i in range(0, len(evs), 10):
            writer.put("events", EVENT_COLUMNS, [event_row(e) for e in evs[i:i + 10]])
            done[0] += 10

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        deadline = time.monotonic() + 10
        while attempts["down"] < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert attempts["down"] >= 3 and writer.failures >= 3
        assert producer.is_alive() and done[0] == 50 and writer.buffered == 50  # held back at the bound
        with pytest.raises(OperationalError):
            connect(dead)
        assert one(client, f"SELECT count() FROM {ch_database}.events") == 0
    finally:
        down.clear()
        producer.join(timeout=30)
        writer.close()
    assert not producer.is_alive() and done[0] == 200 and writer.buffered == 0
    db = ch_database
    assert one(client, f"SELECT count() FROM {db}.events") == 200  # no FINAL: no row twice
    assert one(client, f"SELECT uniqExact(event_id) FROM {db}.events") == 200
    assert one(client, f"SELECT sum(events) FROM {db}.events_per_minute") == 200


def test_a_stop_during_an_outage_ends_the_waits_for_clickhouse(ch_database: str) -> None:
    """ClickHouse is away: an epoch's end waits for its rows (``store``) as long as the writer retries; a stop
    request (SIGINT, :mod:`connectors.stopping`) ends that wait and the final flush instead of hanging."""
    cfg = ClickHouseConfig(database=ch_database, batch_rows=1_000_000, flush_interval=3600)
    writer = ClickHouseWriter(cfg, client_factory=lambda: connect(dead_endpoint()))
    writer.put("events", EVENT_COLUMNS, [event_row(e) for e in events(50, seed=5)])
    outcome: list[BaseException | None] = []

    def epoch_end() -> None:
        try:
            writer.store("events")
            outcome.append(None)
        except StoppedWaiting as e:
            outcome.append(e)

    waiter = threading.Thread(target=epoch_end)
    waiter.start()
    try:
        time.sleep(1.0)
        assert waiter.is_alive() and writer.failures >= 2  # held back while the writer retries
        STOPPING.set()
        waiter.join(timeout=5)
        t = time.monotonic()
        writer.close()
        assert time.monotonic() - t < 5
    finally:
        STOPPING.clear()
    assert not waiter.is_alive() and isinstance(outcome[0], StoppedWaiting)
    assert writer.inserted == 0 and writer.buffered == 0


def test_buffered_and_inserted_rows_leave_nothing_for_the_cyclic_collector(
    client: Client, chdb_path: Path, ch_database: str,
) -> None:
    """Rows waiting for their insert, and rows inserted, are not objects the cyclic collector must scan: a
    row per object made each young collection scan a second of rows, and clickhouse-connect's insert
    context (a reference cycle) kept inserted rows alive until a collection (pauses of 260 ms)."""
    cfg = ClickHouseConfig(database=ch_database, dsn=f"chdb://{chdb_path}", batch_rows=1_000_000, flush_interval=3600)
    writer = ClickHouseWriter(cfg)
    evs = events(2_100, seed=11)
    writer.put("events", EVENT_COLUMNS, [event_row(e) for e in evs[:100]])
    writer.flush()  # the client's first insert loads the server's settings
    gc.collect()
    gc.disable()
    try:
        before = len(gc.get_objects())
        for i in range(100, len(evs), 100):
            writer.put("events", EVENT_COLUMNS, [event_row(e) for e in evs[i:i + 100]])
        buffered = len(gc.get_objects()) - before
        writer.flush()
        inserted = len(gc.get_objects()) - before
    finally:
        gc.enable()
        writer.close()
    assert one(client, f"SELECT count() FROM {ch_database}.events") == 2_100
    assert buffered < 100, f"{buffered} objects tracked for 2,000 buffered rows"
    assert inserted < 100, f"{inserted} objects tracked after inserting 2,000 rows"


# -- PII


SALT = "pepper-0123456789abcdef"


def pii(**kw: object) -> Pii:
    p = Pii.of(PiiConfig.model_validate({"salt": SALT, **kw}))
    assert p is not None
    return p


def test_pii_is_hashed_or_dropped_in_every_row() -> None:
    p = pii(hash=["user_id", "props.email", "payload.email"], drop=["props.address"])
    ev = Event("e1", "alice", "identify", T0, props={"email": "a@x.io", "address": "1 Main St", "tier": "gold"})
    row = dict(zip(EVENT_COLUMNS, event_row(ev, p)))
    props = orjson.loads(row["props"])
    uid = row["user_id"]
    assert uid != "alice" and len(uid) == 32 and uid == p.digest("alice")
    assert props == {"email": p.digest("a@x.io"), "tier": "gold"}
    assert ev.props["address"] == "1 Main St"  # the event itself is untouched: later steps still see it

    a = Action("a1", "welcome", "alice", "email", "e1", T0, T0, T0, {}, {"email": "a@x.io", "coupon": "W10"})
    arow = dict(zip(ACTION_COLUMNS, action_row(a, p)))
    assert arow["user_id"] == uid and orjson.loads(arow["payload"]) == {"email": p.digest("a@x.io"), "coupon": "W10"}
    assert dict(zip(DECISION_COLUMNS, decision_row(Decision(a, "fired", ""), p)))["user_id"] == uid
    srow = dict(zip(SNAPSHOT_COLUMNS, snapshot_row((T0, UserFeatures("alice", T0, {"views_1h": 3})), p)))
    assert srow["user_id"] == uid and orjson.loads(srow["features"]) == {"views_1h": 3}

    # dead letters: a JSON record is scrubbed like the event; anything else cannot be, so it is left out
    raw = orjson.dumps({"event_id": "e1", "user_id": "alice", "type": "x", "props": {"email": "a@x.io", "address": "a"}})
    drow = dict(zip(DLQ_COLUMNS, dlq_row(DeadLetter("unknown_type", "", raw, "f:1", T0), p)))
    assert orjson.loads(drow["raw"]) == {"event_id": "e1", "user_id": uid, "type": "x", "props": {"email": p.digest("a@x.io")}}
    assert dlq_row(DeadLetter("malformed_json", "", b'{"user_id": "alice", ', "f:2", T0), p)[4] == b""
    assert dlq_row(DeadLetter("not_an_object", "", b'["alice"]', "f:3", T0), p)[4] == b""

    # keyed: another salt gives other hashes; only hashing user_id leaves props alone
    other = Pii.of(PiiConfig(hash=["user_id"], salt="another-salt-0123456789"))  # type: ignore[arg-type]
    assert other is not None and other.user("alice") != uid
    assert orjson.loads(event_row(ev, other)[8]) == ev.props


def test_without_pii_config_rows_are_unchanged() -> None:
    assert Pii.of(None) is None and Pii.of(PiiConfig()) is None
    ev = Event("e1", "alice", "browse", T0, props={"email": "a@x.io"})
    assert event_row(ev) == event_row(ev, None)
    assert event_row(ev)[1] == "alice" and orjson.loads(event_row(ev)[8]) == {"email": "a@x.io"}


def test_pii_config_is_checked() -> None:
    with pytest.raises(ValidationError, match="at least 16 characters"):
        PiiConfig.model_validate({"hash": ["user_id"]})
    with pytest.raises(ValidationError, match="cannot be dropped"):
        PiiConfig.model_validate({"drop": ["user_id"]})
    with pytest.raises(ValidationError, match="props.<key>"):
        PiiConfig.model_validate({"drop": ["email"]})
    with pytest.raises(ValidationError, match="both hashed and dropped"):
        PiiConfig.model_validate({"hash": ["props.email"], "drop": ["props.email"], "salt": SALT})
    with pytest.raises(ValidationError) as e:
        PiiConfig.model_validate({"hash": ["user_id"], "salt": "short"})
    assert "short" not in str(e.value)
    assert PiiConfig.model_validate({"drop": ["props.address"]}).drop == ["props.address"]  # no salt needed


def test_pii_reaches_clickhouse_hashed_and_joins(client: Client, ch_database: str) -> None:
    """Hashed ids still join events to actions and count users."""
    p = pii(hash=["user_id", "props.email"])
    evs = [Event(f"e{i}", f"u{i % 3}", "browse", T0 + i, props={"email": f"u{i % 3}@x.io"}) for i in range(9)]
    acts = [Action(f"a{i}", "t", f"u{i}", "email", f"e{i}", T0, T0, T0, {}, {}) for i in range(3)]
    insert_batch(client, ch_database, "events", EVENT_COLUMNS, [event_row(e, p) for e in evs], "p1")
    insert_batch(client, ch_database, "actions", ACTION_COLUMNS, [action_row(a, p) for a in acts], "p2")
    db = ch_database
    assert one(client, f"SELECT countIf(user_id LIKE 'u%' OR props LIKE '%@x.io%') FROM {db}.events") == 0
    assert one(client, f"SELECT uniqExact(user_id) FROM {db}.events") == 3
    assert one(client, f"SELECT count() FROM {db}.events AS e INNER JOIN {db}.actions AS a ON a.user_id = e.user_id") == 9


def test_a_durable_table_output_stores_every_row_once_from_every_worker(client: Client, chdb_path: Path,
                                                                        ch_database: str) -> None:
    """With recovery on, a table's rows go to the worker of the table's one partition as a list an upstream
    batch: spread over two workers, small batches, every row is stored exactly once."""
    import bytewax.operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.testing import TestingSource, cluster_main

    from flows.common import table_output

    dead = [DeadLetter(REASONS[i % 3], "", f"{{{i}".encode(), f"p:0:{i}", T0 + i) for i in range(2_000)]
    writer = ClickHouseWriter(ClickHouseConfig(dsn=f"chdb://{chdb_path}", database=ch_database))
    flow = Dataflow("durable_rows")
    spread = op.redistribute("spread", op.input("in", flow, TestingSource(dead, batch_size=7)))
    table_output(writer, durable=True)("dlq_ch", spread, "dlq", DLQ_COLUMNS, dlq_row)
    try:
        cluster_main(flow, [], 0, worker_count_per_proc=2)
    finally:
        writer.close()
    assert one(client, f"SELECT count() FROM {ch_database}.dlq") == 2_000
    assert one(client, f"SELECT uniqExact(position) FROM {ch_database}.dlq") == 2_000


# -- the main flow


def test_main_flow_writes_sampled_snapshots_rollups_and_scrubbed_rows(
    redis_url: str, key_prefix: str, chdb_path: Path, ch_database: str, tmp_path: Path
) -> None:
    (tmp_path / "triggers.yaml").write_text(CART_AND_BIG_SPENDER)
    settings = Settings.model_validate({
        "source": {"kind": "simulator", "simulator": {"users": 80, "events": 3000, "partitions": 2, "seed": 3}},
        "redis": {"url": redis_url, "key_prefix": key_prefix, "ttl": "1h"},
        "clickhouse": {"chdb_path": str(chdb_path), "database": ch_database, "ttl": {"events": "400d"},
                       "feature_snapshot_every": "10m",
                       "pii": {"hash": ["user_id"], "drop": ["props.category"], "salt": SALT}},
        "actions": {"kind": "file", "path": str(tmp_path / "actions.jsonl")},
        "dlq": {"kind": "file", "path": str(tmp_path / "dlq.jsonl")},
        "triggers": str(tmp_path / "triggers.yaml"),
        "features": {"definitions": str(CONFIG_DIR / "features.yaml")},
    })
    flow, rt = build(deployment(settings, tmp_path))
    try:
        run_main(flow)
    finally:
        rt.close()

    c = connect(clickhouse_dsn(settings, tmp_path))
    db = ch_database
    q = lambda sql: one(c, sql.format(db=db))
    try:
        events_stored = q("SELECT count() FROM {db}.events FINAL")
        assert events_stored > 2000
        assert q("SELECT sum(events) FROM {db}.events_per_minute") == events_stored
        assert q("SELECT sum(decisions) FROM {db}.decisions_per_minute") == q("SELECT count() FROM {db}.decisions")
        # snapshots: sampled (far fewer than publications), one per user and slot, within the slot
        snaps = q("SELECT count() FROM {db}.feature_snapshots")
        assert 0 < snaps < events_stored / 2
        assert q("SELECT uniqExact(user_id, slot) FROM {db}.feature_snapshots") == snaps
        assert q("SELECT countIf(ts < slot OR ts >= slot + INTERVAL 10 MINUTE) FROM {db}.feature_snapshots") == 0
        assert q("SELECT countIf(JSONHas(features, 'events_1h')) FROM {db}.feature_snapshots") == snaps
        # PII: hashed ids everywhere, the same hash in every table; dropped props gone
        assert q("SELECT countIf(length(user_id) != 32) FROM {db}.events") == 0
        assert q("SELECT countIf(user_id NOT IN (SELECT user_id FROM {db}.events)) FROM {db}.feature_snapshots") == 0
        assert q("SELECT countIf(JSONHas(props, 'category')) FROM {db}.events") == 0
        assert "TTL toDateTime(ts) + toIntervalSecond(34560000)" in schema(c, db)["events"]
    finally:
        c.close()
