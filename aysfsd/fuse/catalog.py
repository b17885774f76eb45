"""The catalog: the directory objects of every mounted version (CernVM-FS's catalog manager).

It owns them: decoded and validated once, the most used kept in memory (LRU), all of them in
the local cache. Loading a directory asks for its subdirectories' objects one level ahead
(walks need them next); a version's first lookup asks for its tree packs (aysfsd.fuse.treeload)
beside its root object. Operations, prefetch, profiles and the bulk-read window ask it; none
of them keeps directory objects of its own.
"""

from __future__ import annotations

import errno
import logging
from collections import OrderedDict

import pyfuse3

from ..tiers import Fetcher
from ..tiers.local import LocalCache
from ..tree.objects import KIND_DIR, Entry, NameIndex, TreeError, decode_dir, pack_members
from .treeload import TreeLoader

log = logging.getLogger("aysfsd.fuse.catalog")

DIR_CACHE = 8192  # decoded directory objects kept in memory
NAMES_CACHE = 256  # directories whose encoded names are kept for readdir

Directory = tuple[list[Entry], NameIndex]


class Catalog:
    """Directory objects by hash, fetched through the tiers and kept (see the module docstring)."""

    def __init__(self, fetcher: Fetcher, cache: LocalCache) -> None:
        self.fetcher = fetcher
        self.cache = cache
        self.trees = TreeLoader(fetcher)
        self._dirs: OrderedDict[str, Directory] = OrderedDict()
        self._names: OrderedDict[str, list[bytes]] = OrderedDict()  # encoded names of listed directories

    def in_memory(self, h: str) -> Directory | None:
        """A directory object already decoded, or None (never fetches)."""
        return self._dirs.get(h)

    def cached_entries(self, h: str) -> list[Entry] | None:
        """A directory object's entries from memory or the local cache, without fetching."""
        d = self._dirs.get(h)
        if d is not None:
            return d[0]
        data = self.cache.get(h)
        if data is None:
            return None
        try:
            return decode_dir(data, h)
        except TreeError as e:
            log.error("%s", e, extra={"BLOB": h})
            return None

    async def load_dir(self, h: str, grid: bool = True, ahead: bool = True) -> Directory:
        """A directory object by hash, decoded and validated (kept in memory and LMDB); an
        invalid one is EIO (FUSEError)."""
        d = self._dirs.get(h)
        if d is not None:
            self._dirs.move_to_end(h)
            return d
        data = await self.fetcher.get(h, local=True, grid=grid)  # metadata is always kept locally
        try:
            entries = decode_dir(data, h)
        except TreeError as e:
            log.error("%s", e, extra={"BLOB": h})
            raise pyfuse3.FUSEError(errno.EIO) from None
        if ahead:
            self._subdirs_ahead(entries, grid)
        d = (entries, NameIndex(entries))
        self._dirs[h] = d
        if len(self._dirs) > DIR_CACHE:
            self._dirs.popitem(last=False)
        return d

    def _subdirs_ahead(self, entries: list[Entry], grid: bool) -> None:
        """One level ahead: directory walks (find, imports, tar) need the subdirectories next;
        their objects come in packs (see aysfsd.tree.objects), the others in parallel. (Those that
        tree packs bring are in flight already: nothing is asked twice.)"""
        for pack, members in pack_members(entries, KIND_DIR).items():
            self.fetcher.fetch_pack(pack, members, local=True, grid=grid, account=None)
        self.fetcher.fetch_many([e.hash for e in entries if e.kind == KIND_DIR and not e.pack], local=True,
                                grid=grid, account=None)

    async def load_top(self, h: str, grid: bool) -> None:
        """The first lookup in a version not cached: its tree packs (see aysfsd.fuse.treeload) are
        asked for beside its root object, then only what they do not bring is fetched ahead."""
        if h in self._dirs or self.cache.has(h):
            if self.trees.claiming(h):  # another first lookup in progress (a profile's player): its claims first
                await self.trees.wait(h)
            return
        self.trees.start(h, grid=grid)
        entries, _ = await self.load_dir(h, grid=grid, ahead=False)
        await self.trees.wait(h)
        self._subdirs_ahead(entries, grid)

    async def load_root(self, h: str, grid: bool = True) -> Directory:
        """A version's root directory, loaded as a mount's first lookup loads it (tree packs)."""
        await self.load_top(h, grid)
        return await self.load_dir(h, grid=grid)

    def encoded_names(self, h: str, entries: list[Entry]) -> list[bytes]:
        """The names of a directory's entries as readdir sends them, encoded once per directory."""
        names = self._names.get(h)
        if names is None:
            names = self._names[h] = [e.name.encode("utf-8", "surrogateescape") for e in entries]
            if len(self._names) > NAMES_CACHE:
                self._names.popitem(last=False)
        else:
            self._names.move_to_end(h)
        return names
