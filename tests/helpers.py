"""What several end-to-end tests share: a small trigger file and a way to write wire events."""

from __future__ import annotations

import orjson

MIN = 60_000

#: a cart reminder (absence) and an order over 100 (event + condition)
CART_AND_BIG_SPENDER = """
triggers:
  - id: cart_abandonment
    kind: absence
    after: [add_to_cart]
    unless: [order]
    within: 30m
    channel: email
    payload: {template: cart_reminder}
  - id: big_spender
    kind: event
    on: [order]
    condition: "event.props.amount >= 100.0"
    channel: push
"""


def ev(eid: str, user: str, etype: str, ts: int, **props: object) -> bytes:
    """One event on the wire, from the web."""
    return orjson.dumps({"event_id": eid, "user_id": user, "type": etype, "ts": ts, "platform": "web", "props": props})
