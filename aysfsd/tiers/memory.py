"""Recently fetched blobs kept in memory."""

from __future__ import annotations

from collections import OrderedDict

MEMORY_BUDGET = 64 << 20


class MemoryLRU:
    """Recently fetched blobs kept in memory: for mounts with the local cache off, and for
    blobs the local cache did not take (too large for it, or full of pinned blobs)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self._d: OrderedDict[str, bytes] = OrderedDict()

    def get(self, h: str) -> bytes | None:
        v = self._d.get(h)
        if v is not None:
            self._d.move_to_end(h)
        return v

    def put(self, h: str, data: bytes) -> None:
        if h in self._d or len(data) > self.budget:
            return
        self._d[h] = data
        self.used += len(data)
        while self.used > self.budget:
            _, old = self._d.popitem(last=False)
            self.used -= len(old)

    def clear(self) -> None:
        self._d.clear()
        self.used = 0
