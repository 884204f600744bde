"""Keys of the agents' changelog tables: one record per (partition, batch sequence), sorted by
both, so a partition's records are one key range (:func:`partition_prefix`).

>>> record_key(2, 17)
b'002:000000000017'
"""

from __future__ import annotations


def record_key(partition: int, seq: int) -> bytes:
    return b"%03d:%012d" % (partition, seq)


def partition_prefix(partition: int) -> bytes:
    return b"%03d:" % partition
