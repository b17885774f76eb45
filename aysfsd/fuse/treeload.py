"""Loading a version's tree packs (see aysfsd.tree.packs) on the first lookup in its mount.

The pack list comes from the start file the mount asked for with its ref, when that is of
this version (see aysfsd.tree.start; the index is then given to writable grid caches without
it), else from the tree index of the first grid cache or stor that has it (written back to the
grid caches before it, like a blob: it is trusted for nothing); then the packs are
fetched in parallel, a few at a time, through the fetcher: each pack checked against its
hash, each member against its own, members stored in the local cache as blobs of their own
(a pack is never kept whole), and a reader that needs a member meanwhile waits for its pack
instead of asking again. Anything missing or wrong costs speed only: the members the packs
did not deliver are fetched one by one when the walk needs them, as in a tree without packs.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import trio

from ..stores import StoreError
from ..tiers import Fetcher, Source
from ..tree.packs import TreeIndexError, TreePack, decode_index, encode_index, tree_path
from .startfiles import StartAsk

log = logging.getLogger("aysfsd.fuse.treeload")

PACKS_AT_ONCE = 8
ROOTS_REMEMBERED = 256


class TreeLoader:
    """Starts, once per root, the background load of its tree packs."""

    def __init__(self, fetcher: Fetcher) -> None:
        self.fetcher = fetcher
        self._claimed: OrderedDict[str, trio.Event] = OrderedDict()  # by root (bounded)

    def start(self, root: str, *, grid: bool, packs: list[TreePack] | None = None,
              asked: StartAsk | None = None) -> None:
        """Load the tree packs of `root` (listed in `packs`, or in the start file `asked` for
        with the ref when it is of `root`, or in its index) in the background unless asked before."""
        if root in self._claimed or self.fetcher.nursery is None:
            return
        claimed = self._claimed[root] = trio.Event()
        if len(self._claimed) > ROOTS_REMEMBERED:
            self._claimed.popitem(last=False)
        self.fetcher.nursery.start_soon(self.load, root, grid, claimed, packs, asked)

    def claiming(self, root: str) -> bool:
        """True while the tree index of `root` is being read and its packs' members claimed."""
        ev = self._claimed.get(root)
        return ev is not None and not ev.is_set()

    async def wait(self, root: str) -> None:
        """Return once the tree index of `root` was read (or found missing or refused) and its
        packs' members are claimed: from then on, a reader of one waits for its pack."""
        ev = self._claimed.get(root)
        if ev is not None:
            await ev.wait()

    async def load(self, root: str, grid: bool, claimed: trio.Event | None = None,
                   packs: list[TreePack] | None = None, asked: StartAsk | None = None) -> int:
        """Fetch the tree packs of `root` (those with members not cached); the count fetched.
        `grid`: the mount's cache.grid (write-back of the index and packs to grid caches)."""
        done = 0
        try:
            if packs is None and asked is not None:
                sf = await asked.start_file(root)
                if sf is not None:
                    packs = sf.packs
                    if grid and sf.packs and self.fetcher.nursery is not None:
                        self.fetcher.nursery.start_soon(self._share_index, root, sf.packs)
            if packs is None:
                packs = await self.index(root, write_back=grid)
            done = await self.fetcher.load_packs([(p.hash, list(p.members)) for p in packs], grid=grid,
                                                 at_once=PACKS_AT_ONCE, claimed=claimed)
        except Exception:  # never the daemon's end: the directories are then fetched one by one
            log.exception("tree %s: loading its tree packs failed", root)
        finally:
            if claimed is not None:
                claimed.set()
        self.fetcher.counters.tree_packs += done
        log.debug("tree %s: %d of %d tree packs fetched", root, done, len(packs or ()))
        return done

    async def index(self, root: str, write_back: bool = True) -> list[TreePack]:
        """The tree index of `root` from the first grid cache or stor that has one (it is
        trusted for nothing, see aysfsd.tree.packs); [] when none does (a tree published
        without, or nothing reachable) or it is refused (logged). With `write_back`, the
        writable grid caches asked before are given it (the tree packs go there as blobs:
        without the index they would be of no use to the next node)."""
        rel = tree_path(root)
        missed: list[Source] = []
        for src in self.fetcher.grid + self.fetcher.stors:
            if src.is_down():
                continue
            data: bytes | None = None
            with trio.move_on_after(self.fetcher.timeout):
                try:
                    data = await src.store.fetch(rel)
                except StoreError as e:
                    log.debug("tree index of %s from %s: %s", root, src.name, e, extra={"SOURCE": src.name})
                    continue
            if data is None:
                if src.tier == "grid" and src.writable:
                    missed.append(src)
                continue
            try:
                packs = decode_index(data, root)
            except TreeIndexError as e:
                log.warning("%s (from %s): ignored, directories are fetched one by one", e, src.name,
                            extra={"SOURCE": src.name, "BLOB": root})
                return []
            if write_back:
                for g in missed:
                    await self._write_back(g, rel, data)
            return packs
        return []

    async def _share_index(self, root: str, packs: list[TreePack]) -> None:
        """The index of packs found in a start file, to the writable grid caches without it:
        a node that reaches no stor finds it there (see index)."""
        rel = tree_path(root)
        data = encode_index(root, [(p.hash, [(m, s) for m, _, s in p.members]) for p in packs])
        for g in self.fetcher.grid:
            if not g.writable or g.is_down():
                continue
            try:
                with trio.move_on_after(self.fetcher.timeout):
                    if await g.store.contains(rel):
                        continue
            except StoreError:
                continue
            await self._write_back(g, rel, data)

    async def _write_back(self, g: Source, rel: str, data: bytes) -> None:
        try:
            with trio.move_on_after(self.fetcher.timeout):
                await g.store.store(rel, data)
        except StoreError as e:
            log.warning("grid cache %s: could not write %s: %s", g.name, rel, e, extra={"SOURCE": g.name})
