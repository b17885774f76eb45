"""What a mount's background work reports to `aysctl status` and the metrics: the last
prefetch's progress and what the start did about a startup profile. Kept apart from the
work itself (prefetch, profiles), which needs the FUSE operations, so that a mount's state
(nodes.MountPoint) can hold them without importing that work."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from .startwatch import StartWatch


@dataclass
class Progress:
    state: str = "running"  # running | done | failed
    blobs_done: int = 0
    blobs_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    fetched_blobs: int = 0
    fetched_bytes: int = 0
    errors: int = 0
    started: float = field(default_factory=time.monotonic)
    seconds: float = 0.0

    def public(self) -> dict[str, object]:
        d = asdict(self)
        d.pop("started")
        return d


@dataclass
class ProfileUse:
    """What a mount did about a startup profile for its current version (status)."""

    root: str
    source: str = "none"  # ref | grid | none
    state: str = "looking"  # looking | fetching | done | recording | recorded | none
    hash: str = ""  # of the profile's bytes, when it came from the ref
    items: int = 0
    ignored: int = 0  # items the tree does not name at their place
    fetched_blobs: int = 0
    fetched_bytes: int = 0
    errors: int = 0
    written: list[str] = field(default_factory=list)  # grid caches a recorded profile went to
    watch: StartWatch | None = None

    def fetching(self, h: str) -> bool:
        """Whether blob `h` is one the profile is fetching ahead now (in its own way: a reader
        that misses it fetches it alone, not its directory's packs)."""
        w = self.watch
        return self.state == "fetching" and w is not None and w.profiled is not None and h in w.profiled

    def public(self) -> dict[str, object]:
        w = self.watch
        return {"source": self.source, "state": self.state, "hash": self.hash, "items": self.items,
                "ignored": self.ignored, "fetched_blobs": self.fetched_blobs, "fetched_bytes": self.fetched_bytes,
                "errors": self.errors, "read": w.hits if w is not None and w.profiled is not None else 0,
                "recorded": len(w.items) if w is not None and w.record else 0, "written": list(self.written)}
