"""Webhooks: each action POSTed as signed JSON to one allowlisted endpoint, with bounded retries.

Every request carries ``Content-Type: application/json``, ``Idempotency-Key: <action_id>`` (a retry or a
replay after recovery sends the same key: receivers dedupe on it), ``X-Nudgeflow-Timestamp`` (unix
seconds when the attempt was sent; each attempt is signed afresh) and ``X-Nudgeflow-Signature:
sha256=<hex>``, the HMAC-SHA256 of ``<timestamp>.<body>`` with the shared secret (Stripe's and Slack's
convention). A receiver recomputes it over the exact body bytes, compares in constant time and refuses
a timestamp far from its own clock, so a captured request cannot be replayed later:

>>> secret = b"an-example-secret-of-32-bytes!!!"
>>> body = b'{"action_id":"a1"}'
>>> sig = sign(secret, 1700000000, body)
>>> sig
'sha256=46a912496bafbf710ca4ff69d03c31b0577554267298a18897e50b1342bd8348'
>>> verify(secret, "1700000000", body, sig, now=1700000060)
True
>>> verify(secret, "1700000000", body, sig, now=1700000000 + 600)  # five minutes is the default tolerance
False
>>> verify(secret, "1700000000", body + b" ", sig, now=1700000060)
False

Connection errors, timeouts, 429 and 5xx are retried ``retries`` times with exponential backoff and
jitter (a ``Retry-After`` is honoured up to ``max_backoff``); any other answer but 2xx is final,
redirects included (they could lead off the allowlist). What is still not delivered becomes a dead
letter. Delivery is a dataflow step rather than a sink for that reason: a Bytewax sink cannot emit, so
the step's output, the undelivered actions, joins the flow's dead-letter stream and reaches the same
DLQ writer and ClickHouse ``dlq`` table as every other refusal.
"""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import logging
import random
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import httpx
import orjson

from nudgeflow.events import Action, DeadLetter
from nudgeflow.settings import WebhookConfig

log = logging.getLogger(__name__)

TIMESTAMP_HEADER = "X-Nudgeflow-Timestamp"
SIGNATURE_HEADER = "X-Nudgeflow-Signature"
REASON = "webhook_failed"


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The signature header's value: HMAC-SHA256 over ``<timestamp>.<body>``, so neither can be swapped."""
    return "sha256=" + hmac.new(secret, b"%d." % timestamp + body, hashlib.sha256).hexdigest()


def verify(secret: bytes, timestamp: str, body: bytes, signature: str, tolerance: float = 300.0,
           now: float | None = None) -> bool:
    """What a receiver checks: the signature matches and the timestamp is within ``tolerance`` seconds."""
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, ts, body), signature)


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (a number of seconds or an HTTP date); None if absent or unreadable.

    >>> retry_after("7"), retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0), retry_after("soon")
    (7.0, 10.0, None)
    """
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


class WebhookSender:
    """Delivers batches of actions to one endpoint; returns the undelivered ones as dead letters.

    One client per process, shared by its workers (httpx clients are thread-safe), keeps connections
    alive between batches; a batch's requests go out concurrently, ``concurrency`` at a time, so one
    slow or retried action does not hold up the rest of its batch by more than its own retries.
    """

    def __init__(self, cfg: WebhookConfig):
        self.cfg = cfg
        self._secret = cfg.secret.get_secret_value().encode()
        self._client = httpx.Client(
            timeout=httpx.Timeout(cfg.timeout, connect=cfg.connect_timeout),
            limits=httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency),
            follow_redirects=False,
            headers={"User-Agent": "nudgeflow-webhook"},
        )
        # the step has no close hook: the client's sockets are closed when the sender goes or at exit
        weakref.finalize(self, self._client.close)

    def deliver_batch(self, actions: list[Action]) -> list[DeadLetter]:
        if len(actions) <= 1:
            dead = [self.deliver(a) for a in actions]
        else:
            with ThreadPoolExecutor(min(len(actions), self.cfg.concurrency), thread_name_prefix="webhook") as pool:
                dead = list(pool.map(self.deliver, actions))
        return [d for d in dead if d is not None]

    def deliver(self, action: Action) -> DeadLetter | None:
        """POST one action, retrying what may pass later; the dead letter if it never got a 2xx."""
        body = orjson.dumps(action.to_dict())
        for attempt in range(self.cfg.retries + 1):
            wait: float | None = None
            try:
                r = self._post(body, action.action_id)
            except httpx.TransportError as e:  # connection refused or reset, timeouts, protocol errors
                detail = f"{type(e).__name__}: {e}"
            else:
                if r.is_success:
                    return None
                detail = f"HTTP {r.status_code}"
                if r.status_code != 429 and r.status_code < 500:
                    break
                wait = retry_after(r.headers.get("Retry-After"))
            if attempt < self.cfg.retries:
                time.sleep(self._delay(attempt, wait))
        detail = f"{detail} after {attempt + 1} attempt{'s' if attempt else ''}"[:200]
        log.warning("webhook: action %s not delivered: %s", action.action_id, detail, extra={"trigger": action.trigger_id})
        return DeadLetter(REASON, detail, body, f"webhook:{action.action_id}", action.ingest_ms)

    def _post(self, body: bytes, key: str) -> httpx.Response:
        ts = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": key,
            TIMESTAMP_HEADER: str(ts),
            SIGNATURE_HEADER: sign(self._secret, ts, body),
        }
        return self._client.post(self.cfg.url, content=body, headers=headers)

    def _delay(self, attempt: int, asked: float | None) -> float:
        """Exponential backoff with jitter (half to all of ``backoff * 2**attempt``), at least what the
        server asked for, at most ``max_backoff``."""
        backoff = self.cfg.backoff * 2**attempt * random.uniform(0.5, 1.0)
        return min(self.cfg.max_backoff, max(backoff, asked or 0.0))
