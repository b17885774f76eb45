"""The FUSE operations: one pyfuse3 session whose top-level directories are the mounts.

Inode 1 is the session root; each mount (one ays) is a directory under it with a
stable inode, bind-mounted by the daemon onto its configured mountpoint. Below a
mount top, inodes are handed out as the kernel looks names up and dropped when it
forgets them. Content under a hash never changes, so entries, attributes and page
cache are kept by the kernel for a long time (`keep_cache`); a new version swaps the
mount top's tree and invalidates the top's entries, so new lookups see new inodes
while open files keep reading the blobs they were opened on.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyfuse3
import trio

from .cache import LocalCache
from .config import AysConfig
from .fetch import Fetcher, FetchError
from .ref import Ref
from .tree import CHUNK_SIZE, KIND_DIR, KIND_FILE, KIND_LINK, Entry, TreeError, decode_dir

log = logging.getLogger("aysfsd.fs")

ROOT_INO = pyfuse3.ROOT_INODE
TREE_TIMEOUT = 86400.0  # content is immutable: let the kernel cache names and attributes
TOP_TIMEOUT = 1.0
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT
DIR_CACHE = 8192  # decoded directory objects kept in memory

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def guarded(fn: F) -> F:
    """pyfuse3 ends the session on any exception but FUSEError: log it, answer EIO."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kw: Any) -> Any:
        try:
            return await fn(*args, **kw)
        except pyfuse3.FUSEError:
            raise
        except trio.Cancelled:
            raise
        except Exception:
            log.exception("unexpected error in %s%r", fn.__name__, args[1:])
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


def erofs(*_a: Any, **_k: Any) -> Awaitable[Any]:
    async def fail() -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    return fail()


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
    bytes_by_tier: dict[str, int] = field(default_factory=lambda: {"local": 0, "grid": 0, "stor": 0})
    prefetch: dict[str, object] | None = None

    @property
    def name(self) -> str:
        return self.cfg.name

    def top_entry(self) -> Entry:
        mtime = int((self.ref.time if self.ref else self.since) * 1e9)
        return Entry(self.cfg.name, KIND_DIR, 0o755, 0, mtime, hash=self.ref.root if self.ref else "")


@dataclass(slots=True)
class Node:
    ino: int
    mount: MountPoint
    entry: Entry
    parent: int
    lookups: int = 0
    children: dict[str, int] | None = None


@dataclass(slots=True)
class OpenFile:
    node: Node
    entry: Entry


class Operations(pyfuse3.Operations):
    """Read-only operations over the trees of all mounts (debug writes come later)."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, fetcher: Fetcher, cache: LocalCache) -> None:
        super().__init__()
        self.fetcher = fetcher
        self.cache = cache
        self.mounts: dict[str, MountPoint] = {}  # by name
        self.nodes: dict[int, Node] = {}
        self.open_files: dict[int, OpenFile] = {}
        self._next_ino = ROOT_INO + 1
        self._next_fh = 1
        self._dirs: OrderedDict[str, tuple[list[Entry], dict[str, int]]] = OrderedDict()
        self.started = time.time()
        cache.set_pinned(self.pinned_blobs)

    # -- mounts -------------------------------------------------------------------------------

    def _new_ino(self) -> int:
        ino = self._next_ino
        self._next_ino += 1
        return ino

    def add_mount(self, cfg: AysConfig) -> MountPoint:
        mp = MountPoint(cfg, self._new_ino())
        self.mounts[cfg.name] = mp
        self.nodes[mp.top_ino] = Node(mp.top_ino, mp, mp.top_entry(), ROOT_INO, lookups=1)
        return mp

    def remove_mount(self, name: str, notify_kernel: bool = True) -> None:
        mp = self.mounts.pop(name, None)
        if mp is None:
            return
        top = self.nodes.get(mp.top_ino)
        if top is not None:
            top.children = None
            top.lookups = 0
        if notify_kernel:
            pyfuse3.invalidate_entry_async(ROOT_INO, name.encode(), ignore_enoent=True)

    def set_ref(self, mp: MountPoint, ref: Ref) -> None:
        """Switch a mount to another version: new lookups see it, open files keep theirs."""
        old = mp.ref
        mp.ref = ref
        top = self.nodes[mp.top_ino]
        top.entry = mp.top_entry()
        if old is not None and old.root != ref.root:
            names = list(top.children or ())
            top.children = None
            for name in names:
                pyfuse3.invalidate_entry_async(mp.top_ino, name.encode("utf-8", "surrogateescape"),
                                               ignore_enoent=True)
            try:
                pyfuse3.invalidate_inode(mp.top_ino, attr_only=False)
            except OSError:
                pass

    def pinned_blobs(self) -> list[str]:
        return [h for of in list(self.open_files.values()) for h, _ in of.entry.blobs()]

    # -- tree access --------------------------------------------------------------------------

    async def load_dir(self, h: str) -> tuple[list[Entry], dict[str, int]]:
        """A directory object by hash, decoded and validated (kept in memory and LMDB)."""
        d = self._dirs.get(h)
        if d is not None:
            self._dirs.move_to_end(h)
            return d
        data = await self.fetcher.get(h, local=True, grid=True)
        try:
            entries = decode_dir(data, h)
        except TreeError as e:
            log.error("%s", e, extra={"BLOB": h})
            raise pyfuse3.FUSEError(errno.EIO) from None
        d = (entries, {e.name: i for i, e in enumerate(entries)})
        self._dirs[h] = d
        if len(self._dirs) > DIR_CACHE:
            self._dirs.popitem(last=False)
        return d

    def _node(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return node

    async def _dir_of(self, node: Node) -> tuple[list[Entry], dict[str, int]]:
        if node.entry.kind != KIND_DIR:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if not node.entry.hash:
            return [], {}
        try:
            return await self.load_dir(node.entry.hash)
        except FetchError as e:
            log.error("mount %s: directory unavailable: %s", node.mount.name, e,
                      extra={"AYSFS_MOUNT": node.mount.name, "AYS_ID": node.mount.cfg.id})
            raise pyfuse3.FUSEError(errno.EIO) from None

    def _child(self, parent: Node, entry: Entry) -> Node:
        if parent.children is None:
            parent.children = {}
        ino = parent.children.get(entry.name)
        node = self.nodes.get(ino) if ino is not None else None
        if node is None or node.entry != entry:
            node = Node(self._new_ino(), parent.mount, entry, parent.ino)
            self.nodes[node.ino] = node
            parent.children[entry.name] = node.ino
        return node

    def _attr(self, ino: int, e: Entry, timeout: float = TREE_TIMEOUT) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.generation = 0
        a.entry_timeout = timeout
        a.attr_timeout = timeout
        kind = {KIND_FILE: stat.S_IFREG, KIND_DIR: stat.S_IFDIR, KIND_LINK: stat.S_IFLNK}[e.kind]
        a.st_mode = kind | e.mode
        a.st_nlink = 2 if e.kind == KIND_DIR else 1
        a.st_uid = 0
        a.st_gid = 0
        a.st_rdev = 0
        a.st_size = e.size if e.kind != KIND_DIR else 4096
        a.st_blksize = 128 * 1024
        a.st_blocks = (a.st_size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = e.mtime_ns
        return a

    def _root_attr(self) -> pyfuse3.EntryAttributes:
        e = Entry("", KIND_DIR, 0o755, 0, int(self.started * 1e9))
        return self._attr(ROOT_INO, e, TOP_TIMEOUT)

    def _node_attr(self, node: Node) -> pyfuse3.EntryAttributes:
        timeout = TOP_TIMEOUT if node.ino == node.mount.top_ino else TREE_TIMEOUT
        return self._attr(node.ino, node.entry, timeout)

    # -- FUSE handlers ------------------------------------------------------------------------

    @guarded
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None,
                     ) -> pyfuse3.EntryAttributes:
        sname = name.decode("utf-8", "surrogateescape")
        if parent_inode == ROOT_INO:
            mp = self.mounts.get(sname)
            if mp is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            node = self.nodes[mp.top_ino]
            node.lookups += 1
            return self._node_attr(node)
        parent = self._node(parent_inode)
        entries, index = await self._dir_of(parent)
        i = index.get(sname)
        if i is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        node = self._child(parent, entries[i])
        node.lookups += 1
        return self._node_attr(node)

    @guarded
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if inode == ROOT_INO:
            return self._root_attr()
        return self._node_attr(self._node(inode))

    def forget(self, inode_list: list[tuple[int, int]]) -> None:  # type: ignore[override]
        # must never raise (pyfuse3 calls it outside the request guard)
        try:
            for ino, n in inode_list:
                node = self.nodes.get(ino)
                if node is None:
                    continue
                node.lookups -= n
                if node.lookups <= 0 and node.ino != node.mount.top_ino:
                    del self.nodes[ino]
                    parent = self.nodes.get(node.parent)
                    if parent is not None and parent.children is not None:
                        if parent.children.get(node.entry.name) == ino:
                            del parent.children[node.entry.name]
        except Exception:
            log.exception("forget failed")

    @guarded
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != ROOT_INO:
            node = self._node(inode)
            if node.entry.kind != KIND_DIR:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @guarded
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if fh == ROOT_INO:
            mounts = sorted(self.mounts.values(), key=lambda m: m.name)
            for i, mp in enumerate(mounts[start_id:], start_id):
                node = self.nodes[mp.top_ino]
                if not pyfuse3.readdir_reply(token, mp.name.encode(), self._node_attr(node), i + 1):
                    return
                node.lookups += 1
            return
        parent = self._node(fh)
        entries, _ = await self._dir_of(parent)
        for i in range(start_id, len(entries)):
            node = self._child(parent, entries[i])
            name = entries[i].name.encode("utf-8", "surrogateescape")
            if not pyfuse3.readdir_reply(token, name, self._node_attr(node), i + 1):
                return
            node.lookups += 1

    @guarded
    async def releasedir(self, fh: int) -> None:
        return None

    @guarded
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        if node.entry.kind != KIND_LINK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.entry.target.encode("utf-8", "surrogateescape")

    @guarded
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if flags & WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        if node.entry.kind != KIND_FILE:
            raise pyfuse3.FUSEError(errno.EISDIR if node.entry.kind == KIND_DIR else errno.EINVAL)
        fh = self._next_fh
        self._next_fh += 1
        self.open_files[fh] = OpenFile(node, node.entry)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=False)

    @guarded
    async def read(self, fh: int, off: int, size: int) -> bytes:
        of = self.open_files.get(fh)
        if of is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        e, mp = of.entry, of.node.mount
        end = min(off + size, e.size)
        if off >= end:
            return b""
        pieces = e.blobs()
        out: list[bytes] = []
        pos = off
        while pos < end:
            idx = pos // CHUNK_SIZE
            h, csize = pieces[idx]
            coff = pos - idx * CHUNK_SIZE
            n = min(end - pos, csize - coff)
            data = self.cache.get_range(h, coff, n)
            if data is None:
                mp.misses += 1
                try:
                    blob = await self.fetcher.get(h, local=mp.cfg.cache_local, grid=mp.cfg.cache_grid,
                                                  account=mp.bytes_by_tier)
                except FetchError as err:
                    log.error("mount %s: read of %r failed: %s", mp.name, e.name, err,
                              extra={"AYSFS_MOUNT": mp.name, "AYS_ID": mp.cfg.id, "BLOB": h})
                    raise pyfuse3.FUSEError(errno.EIO) from None
                if len(blob) != csize:
                    log.error("mount %s: blob %s is %d bytes, tree says %d", mp.name, h, len(blob), csize,
                              extra={"AYSFS_MOUNT": mp.name, "BLOB": h})
                    raise pyfuse3.FUSEError(errno.EIO)
                data = blob[coff:coff + n]
            else:
                mp.hits += 1
                mp.bytes_by_tier["local"] += len(data)
            out.append(data)
            pos += n
        mp.bytes_read += end - off
        return out[0] if len(out) == 1 else b"".join(out)

    @guarded
    async def release(self, fh: int) -> None:
        self.open_files.pop(fh, None)

    @guarded
    async def flush(self, fh: int) -> None:
        return None

    @guarded
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        used = self.cache.size() // 4096
        s.f_blocks = max(used, self.cache.limit // 4096)
        s.f_bfree = s.f_bavail = 0
        s.f_files = len(self.nodes) + 1
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    @guarded
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)
        return True

    @guarded
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        raise pyfuse3.FUSEError(errno.ENODATA)

    @guarded
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return []

    # everything that would change the tree
    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = erofs  # type: ignore[assignment]
    write = create = setxattr = removexattr = erofs  # type: ignore[assignment]

    @guarded
    async def fsync(self, fh: int, datasync: bool) -> None:
        return None
