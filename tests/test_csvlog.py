"""CSV replay of public logs: the shipped Taobao and REES46 mappings give exact events, bad rows dead letters
with their original line, a resume continues at the byte offset, and the feature flow reads it end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from bytewax.testing import run_main

from connectors import files
from connectors.csvlog import CsvMapper, CsvMapping, CsvSource, CsvSourceConfig
from connectors.redis_store import FeatureReader
from flows.features import build as build_features
from nudgeflow.configload import deployment, load_csv_mapping, load_deployment
from nudgeflow.events import DeadLetter, Event
from nudgeflow.settings import EventsConfig, Settings
from nudgeflow.yamlconf import ConfigError
from operators.parse import Parser, Raw

CONFIG = Path(__file__).parents[1] / "config"
NOW = 1_700_000_000_000
T0 = 1_511_544_070  # 2017-11-24T17:21:10Z, inside the Taobao log's span
TAOBAO_TYPES = {"pv": "browse", "cart": "add_to_cart", "fav": "favourite", "buy": "order"}
CART = {"quantity": 1, "price": 0.0, "currency": "USD"}


def mapping(name: str) -> CsvMapping:
    return load_csv_mapping(f"datasets/{name}.yaml", lambda p: CONFIG / p, EventsConfig())


def read_all(src: CsvSource) -> list[Raw]:
    out: list[Raw] = []
    for key in src.list_parts():
        part = src.build_part("in", key, None)
        try:
            while True:
                out += part.next_batch()
        except StopIteration:
            pass
        finally:
            part.close()
    return out


def replay(path: Path, m: CsvMapping) -> list[Event | DeadLetter]:
    return CsvMapper(m).parse_batch(Parser(EventsConfig(), now_ms=lambda: NOW), read_all(CsvSource([path], m)))


def event_tuple(e: Event | DeadLetter) -> tuple[Any, ...]:
    assert isinstance(e, Event), e
    return (e.event_id, e.user_id, e.type, e.ts, e.session_id, e.platform, e.props, e.position, e.raw)


def dead_tuple(d: Event | DeadLetter) -> tuple[str, str, bytes]:
    assert isinstance(d, DeadLetter), d
    return (d.position, d.reason, d.raw)


def taobao_rows() -> list[tuple[str, str, str, str, int]]:
    """Four shoppers, six actions each, a minute apart: every behaviour, and a buy per shopper."""
    cycle = ["pv", "pv", "fav", "cart", "pv", "buy"]
    return [(str(100 + u), str(5000 + 10 * u + k % 3), str(700 + u), beh, T0 + 3600 * u + 60 * k)
            for u in range(4) for k, beh in enumerate(cycle)]


BAD_TAOBAO = [  # (line bytes, reason)
    (b"100,5000,700", "malformed_row"),
    (b"100,5000,700,pv,1511544070,extra", "malformed_row"),
    (b"100,5000,700,pv,yesterday", "invalid_field"),
    (b"100,5000,700,share,1511544070", "unknown_type"),
    (b',5000,700,pv,1511544070', "invalid_field"),  # no user: the parser refuses it
    (b'100,"5000,700,pv,1511544070', "malformed_row"),  # an unterminated quote
    (b"100,5000,700,pv,\xff", "malformed_row"),
    (b"100,5000,700,pv,1e300", "invalid_field"),
]


def write_taobao(path: Path) -> tuple[list[tuple[int, tuple[str, str, str, str, int]]], list[tuple[int, bytes, str]]]:
    """The good rows with their line numbers; bad rows and a blank line interleaved."""
    good, bad, lines = [], [], []
    for i, row in enumerate(taobao_rows()):
        if i % 3 == 1 and len(bad) < len(BAD_TAOBAO):
            raw, reason = BAD_TAOBAO[len(bad)]
            lines.append(raw)
            bad.append((len(lines), raw, reason))
        if i == 10:
            lines.append(b"")
        lines.append(",".join(map(str, row)).encode())
        good.append((len(lines), row))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return good, bad


def test_taobao_rows_become_exact_events_and_bad_rows_dead_letters(tmp_path: Path) -> None:
    path = tmp_path / "taobao.csv"
    good, bad = write_taobao(path)
    out = replay(path, mapping("taobao"))
    assert len(out) == len(good) + len(bad)  # the blank line is skipped, every other line answers once

    expected = []
    for line, (user, item, cat, beh, sec) in good:
        etype = TAOBAO_TYPES[beh]
        props: dict[str, Any] = {"item_id": item, "category": cat}
        if etype == "add_to_cart":
            props |= CART
        if etype == "order":
            props |= {"items": [{"quantity": 1, "item_id": item, "price": 0.0}], "amount": 0.0, "currency": "USD",
                      "item_count": 1}
        raw = f"{user},{item},{cat},{beh},{sec}".encode()
        position = f"{path}:{line}"
        expected.append((f"taobao:taobao.csv:{line}", user, etype, sec * 1000, None, None, props, position, raw))
    assert [event_tuple(e) for e in out if isinstance(e, Event)] == expected
    assert {e.type for e in out if isinstance(e, Event)} == set(TAOBAO_TYPES.values())

    dead = [d for d in out if isinstance(d, DeadLetter)]
    assert [dead_tuple(d) for d in dead] == [(f"{path}:{line}", reason, raw) for line, raw, reason in bad]
    assert all(d.detail and d.ingest_ms == NOW for d in dead)
    details = {d.raw: d.detail for d in dead}
    assert details[b"100,5000,700"] == "expected 5 columns, got 3"
    assert details[b"100,5000,700,pv,yesterday"] == "ts: 'yesterday' is not epoch_s"
    assert "'share'" in details[b"100,5000,700,share,1511544070"]

    again = replay(path, mapping("taobao"))  # ids and everything else are the same on every replay
    assert [event_tuple(e) for e in again if isinstance(e, Event)] == expected


REES46_HEADER = b"event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session"
REES46_GOOD = [
    b"2019-10-01 00:00:00 UTC,view,44600062,2103807459595387724,,shiseido,35.79,541312140,72d76fde",
    b"2019-10-01 00:00:05 UTC,cart,3900821,2053013552326770905,appliances.environment.water_heater,aqua,33.20,"
    b"554748717,9333dfbd",
    b"2019-10-01 00:00:09 UTC,remove_from_cart,3900821,2053013552326770905,,,33.20,554748717,9333dfbd",
    b"2019-10-01 00:01:00 UTC,purchase,3900821,2053013552326770905,,aqua,33.20,554748717,9333dfbd",
    b'2019-10-01 00:02:00 UTC,view,1004237,2053013555631882655,"electronics,smartphone",apple,1081.98,535871217,',
]
REES46_BAD = [
    (b"2019-10-01 00:03:00 UTC,view,1,2,,,abc,5,s", "invalid_field"),
    (b"2019-10-01T00:03:00,view,1,2,,,1.0,5,s", "invalid_field"),
    (b"2019-10-01 00:03:00 UTC,wishlist,1,2,,,1.0,5,s", "unknown_type"),
    (b"2019-10-01 00:03:00 UTC,view,1,2", "malformed_row"),
    (b"2019-10-01 00:03:00 UTC,purchase,1,2,,,-5.0,5,s", "invalid_field"),  # the parser refuses a negative amount
    (b"2019-10-01 00:03:00 UTC,view,1,2,,,nan,5,s", "invalid_field"),
]
OCT1 = 1_569_888_000_000  # 2019-10-01T00:00:00Z


def test_rees46_rows_with_a_header_sessions_prices_and_orders(tmp_path: Path) -> None:
    path = tmp_path / "2019-Oct.csv"
    path.write_bytes(b"\xef\xbb\xbf" + REES46_HEADER + b"\r\n" + b"\r\n".join(REES46_GOOD + [r for r, _ in REES46_BAD]))
    out = replay(path, mapping("rees46"))
    events = [event_tuple(e)[:7] for e in out if isinstance(e, Event)]
    cart = {"item_id": "3900821", "category": "2053013552326770905", "price": 33.2, "quantity": 1, "currency": "USD"}
    assert events == [
        ("rees46:2019-Oct.csv:2", "541312140", "browse", OCT1, "72d76fde", None,
         {"item_id": "44600062", "category": "2103807459595387724", "brand": "shiseido", "price": 35.79}),
        ("rees46:2019-Oct.csv:3", "554748717", "add_to_cart", OCT1 + 5000, "9333dfbd", None,
         {**cart, "category_code": "appliances.environment.water_heater", "brand": "aqua"}),
        ("rees46:2019-Oct.csv:4", "554748717", "remove_from_cart", OCT1 + 9000, "9333dfbd", None, cart),
        ("rees46:2019-Oct.csv:5", "554748717", "order", OCT1 + 60_000, "9333dfbd", None,
         {"item_id": "3900821", "category": "2053013552326770905", "brand": "aqua", "amount": 33.2, "currency": "USD",
          "items": [{"quantity": 1, "item_id": "3900821", "price": 33.2}], "item_count": 1}),
        ("rees46:2019-Oct.csv:6", "535871217", "browse", OCT1 + 120_000, None, None,
         {"item_id": "1004237", "category": "2053013555631882655", "category_code": "electronics,smartphone",
          "brand": "apple", "price": 1081.98}),
    ]
    assert [e.raw for e in out if isinstance(e, Event)] == REES46_GOOD  # without the \r
    first_bad = len(REES46_GOOD) + 2
    assert [dead_tuple(d) for d in out if isinstance(d, DeadLetter)] == [
        (f"{path}:{first_bad + i}", reason, raw) for i, (raw, reason) in enumerate(REES46_BAD)
    ]
    details = [d.detail for d in out if isinstance(d, DeadLetter)]
    assert details[0] == "props.price: 'abc' is not a finite number"
    assert details[1] == "ts: '2019-10-01T00:03:00' is not %Y-%m-%d %H:%M:%S UTC"


def test_a_header_that_does_not_match_the_mapping_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.csv"
    path.write_bytes(b"event_time,event_type,product_id\n2019-10-01 00:00:00 UTC,view,1\n")
    with pytest.raises(ConfigError) as e:
        CsvSource([path], mapping("rees46"))
    assert str(e.value).startswith(f"{path}:1: header: expected the mapping's columns")


def test_a_resume_continues_at_the_byte_offset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "2019-Oct.csv"
    path.write_bytes(REES46_HEADER + b"\n" + b"\n".join(REES46_GOOD) + b"\n")
    src = CsvSource([path], mapping("rees46"))
    whole = read_all(src)
    monkeypatch.setattr(files, "BATCH_LINES", 2)
    part = src.build_part("in", str(path), None)
    first = part.next_batch()
    state = part.snapshot()
    part.close()
    assert state == (len(REES46_HEADER) + 1 + len(REES46_GOOD[0]) + 1 + len(REES46_GOOD[1]) + 1, 3)
    resumed = src.build_part("in", str(path), state)  # the header is not skipped again mid-file
    rest: list[Raw] = []
    try:
        while True:
            rest += resumed.next_batch()
    except StopIteration:
        resumed.close()
    assert first + rest == whole and len(whole) == len(REES46_GOOD)


def test_mapping_errors_name_the_file_line_and_field(tmp_path: Path) -> None:
    text = (CONFIG / "datasets" / "taobao.yaml").read_text()
    bad = (text.replace("type: behavior", "type: behaviour").replace("fav: favourite", "fav: favorite")
           .replace("ts_format: epoch_s", "ts_format: seconds"))
    (tmp_path / "taobao.yaml").write_text(bad)
    (tmp_path / "deploy.yaml").write_text(
        f"source: {{kind: csv, csv: {{paths: x.csv, mapping: taobao.yaml}}}}\n"
        f"features: {{definitions: {CONFIG / 'features.yaml'}}}\ntriggers: {CONFIG / 'triggers.yaml'}\n"
        f"models: {CONFIG / 'models.yaml'}\n"
    )
    line = {k: i + 1 for i, l in enumerate(bad.splitlines()) for k in ("type:", "ts_format:") if l.startswith(k)}
    with pytest.raises(ConfigError) as e:
        load_deployment(tmp_path / "deploy.yaml")
    msg = str(e.value)
    assert f"{tmp_path / 'taobao.yaml'}:{line['type:']}: type: Value error, unknown column 'behaviour'" in msg
    assert f"{tmp_path / 'taobao.yaml'}:{line['ts_format:']}: ts_format: Value error, expected epoch_s" in msg
    (tmp_path / "taobao.yaml").write_text(text.replace("fav: favourite", "fav: favorite"))
    with pytest.raises(ConfigError, match=r"taobao\.yaml:\d+: types\.fav: unknown event type 'favorite'"):
        load_deployment(tmp_path / "deploy.yaml")
    (tmp_path / "deploy.yaml").write_text("source: {kind: csv}\n")
    with pytest.raises(ConfigError, match=r"deploy\.yaml:1: source: Value error, kind csv needs a csv section"):
        load_deployment(tmp_path / "deploy.yaml")


def test_the_shipped_replay_config_loads_and_paths_may_come_from_one_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NUDGEFLOW_REPLAY_PATHS", "/data/a.csv:/data/b.csv")
    dep = load_deployment(CONFIG / "replay-taobao.yaml")
    assert dep.settings.source.csv is not None and dep.settings.source.csv.paths == ["/data/a.csv", "/data/b.csv"]
    assert dep.csv_mapping == mapping("taobao")
    assert CsvSourceConfig(paths=["a.csv"], mapping="m.yaml").paths == ["a.csv"]


def test_the_feature_flow_replays_a_taobao_log_into_redis(tmp_path: Path, redis_url: str, key_prefix: str) -> None:
    rows = [("101", "i1", "c1", "pv", T0), ("101", "i2", "c1", "pv", T0 + 60), ("101", "i2", "c2", "pv", T0 + 120),
            ("101", "i2", "c1", "fav", T0 + 180), ("101", "i2", "c1", "cart", T0 + 240),
            ("101", "i3", "c2", "pv", T0 + 300), ("101", "i2", "c1", "buy", T0 + 360),
            ("102", "i9", "c9", "pv", T0 + 7200), ("102", "i9", "c9", "pv", T0 + 3600)]  # an hour late: too_late
    lines = [",".join(map(str, r)).encode() for r in rows] + [b"101,i1,c1,teleport,1511544070"]
    path = tmp_path / "UserBehavior.csv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    settings = Settings.model_validate({
        "source": {"kind": "csv", "csv": {"paths": [str(path)], "mapping": str(CONFIG / "datasets" / "taobao.yaml")}},
        "redis": {"url": redis_url, "key_prefix": key_prefix, "ttl": "1d"},
        "dlq": {"kind": "file", "path": "out/dlq.jsonl"},
        "features": {"definitions": str(CONFIG / "features.yaml"), "allowed_lateness": "5m"},
        "triggers": str(CONFIG / "triggers.yaml"),
        "models": str(CONFIG / "models.yaml"),
    })
    flow, rt = build_features(deployment(settings, tmp_path))
    try:
        run_main(flow)
    finally:
        rt.close()

    users = FeatureReader(redis_url, key_prefix).get_many(["101", "102"])
    u = users["101"]
    counts = (u["views_1h"], u["favourites_7d"], u["carts_1h"], u["orders_24h"], u["events_1h"])
    assert counts == (4, 1, 1, 1, 7)
    assert (u["items_viewed_1h"], u["categories_viewed_1h"]) == (3, 2)
    assert u["_ts"] == str((T0 + 360) * 1000) and u["first_seen_ts"] == T0 * 1000
    assert users["102"]["views_1h"] == 1

    dlq = [orjson.loads(x) for x in (tmp_path / "out" / "dlq.jsonl").read_bytes().splitlines()]
    assert sorted((d["reason"], d["position"], d["raw"]) for d in dlq) == [
        ("too_late", f"{path}:9", "102,i9,c9,pv,1511547670"),
        ("unknown_type", f"{path}:10", "101,i1,c1,teleport,1511544070"),
    ]


def test_a_log_of_ones_own_with_event_ids_iso_times_one_platform_and_typed_props(tmp_path: Path) -> None:
    """A mapping for a log the shop exports itself: its own event ids, ISO-8601 times (a naive one is UTC),
    every event from one platform, props converted by type, a tab as the delimiter; a mapping naming a column
    the log does not have is refused before any row is read."""
    m = CsvMapping.model_validate({
        "columns": ["id", "at", "who", "what", "sku", "qty"], "delimiter": "\t", "event_id": "id",
        "user_id": "who", "type": "what", "types": {"view": "browse"}, "ts": "at", "ts_format": "iso",
        "platform": "app", "props": {"item_id": "sku", "quantity": {"column": "qty", "type": "int"}},
    })
    path = tmp_path / "export.tsv"
    path.write_bytes(b"ev-1\t2023-11-14T22:13:19+01:00\tu1\tview\ts9\t\n"
                     b"ev-2\t2023-11-14T21:13:20\tu1\tadd_to_cart\ts9\t2\n")
    a, b = replay(path, m)
    assert event_tuple(a)[:7] == ("ev-1", "u1", "browse", NOW - 1000 - 3600_000, None, "app", {"item_id": "s9"})
    assert event_tuple(b)[:7] == ("ev-2", "u1", "add_to_cart", NOW - 3600_000, None, "app",
                                  {"item_id": "s9", "quantity": 2, "price": 0.0, "currency": "USD"})
    with pytest.raises(ValueError, match=r"quantity: unknown column 'amount'"):
        CsvMapping.model_validate({"columns": ["who", "what", "at"], "user_id": "who", "type": "what", "ts": "at",
                                   "props": {"quantity": {"column": "amount", "type": "int"}}})
