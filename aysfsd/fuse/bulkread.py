"""Bulk readers (tar, cp -r, rsync, a checksum pass): keep the next directories' packs in flight.

Such a reader goes through a directory's files in name order, every one, then on to the next
directory in walk order (depth first, name order). Seen from the daemon, that is a run of
first reads of a directory's files each the next one in name order (no file skipped). After
RUN such reads in a directory of more than RUN files, a walk starts there. A smaller
directory read whole starts one only shortly after such a walk (CREDIT such directories), or
when it has two files or more and the reader came into it straight from another such
directory it had read whole: an import reads a small package whole too, but seldom two one
after the other (and a single file read shows no order). The walk: what the directories that
come next in walk order hold (their file packs, and their files too big for a pack, one blob
each) and the rest of this directory's files too big for a pack are requested, directory
after directory, until WINDOW_BYTES are asked for ahead of the reader (or WINDOW_DIRS
directories; chunked files are left to the sequential read-ahead). Each planned directory the
reader then enters (its first read of a file there) is the walk going on: what it holds no
longer counts as ahead, and the window is topped up from where it stopped, so the link
carries the next directories' bytes, however small they are, instead of waiting for the
reader to ask, directory by directory.

`find` reads no file, and an application start reads some files of a directory, out of
order, skipping most, or a small package whole here and there: neither makes a run, so
neither starts a walk nor is made to download what it does not read; a walk the reader leaves
asks for nothing more than its window.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ..tiers import Fetcher, FetchError
from ..tree.objects import KIND_DIR, KIND_FILE, Entry, NameIndex, pack_members
from .nodes import Node

log = logging.getLogger("aysfsd.fuse.bulkread")

RUN = 4  # files read one after the other, in name order, before a directory counts as walked
CREDIT = 2 * 8  # after such a run, directories with fewer files read whole that start a walk too
WINDOW_DIRS = 64  # directories planned ahead of the reader (in walk order), at most
WINDOW_BYTES = 16 << 20  # bytes asked for ahead of the reader, at most (one pack or file over)
TRACKED = 1024  # directories whose reads are followed
GAP = 64  # entries looked at between two reads (a longer jump is not "the next file")


@dataclass(slots=True)
class _Run:
    need: int  # run length that starts a walk (RUN, or every file of a smaller directory)
    small: bool  # at most RUN files: the run is the whole directory
    after_whole: bool  # the reader came here straight from a small directory it read whole, in order
    last: int = -1  # entry index of the last file read
    length: int = 0
    moved: bool = False  # the run reached `need` (a walk was started from here, or could have been)

    @property
    def read_whole(self) -> bool:
        """Every file of a small directory read in name order (two at least: one read shows no order)."""
        return self.small and self.need >= 2 and self.length >= self.need


class _Cursor:
    """The directories after `start` in walk order, one at a time: its subtree first, then
    the rest of each ancestor's (up to the mount's top)."""

    def __init__(self, window: BulkWindow, start: Node) -> None:
        self.window = window
        self.node: Node | None = start
        self.stack: list[str] | None = None  # directories to go into, the next one last
        self.grid = start.mount.cfg.cache_grid

    async def _subdirs(self, h: str, after: str = "") -> list[str]:
        entries, _ = await self.window.load_dir(h, self.grid)
        return [e.hash for e in reversed(entries) if e.kind == KIND_DIR and e.hash and e.name > after]

    async def next(self) -> str | None:
        """The next directory's hash, None at the end of the walk."""
        node = self.node
        if node is None:
            return None
        if self.stack is None:
            self.stack = await self._subdirs(node.entry.hash)
        while not self.stack:
            parent = self.window.nodes.get(node.parent) if node.ino != node.mount.top_ino else None
            if parent is None or not parent.entry.hash:
                self.node = None
                return None
            self.stack = await self._subdirs(parent.entry.hash, node.entry.name)
            node = self.node = parent
        h = self.stack.pop()
        self.stack.extend(await self._subdirs(h))
        return h


@dataclass(eq=False)
class _Walk:
    """A bulk reader's walk through a mount: the directories asked for ahead of it."""

    start: Node
    cursor: _Cursor
    planned: OrderedDict[str, int] = field(default_factory=OrderedDict)  # dir hash -> bytes asked, walk order
    passed: OrderedDict[str, None] = field(default_factory=OrderedDict)  # planned ones entered (bounded)
    ahead: int = 0  # bytes asked for the planned directories
    running: bool = False  # a top-up task runs
    ended: bool = False  # replaced by another walk, or the end of the tree reached


class BulkWindow:
    """Follows first reads per directory, starts walks and keeps their windows topped up
    (see the module docstring)."""

    def __init__(self, fetcher: Fetcher, nodes: dict[int, Node],
                 load_dir: Callable[[str, bool], Awaitable[tuple[list[Entry], NameIndex]]],
                 cached_dir: Callable[[str], tuple[list[Entry], NameIndex] | None]) -> None:
        self.fetcher = fetcher
        self.nodes = nodes
        self.load_dir = load_dir
        self.cached_dir = cached_dir
        self._runs: OrderedDict[int, _Run] = OrderedDict()  # by directory inode
        self._credit: dict[str, int] = {}  # by mount: small directories that may still start a walk
        self._walks: dict[str, _Walk] = {}  # by mount: its bulk reader's walk
        self._last: dict[str, int] = {}  # by mount: the directory (inode) of the last first read
        self.moves = 0  # walks started and topped up (status, tests)

    def first_read(self, node: Node) -> None:
        """A file's first read in an open (cached or not): extend its directory's run, or
        follow the walk into it."""
        parent = self.nodes.get(node.parent)
        if parent is None or not parent.entry.hash or node.dbg is not None or node.mount.overlay is not None:
            return
        walk = self._walks.get(node.mount.name)
        if walk is not None and parent.entry.hash in walk.planned:
            self._entered(walk, parent.entry.hash)
        d = self.cached_dir(parent.entry.hash)
        if d is None:
            return
        entries, index = d
        i = index.get(node.entry.name)
        if i is None:
            return
        mount = node.mount.name
        came_from = self._last.get(mount)
        self._last[mount] = parent.ino
        run = self._runs.get(parent.ino)
        if run is None:
            files = sum(1 for e in entries if e.kind == KIND_FILE and e.size)
            before = self._runs.get(came_from) if came_from is not None else None
            run = self._runs[parent.ino] = _Run(need=min(RUN, files), small=files <= RUN,
                                                after_whole=before is not None and before.read_whole)
            if len(self._runs) > TRACKED:
                self._runs.popitem(last=False)
        self._runs.move_to_end(parent.ino)
        if i == run.last:
            return  # the same file again
        # the next file with content in name order (nothing but directories, links and empty
        # files between), or the first one: the run goes on
        nxt = run.last < i <= run.last + GAP and not any(e.kind == KIND_FILE and e.size
                                                         for e in entries[run.last + 1:i])
        run.length = run.length + 1 if nxt else 1
        run.last = i
        if run.moved or run.length < run.need or self.fetcher.nursery is None:
            return
        run.moved = True
        if walk is not None and not walk.ended and (walk.start is parent or parent.entry.hash in walk.passed):
            return  # a directory of the walk under way
        if run.small and not (run.after_whole and run.read_whole):  # a walk only if one is under way
            if self._credit.get(mount, 0) <= 0:
                return
            self._credit[mount] -= 1
        else:
            self._credit[mount] = CREDIT
        self.fetcher.nursery.start_soon(self._start, parent, i)

    def in_pass(self, node: Node) -> bool:
        """Whether `node`'s first read is part of a bulk reader's pass: the next file of a run
        in name order, or a file of a walk's directory."""
        parent = self.nodes.get(node.parent)
        if parent is None:
            return False
        run = self._runs.get(parent.ino)
        if run is not None and run.length >= 2:
            return True
        walk = self._walks.get(node.mount.name)
        return walk is not None and not walk.ended and (
            walk.start is parent or parent.entry.hash in walk.planned or parent.entry.hash in walk.passed)

    def _entered(self, walk: _Walk, h: str) -> None:
        """The reader is in planned directory `h`: it and those before it are behind it."""
        while walk.planned:
            k, n = walk.planned.popitem(last=False)
            walk.ahead -= n
            walk.passed[k] = None
            if len(walk.passed) > TRACKED:
                walk.passed.popitem(last=False)
            if k == h:
                break
        if not walk.running and not walk.ended and self.fetcher.nursery is not None:
            walk.running = True
            self.fetcher.nursery.start_soon(self._top_up, walk)

    async def _start(self, start: Node, after: int) -> None:
        old = self._walks.get(start.mount.name)
        if old is not None:
            old.ended = True
        walk = self._walks[start.mount.name] = _Walk(start, _Cursor(self, start))
        walk.running = True
        try:
            entries, _ = await self.load_dir(start.entry.hash, start.mount.cfg.cache_grid)
            walk.ahead, _ = self._ask(start, entries[after + 1:], packs=False)  # (its packs came on its first read)
        except FetchError as e:
            walk.running = False
            walk.ended = True
            log.debug("bulk read from %s stopped: %s", start.entry.name, e)
            return
        await self._top_up(walk)

    async def _top_up(self, walk: _Walk) -> None:
        """Plan directories in walk order until the window is full again."""
        start = walk.start
        self.moves += 1
        asked = 0
        try:
            while not walk.ended and walk.ahead < WINDOW_BYTES and len(walk.planned) < WINDOW_DIRS:
                h = await walk.cursor.next()
                if h is None:
                    walk.ended = True
                    break
                entries, _ = await self.load_dir(h, start.mount.cfg.cache_grid)
                if walk.ended:
                    break
                n, _ = self._ask(start, entries, packs=True)
                walk.planned[h] = walk.planned.get(h, 0) + n
                walk.ahead += n
                asked += n
        except FetchError as e:  # a directory object unavailable: the reader will see it itself
            walk.ended = True
            log.debug("bulk read from %s stopped: %s", start.entry.name, e)
        finally:
            walk.running = False
        log.debug("bulk read from %s: %d bytes asked for, %d ahead in %d directories", start.entry.name, asked,
                  walk.ahead, len(walk.planned), extra={"AYSFS_MOUNT": start.mount.name})

    def _ask(self, start: Node, entries: list[Entry], packs: bool) -> tuple[int, bool]:
        """Ask for the missing file packs (with `packs`) and unpacked one-blob files among
        `entries`: (bytes asked for, whether there was any such content)."""
        mp = start.mount
        cfg = mp.cfg
        asked = 0
        content = False
        if packs:
            for p, ms in pack_members(entries, KIND_FILE).items():
                content = True
                if any(self.fetcher.missing(m) for m, _, _ in ms):
                    self.fetcher.fetch_pack(p, ms, local=cfg.cache_local, grid=cfg.cache_grid,
                                            account=mp.bytes_by_tier)
                    asked += ms[-1][1] + ms[-1][2]
        alone = [e for e in entries if e.kind == KIND_FILE and e.size and e.hash and not e.pack]
        content = content or bool(alone)
        todo = [e for e in alone if self.fetcher.missing(e.hash)]
        if todo:
            self.fetcher.fetch_many([e.hash for e in todo], local=cfg.cache_local, grid=cfg.cache_grid,
                                    account=mp.bytes_by_tier)
            asked += sum(e.size for e in todo)
        return asked, content
