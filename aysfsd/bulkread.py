"""Bulk readers (tar, cp -r, rsync, a checksum pass): keep the next directories' packs in flight.

Such a reader goes through a directory's files in name order, every one, then on to the next
directory in walk order (depth first, name order). Seen from the daemon, that is a run of
first reads of a directory's files each the next one in name order (no file skipped). After
RUN such reads (or every file of a smaller directory), what the directories that come next in
walk order hold (their file packs, and their files too big for a pack, one blob each) and the
rest of this directory's files too big for a pack are requested, up to WINDOW_DIRS directories
and WINDOW_BYTES (chunked files are left to the sequential read-ahead): while
the reader works through them, each one it enters moves the window on, so the link has the
next directories' bytes on it instead of waiting for the reader to ask, directory by directory.
A directory of fewer than RUN files, read whole and in order, moves the window only shortly
after a full run elsewhere (CREDIT such directories): alone, that is what an import does too.

`find` reads no file and an application start reads some files of a directory, out of order,
skipping most: neither makes a run, so neither is made to download what it does not read.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from .nodes import Node
from .tiers import Fetcher, FetchError
from .tree import KIND_DIR, KIND_FILE, Entry, NameIndex, pack_members

log = logging.getLogger("aysfsd.bulkread")

RUN = 4  # files read one after the other, in name order, before a directory counts as walked
CREDIT = 2 * 8  # after such a run, directories with fewer files read whole that move the window too
WINDOW_DIRS = 8  # directories ahead (in walk order) whose packs are kept in flight
WINDOW_BYTES = 16 << 20  # bytes asked for per step, at most (one pack or file over)
SCAN_DIRS = 64  # directories looked at per step, with or without packs
TRACKED = 1024  # directories whose reads are followed
GAP = 64  # entries looked at between two reads (a longer jump is not "the next file")


@dataclass(slots=True)
class _Run:
    need: int  # run length that moves the window (RUN, or every file of a smaller directory)
    last: int = -1  # entry index of the last file read
    length: int = 0
    moved: bool = False  # the window was moved from here


class BulkWindow:
    """Follows first reads per directory and moves the window (see the module docstring)."""

    def __init__(self, fetcher: Fetcher, nodes: dict[int, Node],
                 load_dir: Callable[[str, bool], Awaitable[tuple[list[Entry], NameIndex]]],
                 cached_dir: Callable[[str], tuple[list[Entry], NameIndex] | None]) -> None:
        self.fetcher = fetcher
        self.nodes = nodes
        self.load_dir = load_dir
        self.cached_dir = cached_dir
        self._runs: OrderedDict[int, _Run] = OrderedDict()  # by directory inode
        self._credit: dict[str, int] = {}  # by mount: small directories that may still move the window
        self.moves = 0  # windows moved (status, tests)

    def first_read(self, node: Node) -> None:
        """A file's first read in an open (cached or not): extend its directory's run."""
        parent = self.nodes.get(node.parent)
        if parent is None or not parent.entry.hash or node.dbg is not None or node.mount.overlay is not None:
            return
        d = self.cached_dir(parent.entry.hash)
        if d is None:
            return
        entries, index = d
        i = index.get(node.entry.name)
        if i is None:
            return
        run = self._runs.get(parent.ino)
        if run is None:
            files = sum(1 for e in entries if e.kind == KIND_FILE and e.size)
            run = self._runs[parent.ino] = _Run(need=min(RUN, files))
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
        if run.need < RUN:  # every file of a small directory: a walk only if one is under way
            if self._credit.get(node.mount.name, 0) <= 0:
                return
            self._credit[node.mount.name] -= 1
        else:
            self._credit[node.mount.name] = CREDIT
        run.moved = True
        self.fetcher.nursery.start_soon(self._move, parent, i)

    async def _move(self, start: Node, after: int) -> None:
        try:
            await self.move(start, after)
        except FetchError as e:  # a directory object unavailable: the reader will see it itself
            log.debug("bulk read window from %s stopped: %s", start.entry.name, e)

    async def move(self, start: Node, after: int = -1) -> int:
        """Request what the directories after `start` in walk order hold (their file packs,
        their files that are no pack's members) and the files of `start` past entry `after`
        that are in no pack; the bytes asked for."""
        grid = start.mount.cfg.cache_grid
        self.moves += 1
        entries, _ = await self.load_dir(start.entry.hash, grid)
        asked, _ = self._ask(start, entries[after + 1:], packs=False)  # (its packs came on its first read)
        dirs = 0
        async for h in self._after(start):
            entries, _ = await self.load_dir(h, grid)
            n, content = self._ask(start, entries, packs=True)
            asked += n
            dirs += content
            if dirs >= WINDOW_DIRS or asked >= WINDOW_BYTES:
                break
        log.debug("bulk read from %s: %d bytes of %d directories ahead asked for", start.entry.name, asked, dirs,
                  extra={"AYSFS_MOUNT": start.mount.name})
        return asked

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

    async def _after(self, start: Node) -> AsyncIterator[str]:
        """Hashes of the directories after `start` in walk order: its subtree first, then the
        rest of each ancestor's; at most SCAN_DIRS."""
        grid = start.mount.cfg.cache_grid
        seen = 0
        stack: list[str] = []  # directories to go into, the next one last

        async def subdirs(h: str, after: str = "") -> list[str]:
            entries, _ = await self.load_dir(h, grid)
            return [e.hash for e in entries if e.kind == KIND_DIR and e.hash and e.name > after]

        node: Node | None = start
        stack = list(reversed(await subdirs(start.entry.hash)))
        while node is not None and seen < SCAN_DIRS:
            while stack and seen < SCAN_DIRS:
                h = stack.pop()
                seen += 1
                yield h
                stack.extend(reversed(await subdirs(h)))
            if node.ino == node.mount.top_ino:
                break
            parent = self.nodes.get(node.parent)
            if parent is None or not parent.entry.hash:
                break
            stack = list(reversed(await subdirs(parent.entry.hash, node.entry.name)))
            node = parent
