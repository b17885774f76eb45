"""What the FUSE operations keep per mount, per inode and per open file."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..config import AysConfig
from ..debug.store import PathState
from ..tiers.counters import Account
from ..tree.objects import KIND_DIR, Entry
from ..tree.ref import Ref

if TYPE_CHECKING:
    from ..debug.overlay import DebugOverlay
    from .importhints import HintState
    from .progress import ProfileUse, Progress
    from .startwatch import StartWatch


UNREADABLE_KEPT = 64  # unreadable directories remembered per mount


@dataclass
class MountPoint:
    """One ays exposed as a top-level directory of the session."""

    cfg: AysConfig
    top_ino: int
    ref: Ref | None = None
    state: str = "starting"  # starting | up | error | stopping
    error: str = ""
    since: float = field(default_factory=time.time)
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    bytes_by_tier: Account = field(default_factory=Account)  # and the downloads by tier (.blobs)
    eio: dict[str, int] = field(default_factory=dict)  # EIO answers by cause (see count_eio)
    prefetch: Progress | None = None  # the last prefetch of this mount
    overlay: DebugOverlay | None = None  # debug mode
    watch: StartWatch | None = None  # the start being recorded or measured (see aysfsd.fuse.startwatch)
    profile: ProfileUse | None = None  # the startup profile of the current version, if looked for
    hints: HintState | None = None  # the import hints of a cold start of the current version
    unreadable: dict[str, str] = field(default_factory=dict)  # directory hash -> why it could not be read
    invalid_dirs: set[str] = field(default_factory=set)  # of them, invalid objects (never readable: not retried)

    @property
    def name(self) -> str:
        return self.cfg.name

    def count_eio(self, cause: str) -> None:
        """One EIO answered to a reader of this mount: timeout, unavailable, corrupt (every copy
        found was), bad_tree (a directory object or blob that contradicts the tree)."""
        self.eio[cause] = self.eio.get(cause, 0) + 1

    def unreadable_dir(self, h: str, why: str, invalid: bool = False) -> None:
        """Directory `h` could not be read (`invalid`: its object is, which a content address
        never mends): the mount is degraded until it can (the newest last)."""
        self.unreadable.pop(h, None)
        self.unreadable[h] = why
        if invalid:
            self.invalid_dirs.add(h)
        if len(self.unreadable) > UNREADABLE_KEPT:
            self.readable_dir(next(iter(self.unreadable)))

    def readable_dir(self, h: str) -> None:
        self.unreadable.pop(h, None)
        self.invalid_dirs.discard(h)

    def retryable_dirs(self) -> list[str]:
        """The unreadable directories worth reading again (not invalid ones), the newest first."""
        return [h for h in reversed(self.unreadable) if h not in self.invalid_dirs]

    def new_version(self) -> None:
        """The mount serves another version: what could not be read of the last one is moot."""
        self.unreadable.clear()
        self.invalid_dirs.clear()

    def degraded(self) -> str:
        """Why the mount is degraded (its root or a directory cannot be read), or "" when not."""
        if not self.unreadable:
            return ""
        root = self.ref.root if self.ref is not None else ""
        h = root if root in self.unreadable else next(reversed(self.unreadable))
        n = len(self.unreadable)
        what = "the root directory" if h == root else "a directory"
        more = f" ({n} directories in all)" if n > 1 else ""
        return f"{what} cannot be read{more}: {self.unreadable[h]}"[:400]

    def top_entry(self) -> Entry:
        mtime = int((self.ref.time if self.ref else self.since) * 1e9)
        return Entry(self.cfg.name, KIND_DIR, 0o755, 0, mtime, hash=self.ref.root if self.ref else "")


@dataclass(slots=True)
class Node:
    ino: int
    mount: MountPoint
    entry: Entry
    parent: int
    path: str = ""  # relative to the mount root; debug mounts only
    lookups: int = 0
    children: dict[str, int] | None = None
    dbg: PathState | None = None  # debug mode: the edited version this node shows
    tree_entry: Entry | None = None  # debug mode: the published entry under an edited one
    siblings_fetched: bool = False  # a directory whose small files were fetched together
    ino_base: int = 0  # a listed directory: entry i's inode number is ino_base + i (see Inodes.ino_base)


@dataclass(slots=True)
class OpenFile:
    node: Node
    entry: Entry
    dbg: PathState | None = None
    buf: bytearray | None = None  # debug mode: content being written
    dirty: bool = False
    next_off: int = 0  # where a sequential reader reads next (read-ahead)
