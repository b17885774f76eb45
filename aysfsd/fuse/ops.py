"""The FUSE operations: one pyfuse3 session whose top-level directories are the mounts.

Inode 1 is the session root; each mount (one ays) is a directory under it with a
stable inode, bind-mounted by the daemon onto its configured mountpoint. Below a
mount top, inodes are handed out as the kernel looks names up and dropped when it
forgets them. Content under a hash never changes, so entries, attributes and page
cache are kept by the kernel for a long time (`keep_cache`); a new version swaps the
mount top's tree and invalidates the top's entries, so new lookups see new inodes
while open files keep reading the blobs they were opened on.

With aysfs's patched pyfuse3 (`no_open`, see packaging/pyfuse3/) open and opendir answer
ENOSYS: the kernel then sends no OPEN, RELEASE, OPENDIR or RELEASEDIR for the whole
connection, keeps every file's page cache and caches directory listings, and READ and
READDIR name the inode instead of a file handle. An inode's content never changes (a new
version is new inodes), so nothing the kernel keeps can show another version's bytes.

The mounts, inodes, open files and their journal are the table in aysfsd.fuse.inodes; the
handlers here ask it, and alone talk to the kernel (replies and invalidations).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable

import pyfuse3

from ..config import AysConfig
from ..tiers import Fetcher, FetchError
from ..tiers.local import LocalCache
from ..tree.objects import KIND_DIR, KIND_FILE, KIND_LINK, Entry, NameIndex
from ..tree.profile import DIR_INDEX
from ..tree.ref import Ref
from .catalog import Catalog
from .content import ContentReader
from .debug_writes import DebugWrites
from .guard import erofs, guarded
from .inodes import ROOT_INO, Inodes
from .interrupts import CallerWatch
from .nodes import MountPoint, Node, OpenFile

log = logging.getLogger("aysfsd.fuse.ops")

TREE_TIMEOUT = 86400.0  # content is immutable: let the kernel cache names and attributes
TOP_TIMEOUT = 1.0
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT
_S_IF = {KIND_FILE: stat.S_IFREG, KIND_DIR: stat.S_IFDIR, KIND_LINK: stat.S_IFLNK}


class Operations(DebugWrites, pyfuse3.Operations):
    """Read-only operations over the trees of all mounts; writes only in debug mode (DebugWrites)."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False
    cache_symlinks = True  # patched pyfuse3: a symlink's target is fixed for its inode
    # patched pyfuse3: the kernel's READDIRPLUS_AUTO. It asks READDIRPLUS for a directory's first
    # reply and where lookups follow a listing, plain READDIR otherwise: `ls -f`, `find` and
    # os.listdir of a big directory then make the kernel no inode per entry (a 50,000-entry
    # listing: see bench/README.md). A plain reply's entries take no lookup count (token.plus).
    readdirplus_auto = True

    def __init__(self, fetcher: Fetcher, cache: LocalCache) -> None:
        super().__init__()
        self.fetcher = fetcher
        self.cache = cache
        self.catalog = Catalog(fetcher, cache)  # directory objects: every lookup and listing asks it
        self.callers = CallerWatch()  # requests of dying callers given up (aysfsd.fuse.interrupts)
        self.inodes = Inodes()  # mounts, nodes, open files and their journal (aysfsd.fuse.inodes)
        self.content = ContentReader(fetcher, cache, self.catalog, self.inodes.nodes, self._need)  # file bytes
        self.started = time.time()
        self._debug_mtimes = {}
        self.on_init: Callable[[], None] | None = None  # resuming a session: called on FUSE INIT
        self._root_mtime = int(self.started * 1e9)
        cache.set_pinned(self.inodes.pinned_blobs)

    def init(self) -> None:
        # must never raise (libfuse calls it while handling FUSE INIT)
        try:
            if self.on_init is not None:
                self.on_init()
        except Exception:
            log.exception("resuming the FUSE session failed")

    def interrupted(self, pid: int) -> bool:
        """Called by the patched pyfuse3 when the kernel interrupts a request of thread `pid`:
        True answers it EINTR now (see aysfsd.fuse.interrupts)."""
        return self.callers.on_interrupt(pid)

    @property
    def no_atomic_o_trunc(self) -> bool:
        """Read by the patched pyfuse3 at session start: in no_open mode there is no OPEN to
        carry O_TRUNC, so the kernel must send it as a SETATTR (a debug mount's `> file`)."""
        return self.inodes.no_open

    # -- mounts: the table changes in Inodes, the kernel is told here ---------------------------

    def add_mount(self, cfg: AysConfig) -> MountPoint:
        mp = self.inodes.add_mount(cfg)
        self._root_changed()
        return mp

    def _root_changed(self) -> None:
        """The list of mounts changed: a new mtime and no cached listing of the session root."""
        self._root_mtime = max(time.time_ns(), self._root_mtime + 1)
        try:
            pyfuse3.invalidate_inode(ROOT_INO, attr_only=False)
        except (OSError, RuntimeError):
            pass  # no session yet, or the kernel has nothing cached

    def remove_mount(self, name: str, notify_kernel: bool = True) -> None:
        if self.inodes.remove_mount(name) is not None and notify_kernel:
            pyfuse3.invalidate_entry_async(ROOT_INO, name.encode(), ignore_enoent=True)
            self._root_changed()

    def set_ref(self, mp: MountPoint, ref: Ref) -> None:
        """Switch a mount to another version: new lookups see it, open files keep theirs."""
        names = self.inodes.set_ref(mp, ref)
        if names is None:
            return
        for name in names:
            pyfuse3.invalidate_entry_async(mp.top_ino, name.encode("utf-8", "surrogateescape"),
                                           ignore_enoent=True)
        try:
            pyfuse3.invalidate_inode(mp.top_ino, attr_only=False)
        except OSError:
            pass

    # -- start watches (see aysfsd.fuse.startwatch) -------------------------------------------------

    def _need(self, node: Node, index: int, h: str, size: int) -> None:
        """Tell the mount's start watch, if any, that `node` needed blob `h` (chunk `index`)."""
        w = node.mount.watch
        if w is not None and w.active:
            w.need(h, size, lambda: self._where(node, index))

    def _where(self, node: Node, index: int) -> tuple[str, int] | None:
        path = self.inodes.path_of(node)
        return None if path is None else (path, index)

    async def _dir_of(self, node: Node) -> tuple[list[Entry], NameIndex]:
        if node.entry.kind != KIND_DIR:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if not node.entry.hash:
            return [], NameIndex([])
        self._need(node, DIR_INDEX, node.entry.hash, 0)
        mp, h = node.mount, node.entry.hash
        try:
            if node.ino == mp.top_ino:
                await self.catalog.load_top(h, mp.cfg.cache_grid)
            d = await self.catalog.load_dir(h, grid=mp.cfg.cache_grid)
        except FetchError as e:
            mp.count_eio(e.cause)
            log.error("mount %s: directory unavailable: %s", mp.name, e,
                      extra={"AYSFS_MOUNT": mp.name, "AYS_ID": mp.cfg.id})
            mp.unreadable_dir(h, str(e))
            raise pyfuse3.FUSEError(errno.EIO) from None
        except pyfuse3.FUSEError:  # an invalid directory object
            mp.count_eio("bad_tree")
            mp.unreadable_dir(h, f"directory object {h} is invalid (see the log)", invalid=True)
            raise
        if mp.unreadable:
            mp.readable_dir(h)
        return d

    async def recheck_unreadable(self, mp: MountPoint, at_most: int = 4) -> None:
        """Read again the directories of `mp` whose fetch failed (the newest first), so that a
        degraded mount is up again once its stor serves them, without waiting for a reader."""
        for h in mp.retryable_dirs()[:at_most]:
            try:
                await self.catalog.load_dir(h, grid=mp.cfg.cache_grid, ahead=False)
            except FetchError:
                continue
            except pyfuse3.FUSEError:
                mp.unreadable_dir(h, f"directory object {h} is invalid (see the log)", invalid=True)
                continue
            mp.readable_dir(h)

    def _attr(self, ino: int, e: Entry, timeout: float = TREE_TIMEOUT) -> pyfuse3.EntryAttributes:
        # once per entry of every READDIRPLUS reply: nothing here that pyfuse3 already zeroes
        # (generation, uid, gid, rdev)
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.entry_timeout = timeout
        a.attr_timeout = timeout
        if e.kind == KIND_DIR:
            a.st_mode = stat.S_IFDIR | e.mode
            a.st_nlink = 2
            a.st_size = 4096
            a.st_blocks = 8
        else:
            a.st_mode = _S_IF[e.kind] | e.mode
            a.st_nlink = 1
            a.st_size = e.size
            a.st_blocks = (e.size + 511) // 512
        a.st_blksize = 128 * 1024
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = e.mtime_ns
        return a

    def _root_attr(self) -> pyfuse3.EntryAttributes:
        e = Entry("", KIND_DIR, 0o755, 0, self._root_mtime)
        return self._attr(ROOT_INO, e, TOP_TIMEOUT)

    def _node_attr(self, node: Node) -> pyfuse3.EntryAttributes:
        if node.ino == node.mount.top_ino:
            timeout = TOP_TIMEOUT
        elif node.mount.overlay is not None and self._debug_path(node):
            timeout = 0.0  # editable: the kernel must ask every time
        else:
            timeout = TREE_TIMEOUT
        return self._attr(node.ino, node.entry, timeout)

    # -- FUSE handlers ------------------------------------------------------------------------

    @guarded
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None,
                     ) -> pyfuse3.EntryAttributes:
        sname = name.decode("utf-8", "surrogateescape")
        inodes = self.inodes
        if parent_inode == ROOT_INO:
            mp = inodes.mounts.get(sname)
            if mp is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            node = inodes.nodes[mp.top_ino]
            node.lookups += 1
            return self._node_attr(node)
        parent = inodes.node(parent_inode)
        entries, index = await self._dir_of(parent)
        i = index.get(sname)
        if parent.mount.overlay is not None:
            node = await self._debug_lookup(parent, sname, entries[i] if i is not None else None)
        elif i is None:
            return self._negative(parent)
        else:
            node = inodes.child(parent, entries[i], index=i)
        node.lookups += 1
        return self._node_attr(node)

    def _negative(self, parent: Node) -> pyfuse3.EntryAttributes:
        """"No such name", cached by the kernel (st_ino 0) as long as the directory's tree is:
        Python's imports and PATH searches probe many absent names. Short under a mount top
        (a new version may add the name); below it a new version means new directory inodes."""
        a = pyfuse3.EntryAttributes()
        a.st_ino = 0
        a.entry_timeout = TOP_TIMEOUT if parent.ino == parent.mount.top_ino else TREE_TIMEOUT
        return a

    @guarded
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if inode == ROOT_INO:
            return self._root_attr()
        return self._node_attr(self.inodes.node(inode))

    def forget(self, inode_list: list[tuple[int, int]]) -> None:  # type: ignore[override]
        # must never raise (pyfuse3 calls it outside the request guard)
        try:
            self.inodes.forget(inode_list)
        except Exception:
            log.exception("forget failed")

    @guarded
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if self.inodes.no_open:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # for good: the kernel caches listings
        if inode != ROOT_INO:
            node = self.inodes.node(inode)
            if node.entry.kind != KIND_DIR:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    def _dots(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> bool:
        """`.` and `..` at offsets 0 and 1, as a POSIX directory lists them (no lookup count:
        the kernel takes none for them). False when the reply is full."""
        if start_id > 1:
            return True
        if fh == ROOT_INO:
            dot = up = self._root_attr()
        else:
            node = self.inodes.node(fh)
            dot = self._node_attr(node)
            parent = self.inodes.nodes.get(node.parent)
            up = self._node_attr(parent) if parent is not None else self._root_attr()
        if start_id == 0 and not pyfuse3.readdir_reply(token, b".", dot, 1):
            return False
        return pyfuse3.readdir_reply(token, b"..", up, 2)

    @guarded
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # fh is the inode: opendir returns it, and in no_opendir mode pyfuse3 passes it
        inodes = self.inodes
        if fh != ROOT_INO:
            parent = inodes.node(fh)
            if parent.mount.overlay is not None:
                listing = await self._debug_entries(parent)
            else:
                await self._readdir_tree(parent, start_id, token)
                return
        if not self._dots(fh, start_id, token):
            return
        counts = int(getattr(token, "plus", True))  # a plain READDIR's entries take no lookup
        if fh == ROOT_INO:
            mounts = sorted(inodes.mounts.values(), key=lambda m: m.name)
            for i in range(max(start_id, 2), len(mounts) + 2):
                mp = mounts[i - 2]
                node = inodes.nodes[mp.top_ino]
                if not pyfuse3.readdir_reply(token, mp.name.encode(), self._node_attr(node), i + 1):
                    return
                node.lookups += counts
            return
        for i in range(max(start_id, 2), len(listing) + 2):
            entry, dbg, tree_entry = listing[i - 2]
            node = inodes.child(parent, entry, dbg, tree_entry)
            name = entry.name.encode("utf-8", "surrogateescape")
            if not pyfuse3.readdir_reply(token, name, self._node_attr(node), i + 1):
                return
            node.lookups += counts

    async def _readdir_tree(self, parent: Node, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """A directory of the published tree: the reply comes from the decoded directory object
        and its names encoded once (a big directory takes thousands of READDIRPLUS requests of a
        page each; nothing per request may cost in proportion to the whole directory)."""
        entries, _ = await self._dir_of(parent)
        names = self.catalog.encoded_names(parent.entry.hash, entries)
        if not self._dots(parent.ino, start_id, token):
            return
        if parent.children is None:
            parent.children = {}
        inodes = self.inodes
        children, nodes, reply = parent.children, inodes.nodes, pyfuse3.readdir_reply
        if not getattr(token, "plus", True):
            # a plain READDIR (patched pyfuse3, READDIRPLUS_AUTO): names, numbers and types; the
            # kernel takes no reference, so no node is made: entry i is numbered ino_base + i
            # and a later lookup makes its node with that number
            base = inodes.ino_base(parent, len(entries))
            a = pyfuse3.EntryAttributes()  # one for all: the reply copies st_ino and st_mode
            for i in range(max(start_id, 2), len(entries) + 2):
                e = entries[i - 2]
                ino = children.get(e.name)
                a.st_ino = ino if ino is not None else base + i - 2
                a.st_mode = _S_IF[e.kind]
                if not reply(token, names[i - 2], a, i + 1):
                    return
            return
        # Inodes.child's check and _node_attr inlined for a directory of the tree (no debug
        # overlay here): a big listing runs this once per entry
        attr, child = self._attr, inodes.child
        for i in range(max(start_id, 2), len(entries) + 2):
            e = entries[i - 2]
            ino = children.get(e.name)
            node = nodes.get(ino) if ino is not None else None
            if node is None or (node.entry is not e and node.entry != e):
                node = child(parent, e, index=i - 2)
            if not reply(token, names[i - 2], attr(node.ino, e), i + 1):
                return
            node.lookups += 1

    @guarded
    async def releasedir(self, fh: int) -> None:
        return None

    @guarded
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.inodes.node(inode)
        if node.entry.kind != KIND_LINK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.entry.target.encode("utf-8", "surrogateescape")

    @guarded
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if self.inodes.no_open:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # for good: no OPEN/RELEASE, page cache kept
        node = self.inodes.node(inode)
        if node.entry.kind != KIND_FILE:
            raise pyfuse3.FUSEError(errno.EISDIR if node.entry.kind == KIND_DIR else errno.EINVAL)
        editable = node.mount.overlay is not None and self._debug_path(node)
        if flags & WRITE_FLAGS:
            if not editable:
                raise pyfuse3.FUSEError(errno.EROFS)
            of = await self._open_for_write(node, flags)
        else:
            of = OpenFile(node, node.entry, dbg=node.dbg)
            if node.dbg is None and node.entry.size:
                h, size = node.entry.blobs()[0]
                self._need(node, 0, h, size)
        fh = self.inodes.new_fh(of)  # journaled unless written (of.buf)
        return pyfuse3.FileInfo(fh=fh, keep_cache=not editable, direct_io=False)

    @guarded
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:  # type: ignore[override]  # pyfuse3 takes any buffer
        inodes = self.inodes
        of = inodes.reader(fh) if inodes.no_open else inodes.open_files.get(fh)
        if of is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if of.buf is not None:
            return bytes(of.buf[off:off + size])
        if of.dbg is not None:
            data = await self._debug_content(of.node, of.dbg)
            if data is not None:
                return data[off:off + size]
            if of.node.tree_entry is None:
                of.node.mount.count_eio("debug_store")
                raise pyfuse3.FUSEError(errno.EIO)
            of.entry, of.dbg = of.node.tree_entry, None  # redis down: the published version
        return await self.content.read(of, off, size)

    @guarded
    async def release(self, fh: int) -> None:
        of = self.inodes.release(fh)
        if of is not None and of.dirty:
            await self._commit(of)  # after a failed flush: one more try, errors only logged

    @guarded
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        used = self.cache.size() // 4096
        s.f_blocks = max(used, self.cache.limit // 4096)
        s.f_bfree = s.f_bavail = 0
        s.f_files = len(self.inodes.nodes) + 1
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # No extended attributes: ENOSYS makes the kernel answer EOPNOTSUPP itself from then on
    # (ls, cp -a, SELinux/capability probes) instead of asking per file.
    @guarded
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @guarded
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        raise pyfuse3.FUSEError(errno.ENOSYS)

    # everything that would change the tree (debug mode's writes are in DebugWrites)
    mknod = mkdir = rmdir = symlink = link = setxattr = removexattr = erofs  # type: ignore[assignment]


