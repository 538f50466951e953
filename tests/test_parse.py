"""The parser: every refusal has a reason and keeps the bytes; normalisation gives one shape; fuzzing never crashes it."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nudgeflow.events import DeadLetter, Event
from nudgeflow.settings import EventsConfig
from operators.parse import Parser

NOW = 1_700_000_000_000
REASONS = {"oversized", "malformed_json", "not_an_object", "missing_field", "invalid_field", "unknown_type",
           "future_ts", "too_old", "empty", "parser_error", "id_too_long", "self_alias"}
P = Parser(EventsConfig(max_bytes=2048, max_age=86400, custom_types=["payment"], currency_rates={"USD": 1, "EUR": 2}),
           now_ms=lambda: NOW)


def rec(**over: object) -> bytes:
    doc = {"event_id": "e1", "user_id": "u1", "type": "browse", "ts": NOW - 1000}
    doc.update(over)
    return orjson.dumps({k: v for k, v in doc.items() if v is not ...})


def parse(raw: bytes | None) -> Event | DeadLetter:
    return P.parse("topic:0:42", raw, 0)  # type: ignore[arg-type]


@pytest.mark.parametrize(("raw", "reason"), [
    (b"x" * 3000, "oversized"),
    (b'{"event_id": "e1", ', "malformed_json"),
    (b"[1, 2]", "not_an_object"),
    (rec(event_id=...), "missing_field"),
    (rec(user_id=...), "missing_field"),
    (rec(type=...), "missing_field"),
    (rec(ts=...), "missing_field"),
    (rec(event_id=5), "invalid_field"),
    (rec(user_id=""), "invalid_field"),
    (rec(ts="yesterday"), "invalid_field"),
    (rec(ts=True), "invalid_field"),
    (rec(ts=None), "invalid_field"),
    (b'{"event_id": "e1", "user_id": "u1", "type": "browse", "ts": 1e400}', "malformed_json"),  # no infinite time
    (rec(session_id=3), "invalid_field"),
    (rec(platform=["web"]), "invalid_field"),
    (rec(props=[1]), "invalid_field"),
    (rec(type="order", props={"amount": -5, "currency": "USD"}), "invalid_field"),
    (rec(type="order", props={"amount": 5, "currency": "XYZ"}), "invalid_field"),
    (rec(type="order", props={}), "missing_field"),
    (rec(type="add_to_cart", props={"item_id": "i", "price": 1.0, "quantity": 0}), "invalid_field"),
    (rec(type="consent", props={"channel": "email"}), "invalid_field"),
    (rec(type="identify", props={"timezone": "Mars/Olympus"}), "invalid_field"),
    (rec(type="teleport"), "unknown_type"),
    (rec(ts=NOW + 10 * 86_400_000), "future_ts"),
    (rec(ts=NOW - 2 * 86_400_000), "too_old"),
    (None, "empty"),
    (rec(user_id="u" * 129), "id_too_long"),
    (rec(user_id=5, anonymous_id="c1"), "invalid_field"),
    (rec(user_id=..., anonymous_id=""), "invalid_field"),
    (rec(user_id=..., device_id="d" * 129), "id_too_long"),
    (rec(user_id=..., context={"ip": "1.2.3.4"}), "missing_field"),
    (rec(user_id=None), "missing_field"),
    (rec(type="identify", user_id=..., anonymous_id="c1"), "missing_field"),
    (rec(type="alias"), "missing_field"),
    (rec(type="alias", user_id=..., previous_id="u0"), "missing_field"),
    (rec(type="alias", previous_id=7), "invalid_field"),
    (rec(type="alias", previous_id="p" * 129), "id_too_long"),
    (rec(type="alias", previous_id="u1"), "self_alias"),
])
def test_each_refusal_has_its_reason_the_bytes_and_the_position(raw: bytes | None, reason: str) -> None:
    out = parse(raw)
    assert isinstance(out, DeadLetter), out
    assert (out.reason, out.position) == (reason, "topic:0:42")
    assert out.raw == raw and out.detail


def test_timestamps_in_every_accepted_form_agree() -> None:
    iso = "2023-11-14T22:13:19"
    forms = [NOW - 1000, NOW - 999.6, f"{iso}Z", f"{iso}+00:00", iso, "2023-11-14T23:13:19+01:00"]
    assert {parse(rec(ts=f)).ts for f in forms} == {NOW - 1000}


def test_normalisation_gives_one_shape() -> None:
    assert parse(rec(platform="iOS")).platform == "app"
    assert parse(rec(platform="miniprogram")).platform == "mini_program"
    order = parse(rec(type="order", props={"amount": 10.0, "currency": "eur"}))
    assert order.props == {"amount": 20.0, "currency": "USD", "original_currency": "EUR", "original_amount": 10.0,
                           "item_count": 0}
    assert parse(rec(type="order", props={"amount_minor": 1250})).props["amount"] == 12.5
    items = [{"item_id": "a", "price": 2.0, "quantity": 3}, {"item_id": "b", "price": 1.5}]
    order = parse(rec(type="order", props={"items": items, "currency": "EUR"}))
    assert (order.props["amount"], order.props["item_count"]) == (15.0, 4)
    cart = parse(rec(type="add_to_cart", props={"item_id": "a", "price": 3}))
    assert (cart.props["quantity"], cart.props["price"]) == (1, 3.0)
    consent = parse(rec(type="consent", props={"channel": "SMS", "status": "opt_out"}))
    assert consent.props == {"channel": "sms", "status": "opt_out", "granted": False}
    assert isinstance(parse(rec(type="payment")), Event)


@pytest.mark.parametrize(("doc", "user_id", "aliases"), [
    ({}, "u1", ()),
    ({"context": {"ip": "1.2.3.4"}, "session_id": None}, "u1", ()),  # unknown keys are no ids
    ({"anonymous_id": "c1"}, "u1", ("anon:c1",)),  # a post-login web event
    ({"user_id": ..., "anonymous_id": "c1"}, "anon:c1", ()),
    ({"user_id": ..., "device_id": "d1", "account_id": "a1"}, "device:d1", ("account:a1",)),
    ({"user_id": None, "account_id": "a1", "device_id": "d1", "anonymous_id": "c1"}, "anon:c1",
     ("device:d1", "account:a1")),
    ({"anonymous_id": None, "device_id": "d" * 128}, "u1", ("device:" + "d" * 128,)),  # null is absent
    ({"type": "identify", "device_id": "d1", "props": {"timezone": "Europe/Paris"}}, "u1", ("device:d1",)),
    ({"type": "alias", "previous_id": "anon:c1"}, "u1", ("anon:c1",)),  # a previous id is taken as is
    ({"type": "alias", "previous_id": "u0", "anonymous_id": "c1"}, "u1", ("u0", "anon:c1")),
    ({"type": "alias", "previous_id": "anon:c1", "anonymous_id": "c1"}, "u1", ("anon:c1",)),
    ({"user_id": "anon:c1", "anonymous_id": "c1"}, "anon:c1", ()),  # one id, twice: nothing to link
])
def test_ids_give_user_id_and_aliases(doc: dict, user_id: str, aliases: tuple[str, ...]) -> None:
    out = parse(rec(**doc))
    assert isinstance(out, Event), out
    assert (out.user_id, out.aliases, out.origin_id) == (user_id, aliases, "")


def test_a_batch_reads_the_clock_once_and_passes_source_refusals_through() -> None:
    calls = []
    p = Parser(EventsConfig(), now_ms=lambda: calls.append(1) or NOW)
    dl = DeadLetter("kafka_error", "broker down", b"", "t:0:1", NOW)
    out = p.parse_batch([("t:0:2", rec()), dl, ("t:0:3", rec(event_id="e2"))])
    assert [type(o) for o in out] == [Event, DeadLetter, Event] and out[1] is dl
    assert len(calls) == 1 and out[0].ingest_ms == NOW and out[0].raw == rec()


def check(out: Event | DeadLetter, raw: bytes) -> None:
    if isinstance(out, DeadLetter):
        assert out.reason in REASONS and out.detail and out.raw == raw
    else:
        assert isinstance(out.event_id, str) and isinstance(out.user_id, str) and isinstance(out.ts, int)
        assert isinstance(out.props, dict) and (out.platform is None or isinstance(out.platform, str))
        assert out.user_id and len(out.user_id) <= P.max_id + len("account:") and type(out.aliases) is tuple
        assert out.user_id not in out.aliases and all(type(a) is str and a for a in out.aliases)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_bytes(raw: bytes) -> None:
    check(parse(raw), raw)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)
fields = st.fixed_dictionaries({}, optional={
    "event_id": json_values | st.text(min_size=1, max_size=8),
    "user_id": json_values | st.text(min_size=1, max_size=8),
    "type": json_values | st.sampled_from(
        ["browse", "order", "add_to_cart", "consent", "identify", "alias", "payment"]),
    "ts": json_values | st.integers(NOW - 10**9, NOW + 10**9),
    "session_id": json_values, "platform": json_values,
    "anonymous_id": json_values | st.sampled_from(["c1", "u1"]), "device_id": json_values | st.just("d1"),
    "account_id": json_values, "previous_id": json_values | st.sampled_from(["u0", "u1"]),
    "props": json_values | st.dictionaries(
        st.sampled_from(["amount", "amount_minor", "currency", "items", "price", "quantity", "channel", "granted",
                         "status", "timezone"]), json_values, max_size=5),
})


@settings(max_examples=400, deadline=None)
@given(fields)
def test_fuzz_documents(doc: dict) -> None:
    raw = orjson.dumps(doc)
    check(parse(raw), raw)
