"""Consistent hashing for the fleet: which server a conversation tries first, and next."""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence

VIRTUAL_NODES = 64  # points per server on the hash ring


def hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")



class HashRing:
    """Consistent hashing: each server owns `VIRTUAL_NODES` points of a 64-bit ring; a key
    tries the servers in the order their points follow its hash. Removing a server moves
    only the keys it owned (to their next server); the hash is stable across processes."""

    def __init__(self, names: Sequence[str], virtual_nodes: int = VIRTUAL_NODES) -> None:
        self.size = len(names)
        points = sorted((hash64(f"{name}#{i}"), index) for index, name in enumerate(names) for i in range(virtual_nodes))
        self._keys = [h for h, _ in points]
        self._owners = [index for _, index in points]

    def order(self, key: str) -> list[int]:
        """Every server's index once, in the order `key` tries them."""
        start = bisect.bisect(self._keys, hash64(key))
        order: list[int] = []
        for i in range(len(self._keys)):
            index = self._owners[(start + i) % len(self._keys)]
            if index not in order:
                order.append(index)
                if len(order) == self.size:
                    break
        return order
