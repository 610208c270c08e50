"""Run ids: UUIDs of version 7 (RFC 9562), which sort by the time they were made.

A random id (version 4) puts each new run, and each of its step attempts, on
a random page of the primary key and of the attempts' index by run. Once the
tables hold a long history, nearly every insert touches a page no other
recent insert touched, and after each checkpoint PostgreSQL writes that whole
page to its WAL: with a million finished runs, the WAL per run tripled. Ids
that grow with time put new rows side by side at the end of those indexes.

The first 48 bits are the Unix time in milliseconds, so the first twelve hex
digits of a run id tell when it was made; the other 74 bits are random.
"""

from __future__ import annotations

import os
import time
import uuid

_MS_MASK = (1 << 48) - 1


def uuid7() -> uuid.UUID:
    """A new UUID of version 7: the time in milliseconds, then random bits."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")  # 80 bits, 74 of them used
    rand_a = rand >> 68  # 12 bits
    rand_b = rand & ((1 << 62) - 1)  # 62 bits
    value = (ms & _MS_MASK) << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b
    return uuid.UUID(int=value)
