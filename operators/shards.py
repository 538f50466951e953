"""Shard keys: the state key a shopper's per-user state lives under in every keyed step, and the key's name.

Per-user steps key their state by shard (``crc32`` of the user id modulo ``shards``): one logic object holds
the state of many shoppers. Bytewax then places each key on worker ``hash(key) % workers``, and with plain
names the shards do not share out evenly: ``"0"`` … ``"63"`` go 29 and 35 to two workers, 5 to 13 to eight,
and the busiest worker sets a cluster's pace. The names of :data:`BALANCED` were picked by routing candidates
through real Bytewax clusters of 2 to 16 workers (:mod:`nudgeflow.shardgen`): any first ``n`` of them leave
the busiest worker of any of those clusters at most one shard above an even share (64 shards: 32 and 32 on
two workers, 16 each on four, 7 to 9 on eight). ``crc32`` keeps the user → shard mapping the same in every process and after
every restart (Python's ``hash`` of a string is salted per process).

Shard names are state keys, so a recovery store keeps the names it was made with: a store made before
balanced names resumes with :func:`numeric` names (``flows.common.shard_keys``).

>>> names = shard_names(64)
>>> shard_of("u1", names) == shard_of(b"u1", names), shard_of("u1", numeric(16))
(True, '6')
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence


def numeric(shards: int) -> tuple[str, ...]:
    """The names ``"0"`` … of stores made before balanced names."""
    return tuple(str(i) for i in range(shards))


def shard_names(shards: int) -> tuple[str, ...]:
    """The balanced names of ``shards`` shards (numeric ones beyond :data:`BALANCED`).

    >>> shard_names(4), len(shard_names(1000))
    (('0-0', '1-4', '2-19', '3-1'), 1000)
    """
    return BALANCED[:shards] if shards <= len(BALANCED) else numeric(shards)


def shard_of(user: str | bytes, names: Sequence[str]) -> str:
    """The shard key of a user id (or of a Kafka message key, its bytes)."""
    return names[zlib.crc32(user.encode() if isinstance(user, str) else user) % len(names)]


#: picked by python -m nudgeflow.shardgen for bytewax 0.21.1
BALANCED = (
    "0-0", "1-4", "2-19", "3-1", "4-1", "5-2", "6-16", "7-49", "8-30", "9-40", "10-35", "11-59",
    "12-54", "13-4", "14-24", "15-31", "16-12", "17-47", "18-39", "19-54", "20-13", "21-55", "22-8", "23-41",
    "24-12", "25-20", "26-14", "27-58", "28-31", "29-62", "30-55", "31-20", "32-42", "33-25", "34-29", "35-17",
    "36-56", "37-26", "38-49", "39-19", "40-13", "41-56", "42-37", "43-47", "44-18", "45-31", "46-12", "47-6",
    "48-13", "49-15", "50-12", "51-7", "52-19", "53-27", "54-20", "55-45", "56-34", "57-60", "58-63", "59-22",
    "60-3", "61-57", "62-5", "63-49", "64-11", "65-9", "66-12", "67-10", "68-22", "69-34", "70-59", "71-37",
    "72-23", "73-1", "74-55", "75-28", "76-28", "77-39", "78-18", "79-23", "80-62", "81-9", "82-28", "83-32",
    "84-21", "85-47", "86-29", "87-8", "88-9", "89-44", "90-16", "91-46", "92-29", "93-4", "94-50", "95-20",
    "96-55", "97-30", "98-58", "99-63", "100-45", "101-25", "102-23", "103-3", "104-16", "105-22", "106-33", "107-0",
    "108-3", "109-28", "110-32", "111-49", "112-13", "113-61", "114-12", "115-15", "116-7", "117-18", "118-34", "119-44",
    "120-0", "121-50", "122-5", "123-55", "124-47", "125-45", "126-39", "127-57", "128-23", "129-23", "130-33", "131-19",
    "132-54", "133-32", "134-25", "135-35", "136-35", "137-55", "138-16", "139-0", "140-27", "141-0", "142-16", "143-2",
    "144-0", "145-26", "146-6", "147-28", "148-55", "149-2", "150-16", "151-26", "152-62", "153-40", "154-43", "155-4",
    "156-11", "157-40", "158-20", "159-32", "160-5", "161-19", "162-14", "163-10", "164-63", "165-16", "166-36", "167-3",
    "168-62", "169-5", "170-22", "171-58", "172-35", "173-21", "174-47", "175-8", "176-58", "177-61", "178-61", "179-0",
    "180-62", "181-27", "182-27", "183-29", "184-32", "185-30", "186-16", "187-6", "188-41", "189-14", "190-52", "191-53",
    "192-23", "193-53", "194-53", "195-8", "196-29", "197-15", "198-7", "199-14", "200-39", "201-11", "202-1", "203-0",
    "204-51", "205-13", "206-50", "207-35", "208-31", "209-19", "210-0", "211-14", "212-35", "213-17", "214-4", "215-57",
    "216-47", "217-53", "218-11", "219-48", "220-24", "221-51", "222-4", "223-26", "224-33", "225-23", "226-20", "227-11",
    "228-45", "229-32", "230-1", "231-8", "232-55", "233-2", "234-47", "235-42", "236-20", "237-27", "238-29", "239-7",
    "240-26", "241-40", "242-48", "243-44", "244-28", "245-54", "246-21", "247-9", "248-14", "249-15", "250-40", "251-44",
    "252-27", "253-25", "254-20", "255-37",
)
