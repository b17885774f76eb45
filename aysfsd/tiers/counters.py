"""What the fetcher counts (shown by `aysctl status`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Counters:
    hits: int = 0
    misses: int = 0
    memory_hits: int = 0
    errors: int = 0
    bytes_by_tier: dict[str, int] = field(default_factory=lambda: {"local": 0, "grid": 0, "stor": 0})
    writebacks: int = 0
    writeback_errors: int = 0
    writebacks_skipped: int = 0
    packs: int = 0  # packs downloaded
    tree_packs: int = 0  # of them, tree packs (see aysfsd.treepacks)
    pack_members: int = 0  # blobs (files, directory objects) had from them
