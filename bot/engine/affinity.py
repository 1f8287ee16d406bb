"""Conversation affinity for the fleet: where a conversation's KV cache lives (`StickyTable`,
bounded LRU), and for one without a home, which server it tries first and next (`HashRing`,
consistent hashing)."""

from __future__ import annotations

import bisect
import collections
import hashlib
from collections.abc import Sequence

VIRTUAL_NODES = 64  # points per server on the hash ring
STICKY_LIMIT = 100_000  # conversations remembered (LRU)


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


class StickyTable:
    """conversation → (server index, slot) of its KV cache, the most recent `limit` ones, and
    how many conversations each server homes (for bounded loads)."""

    def __init__(self, limit: int = STICKY_LIMIT) -> None:
        self.limit = limit
        self._where: collections.OrderedDict[str, tuple[int, int]] = collections.OrderedDict()
        self.homes: collections.Counter[int] = collections.Counter()

    def get(self, conversation: str) -> tuple[int, int] | None:
        return self._where.get(conversation)

    def remember(self, conversation: str, server: int, slot: int) -> None:
        before = self._where.get(conversation)
        if before is not None:
            self.homes[before[0]] -= 1
        self._where[conversation] = (server, slot)
        self.homes[server] += 1
        self._where.move_to_end(conversation)
        if len(self._where) > self.limit:
            _, (gone, _) = self._where.popitem(last=False)
            self.homes[gone] -= 1
