"""File content for READ: chunks from the local cache, else through the tiers (the download
manager is aysfsd.tiers.Fetcher; this module decides what to ask it for, and when).

Besides the chunk a READ needs: a small file's first miss brings its directory's small files
(packs, or the files in parallel), a sequential reader of a big file has the next chunks in
flight, every first read tells the bulk-read window (aysfsd.fuse.bulkread) where a reader
going through a tree in order is, and a cold Python module's imports are fetched ahead
(aysfsd.fuse.importhints).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

import pyfuse3

from ..tiers import Fetcher, FetchError
from ..tiers.local import LocalCache
from ..tree.objects import CHUNK_SIZE, KIND_FILE, pack_members
from .bulkread import BulkWindow
from .catalog import Catalog
from .importhints import ImportHints
from .nodes import Node, OpenFile

log = logging.getLogger("aysfsd.fuse.content")

SIBLING_MAX_SIZE = 256 * 1024  # small files of a directory are fetched together...
SIBLING_MAX_FILES = 256  # ...up to this many at a time
READAHEAD_CHUNKS = 6  # chunks a sequential reader has fetched ahead of it (24 MiB)
PACKS_AT_ONCE = 16  # packs of a directory fetched together (see fetch_siblings)

Need = Callable[[Node, int, str, int], None]  # (node, chunk index, blob, size): a start watch's hook


class ContentReader:
    """The bytes of open files (see the module docstring)."""

    def __init__(self, fetcher: Fetcher, cache: LocalCache, catalog: Catalog, nodes: dict[int, Node],
                 need: Need) -> None:
        self.fetcher = fetcher
        self.cache = cache
        self.catalog = catalog
        self.nodes = nodes
        self.need = need
        self.bulk = BulkWindow(fetcher, nodes, catalog.load_dir, catalog.in_memory)
        self.hints = ImportHints(fetcher, catalog, nodes, self.bulk.in_pass)

    async def read(self, of: OpenFile, off: int, size: int) -> bytes | memoryview:
        """Up to `size` bytes of `of`'s tree entry at `off`; EIO (FUSEError) when a blob cannot be had."""
        e, mp = of.entry, of.node.mount
        end = min(off + size, e.size)
        if off >= end:
            return b""
        pieces = e.blobs()
        first = off == 0 and of.next_off == 0
        if first:
            self.bulk.first_read(of.node)  # a reader going through a tree in order? (see aysfsd.fuse.bulkread)
        if off == of.next_off and len(pieces) > 1:
            # A sequential reader: the next chunks are fetched beside this one. Decided and moved on
            # before any wait: the kernel sends its read-ahead READs while the first one waits.
            nxt = (end - 1) // CHUNK_SIZE + 1
            for h, _ in pieces[nxt:nxt + READAHEAD_CHUNKS]:
                self.fetcher.readahead(h, local=mp.cfg.cache_local, grid=mp.cfg.cache_grid,
                                       account=mp.bytes_by_tier)
        of.next_off = end
        out: list[bytes | memoryview] = []
        pos = off
        while pos < end:
            idx = pos // CHUNK_SIZE
            h, csize = pieces[idx]
            coff = pos - idx * CHUNK_SIZE
            n = min(end - pos, csize - coff)
            if mp.watch is not None:
                self.need(of.node, idx, h, csize)
            data: bytes | memoryview | None = self.cache.get_range(h, coff, n)
            if data is None:
                mp.misses += 1
                self.hints.missed(mp)
                if of.dbg is None and 0 < e.size <= SIBLING_MAX_SIZE and not (
                        mp.profile is not None and mp.profile.fetching(h)):
                    await self.fetch_siblings(of.node)  # (a profile fetching `h` ahead knows better)
                try:
                    blob = await self.fetcher.get(h, local=mp.cfg.cache_local, grid=mp.cfg.cache_grid,
                                                  account=mp.bytes_by_tier)
                except FetchError as err:
                    mp.count_eio(err.cause)
                    log.error("mount %s: read of %r failed: %s", mp.name, e.name, err,
                              extra={"AYSFS_MOUNT": mp.name, "AYS_ID": mp.cfg.id, "BLOB": h})
                    raise pyfuse3.FUSEError(errno.EIO) from None
                if len(blob) != csize:
                    mp.count_eio("bad_tree")
                    log.error("mount %s: blob %s is %d bytes, tree says %d", mp.name, h, len(blob), csize,
                              extra={"AYSFS_MOUNT": mp.name, "BLOB": h})
                    raise pyfuse3.FUSEError(errno.EIO)
                # a view, not a copy, of a big read (the blob is immutable bytes)
                data = memoryview(blob)[coff:coff + n] if n > 65536 else blob[coff:coff + n]
            else:
                mp.hits += 1
                mp.bytes_by_tier["local"] += len(data)
            out.append(data)
            pos += n
        mp.bytes_read += end - off
        if first and of.dbg is None:
            self.hints.first_read(of.node)  # a module of a cold Python start: its imports next
        return out[0] if len(out) == 1 else b"".join(out)

    async def fetch_siblings(self, node: Node) -> None:
        """On a cache miss of a small file (its first read), fetch its small siblings too:
        programs read a directory's files one after the other (imports, tar, cp), and from a
        remote stor each one alone would cost a round trip. Packed files come with their
        directory's packs; in a tree published without packs the small siblings are fetched
        in parallel. Called from the read path, not open(): with no OPEN requests (kernel
        no_open mode) a read is the first the daemon hears of a file's content."""
        parent = self.nodes.get(node.parent)
        if parent is None or not parent.entry.hash or parent.siblings_fetched:
            return
        cfg = parent.mount.cfg
        entries, _ = await self.catalog.load_dir(parent.entry.hash, grid=cfg.cache_grid)
        if node.entry.pack:
            # the file's pack and the directory's next ones, in parallel: the directory is the
            # unit of locality (imports, tar), and a pack is at most PACK_SIZE
            by_pack = pack_members(entries, KIND_FILE)
            packs = list(by_pack)
            i = packs.index(node.entry.pack) if node.entry.pack in packs else 0
            todo = (packs[i:] + packs[:i])[:PACKS_AT_ONCE]
            parent.siblings_fetched = len(todo) == len(packs)
            for pack in todo:
                self.fetcher.fetch_pack(pack, by_pack[pack], local=cfg.cache_local, grid=cfg.cache_grid,
                                        account=parent.mount.bytes_by_tier)
            return
        if any(e.pack for e in entries if e.kind == KIND_FILE):
            return  # a file too big for a pack: just itself (packs cover the small ones)
        parent.siblings_fetched = True
        hashes = [e.hash for e in entries
                  if e.kind == KIND_FILE and e.hash and 0 < e.size <= SIBLING_MAX_SIZE][:SIBLING_MAX_FILES]
        self.fetcher.fetch_many(hashes, local=cfg.cache_local, grid=cfg.cache_grid, account=parent.mount.bytes_by_tier)
