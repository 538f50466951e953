"""The Redis feature store on a real server and on a Redis Cluster: layouts, coalescing, TTL, deletions and the
reader."""

from __future__ import annotations

import time

import pytest
import redis
from redis.exceptions import ResponseError

from connectors.redis_client import redis_client, send_packed
from connectors.redis_store import FeatureReader, RedisFeatureSink
from nudgeflow.settings import RedisConfig
from operators.features import GONE_TS, UserFeatures


@pytest.mark.parametrize("layout", ["fields", "json"])
def test_write_coalesce_and_read_back(any_redis_url: str, key_prefix: str, layout: str) -> None:
    cfg = RedisConfig(url=any_redis_url, key_prefix=key_prefix, ttl=120, layout=layout)
    features = RedisFeatureSink(cfg, any_redis_url).build("s", 0, 1)
    scores = RedisFeatureSink(cfg, any_redis_url, fields=True).build("s", 0, 1)
    features.write_batch([
        UserFeatures("u1", 10, {"views_1h": 1, "top_categories": ["a"]}),
        UserFeatures("u1", 30, {"views_1h": 3, "top_categories": ["b", "a"]}),  # the newest wins
        UserFeatures("u1", 20, {"views_1h": 2, "top_categories": ["a"]}),
        UserFeatures("u2", 15, {"views_1h": 7, "top_categories": []}),
    ])
    scores.write_batch([UserFeatures("u1", 40, {"score_buy": 0.25})])  # scores of a later look: _ts is the features'
    reader = FeatureReader(any_redis_url, key_prefix)
    u1 = reader.get("u1")
    assert u1["_ts"] == "30" and u1["_v"] == "1" and u1["score_buy"] == "0.25"
    if layout == "json":
        assert u1["views_1h"] == 3 and u1["top_categories"] == ["b", "a"]
    else:
        assert u1["views_1h"] == "3" and u1["top_categories"] == '["b","a"]'
    many = reader.get_many(["u1", "u2", "nobody"])
    assert set(many) == {"u1", "u2", "nobody"} and many["nobody"] == {}
    assert str(many["u2"]["views_1h"]) == "7"
    r = redis_client(any_redis_url)
    assert 0 < r.ttl(f"{key_prefix}:u:u1") <= 120
    fields = r.hkeys(f"{key_prefix}:u:u1")
    assert (b"f" in fields) == (layout == "json")


def test_merged_away_shoppers_hashes_are_deleted_in_one_batch(any_redis_url: str, key_prefix: str) -> None:
    cfg = RedisConfig(url=any_redis_url, key_prefix=key_prefix, ttl=120)
    sink = RedisFeatureSink(cfg, any_redis_url).build("s", 0, 1)
    sink.write_batch([UserFeatures(f"u{i}", 10, {"views_1h": i}) for i in range(20)])
    # the keys of one batch lie in many hash slots (on several nodes of a cluster)
    sink.write_batch([UserFeatures(f"u{i}", GONE_TS, {}, gone=True) for i in range(0, 20, 2)]
                     + [UserFeatures("u1", 20, {"views_1h": 100})])
    got = FeatureReader(any_redis_url, key_prefix).get_many([f"u{i}" for i in range(20)])
    assert [u for u, h in got.items() if h] == [f"u{i}" for i in range(1, 20, 2)]
    assert got["u1"]["views_1h"] == 100


def test_packed_commands_answer_in_order_with_errors_in_place_and_a_broken_connection_is_dropped(
    redis_url: str, key_prefix: str,
) -> None:
    client = redis_client(redis_url)
    k = f"{key_prefix}:packed"
    got = send_packed(client, [("SET", k, 1.5), ("INCR", k), ("HSET", f"{k}:h", "a", 7, "b", "x\u00e9"), ("GET", k)])
    assert got[0] == b"OK" and isinstance(got[1], ResponseError) and got[2:] == [2, b"1.5"]
    assert client.hgetall(f"{k}:h") == {b"a": b"7", b"b": "x\u00e9".encode()}  # the same bytes redis-py sends
    # no answer in time (BLPOP holds its reply for 1 s): the call fails as redis-py's would, and the connection
    # is dropped with its reply unread; reused, it would hand that stale reply (None) to the next call
    slow = redis_client(redis_url, socket_timeout=0.2)
    with pytest.raises(redis.TimeoutError):
        send_packed(slow, [("BLPOP", f"{k}:nothing", 1), ("GET", k)])
    time.sleep(1.1)
    assert send_packed(slow, [("GET", k)]) == [b"1.5"]
    client.delete(k, f"{k}:h")
