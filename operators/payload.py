"""Action payloads from a template in the trigger file, filled at decision time.

A trigger's ``payload`` (merged with its A/B variant's) is data: any string in
it may hold ``${name}`` placeholders, filled by :class:`string.Template` (no
code is evaluated) from what the decision knows: ``user_id``, ``trigger``,
``variant``, ``channel``, ``action_id``, ``event_ts``, ``decided_ms``,
``features.<name>``, ``score.<model>`` and ``user.<attribute>`` (from the
user's ``identify`` events). A string that is exactly one placeholder takes
the value itself, so a number stays a number; unknown names are left as
written (``nudgeflow validate`` names them first).

>>> t = PayloadTemplate({"template": "cart_reminder", "items": "${features.cart_items}",
...                      "subject": "Hi ${user.first_name}, ${features.cart_items} items wait"})
>>> sorted(t.refs)
['features.cart_items', 'user.first_name']
>>> t.render({"features.cart_items": 3, "user.first_name": "Ada"})
{'template': 'cart_reminder', 'items': 3, 'subject': 'Hi Ada, 3 items wait'}

Placeholders are found and filled at any depth, in lists too:

>>> t = PayloadTemplate({"blocks": [{"text": "for ${user_id}"}, "${score.churn_risk}", 7]})
>>> sorted(t.refs), t.render({"user_id": "u1", "score.churn_risk": 0.8})
(['score.churn_risk', 'user_id'], {'blocks': [{'text': 'for u1'}, 0.8, 7]})
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from typing import Any


class _Dotted(string.Template):
    """``${features.cart_value}``: identifiers may be dotted paths."""

    idpattern = r"(?a:[_a-z][_a-z0-9]*(?:\.[_a-z][_a-z0-9]*)*)"
    flags = re.IGNORECASE


def _strings(value: Any) -> list[str]:
    """Every string inside a JSON-like value."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


class PayloadTemplate:
    """A payload with placeholders; one without any is returned as it is, at no cost."""

    __slots__ = ("payload", "refs")

    def __init__(self, payload: dict[str, Any]):
        self.payload = payload
        #: the names the placeholders read
        self.refs: frozenset[str] = frozenset(
            name for s in _strings(payload) for name in _Dotted(s).get_identifiers()
        )

    def render(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The payload with every known placeholder filled (a fresh dict when there were any)."""
        if not self.refs:
            return self.payload
        return _fill(self.payload, values)


_WHOLE = re.compile(r"^\$\{([^}]+)\}$")


def _fill(value: Any, values: Mapping[str, Any]) -> Any:
    if isinstance(value, str):
        if "$" not in value:
            return value
        whole = _WHOLE.match(value)
        if whole is not None and whole.group(1) in values:
            return values[whole.group(1)]
        return _Dotted(value).safe_substitute(values)
    if isinstance(value, dict):
        return {k: _fill(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, values) for v in value]
    return value
