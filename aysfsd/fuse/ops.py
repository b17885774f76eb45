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
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator

import pyfuse3

from ..config import AysConfig
from ..debug.store import PathState
from ..tiers import Fetcher, FetchError
from ..tiers.local import LocalCache
from ..tree.objects import (
    CHUNK_SIZE,
    KIND_DIR,
    KIND_FILE,
    KIND_LINK,
    Entry,
    NameIndex,
)
from ..tree.profile import DIR_INDEX
from ..tree.ref import Ref
from .catalog import Catalog
from .content import ContentReader
from .debug_writes import DebugWrites
from .guard import erofs, guarded
from .interrupts import CallerWatch
from .nodes import MountPoint, Node, OpenFile
from .statejournal import Journal, Restored, snapshot_lines

log = logging.getLogger("aysfsd.fuse.ops")

ROOT_INO = pyfuse3.ROOT_INODE
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
        self.mounts: dict[str, MountPoint] = {}  # by name
        self.nodes: dict[int, Node] = {}
        self.open_files: dict[int, OpenFile] = {}
        self._next_ino = ROOT_INO + 1
        self._next_fh = 1
        self.content = ContentReader(fetcher, cache, self.catalog, self.nodes, self._need)  # file bytes
        self.started = time.time()
        self._debug_mtimes = {}
        self.journal: Journal = Journal()  # what the next daemon needs to resume (aysfsd.fuse.handover)
        self.on_init: Callable[[], None] | None = None  # resuming a session: called on FUSE INIT
        self._root_mtime = int(self.started * 1e9)
        # kernel no_open/no_opendir mode (set by the daemon before the session starts): handles
        # are inodes, and big files keep their read-ahead state here instead of in an open file
        self.no_open = False
        self._readers: dict[int, OpenFile] = {}
        self._writers: dict[int, OpenFile] = {}
        cache.set_pinned(self.pinned_blobs)

    def init(self) -> None:
        # must never raise (libfuse calls it while handling FUSE INIT)
        try:
            if self.on_init is not None:
                self.on_init()
        except Exception:
            log.exception("resuming the FUSE session failed")

    def adopt(self, state: Restored) -> None:
        """Take over the inodes, open files and mount tops a previous daemon handed out."""
        self.mounts.update(state.mounts)
        self.nodes.update(state.nodes)
        self.open_files.update(state.open_files)
        self._next_ino = max(self._next_ino, state.next_ino)
        self._next_fh = max(self._next_fh, state.next_fh)
        # the kernel keeps the connection's mode: answer as the previous process did (a session
        # it ran with OPEN stays so; with no_open, READ names inodes and no OPEN will come)
        self.no_open = bool(state.no_open)

    def snapshot(self) -> Iterator[bytes]:
        """The state a graceful hand-over passes on (see aysfsd.fuse.statejournal)."""
        return snapshot_lines(list(self.mounts.values()), self.nodes, self.open_files,
                              self._next_ino, self._next_fh, self.no_open)

    def interrupted(self, pid: int) -> bool:
        """Called by the patched pyfuse3 when the kernel interrupts a request of thread `pid`:
        True answers it EINTR now (see aysfsd.fuse.interrupts)."""
        return self.callers.on_interrupt(pid)

    @property
    def no_atomic_o_trunc(self) -> bool:
        """Read by the patched pyfuse3 at session start: in no_open mode there is no OPEN to
        carry O_TRUNC, so the kernel must send it as a SETATTR (a debug mount's `> file`)."""
        return self.no_open

    # -- mounts -------------------------------------------------------------------------------

    def _new_ino(self) -> int:
        ino = self._next_ino
        self._next_ino += 1
        return ino

    def add_mount(self, cfg: AysConfig) -> MountPoint:
        mp = MountPoint(cfg, self._new_ino())
        self.mounts[cfg.name] = mp
        self.nodes[mp.top_ino] = Node(mp.top_ino, mp, mp.top_entry(), ROOT_INO, lookups=1)
        self.journal.mount(mp)
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
        mp = self.mounts.pop(name, None)
        if mp is None:
            return
        self.journal.unmount(name)
        top = self.nodes.get(mp.top_ino)
        if top is not None:
            top.children = None
            top.ino_base = 0
            top.lookups = 0
        if notify_kernel:
            pyfuse3.invalidate_entry_async(ROOT_INO, name.encode(), ignore_enoent=True)
            self._root_changed()

    def set_ref(self, mp: MountPoint, ref: Ref) -> None:
        """Switch a mount to another version: new lookups see it, open files keep theirs."""
        old = mp.ref
        mp.ref = ref
        if old is None or old.root != ref.root:
            mp.new_version()
        self.journal.mount(mp)
        top = self.nodes[mp.top_ino]
        top.entry = mp.top_entry()
        if old is not None and old.root != ref.root:
            names = list(top.children or ())
            top.children = None
            if top.ino_base:
                top.ino_base = 0  # another version's entries: numbers of their own
                self.journal.base(top.ino, 0, 0)
            for name in names:
                pyfuse3.invalidate_entry_async(mp.top_ino, name.encode("utf-8", "surrogateescape"),
                                               ignore_enoent=True)
            try:
                pyfuse3.invalidate_inode(mp.top_ino, attr_only=False)
            except OSError:
                pass

    def pinned_blobs(self) -> list[str]:
        return [h for of in list(self.open_files.values()) + list(self._readers.values())
                for h, _ in of.entry.blobs()]

    # -- start watches (see aysfsd.fuse.startwatch) -------------------------------------------------

    def _need(self, node: Node, index: int, h: str, size: int) -> None:
        """Tell the mount's start watch, if any, that `node` needed blob `h` (chunk `index`)."""
        w = node.mount.watch
        if w is not None and w.active:
            w.need(h, size, lambda: self._where(node, index))

    def _where(self, node: Node, index: int) -> tuple[str, int] | None:
        path = self.path_of(node)
        return None if path is None else (path, index)

    def path_of(self, node: Node) -> str | None:
        """A node's path below its mount top, through its parents (None if one was forgotten)."""
        parts: list[str] = []
        n: Node | None = node
        while n is not None and n.ino != node.mount.top_ino:
            parts.append(n.entry.name)
            n = self.nodes.get(n.parent)
            if n is not None and n.mount is not node.mount:
                return None
        return None if n is None else "/".join(reversed(parts))

    def _node(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return node

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

    def _child(self, parent: Node, entry: Entry, dbg: PathState | None = None,
               tree_entry: Entry | None = None, index: int = -1) -> Node:
        """The node of `entry` (at `index` of its directory object, when known) below `parent`."""
        if parent.children is None:
            parent.children = {}
        ino = parent.children.get(entry.name)
        node = self.nodes.get(ino) if ino is not None else None
        if node is not None and (dbg is not None or node.dbg is not None) and node.entry.kind == entry.kind:
            node.entry, node.dbg, node.tree_entry = entry, dbg, tree_entry  # an edited file keeps its inode
        elif node is None or node.entry != entry:
            # the path is for debug mode's filter and keys only: not kept for 100,000s of nodes
            path = "" if not parent.mount.cfg.debug else f"{parent.path}/{entry.name}" if parent.path else entry.name
            new = parent.ino_base + index if parent.ino_base and index >= 0 and dbg is None else 0
            if not new or new in self.nodes:  # (the number a plain listing showed, unless taken)
                new = self._new_ino()
            node = Node(new, parent.mount, entry, parent.ino, path, dbg=dbg, tree_entry=tree_entry)
            self.nodes[node.ino] = node
            parent.children[entry.name] = node.ino
            self.journal.node(node)
        return node

    def _debug_path(self, node: Node) -> bool:
        """True for a path that debug mode lets the user edit on this node's mount."""
        ov = node.mount.overlay
        return ov is not None and ov.matches(node.path)

    async def _entries(self, parent: Node) -> list[tuple[Entry, PathState | None, Entry | None]]:
        """A directory's entries with the debug overlay applied: (entry, debug state, tree entry)."""
        entries, _ = await self._dir_of(parent)
        ov = parent.mount.overlay
        if ov is None:
            return [(e, None, None) for e in entries]
        await ov.ensure_loaded()
        out: list[tuple[Entry, PathState | None, Entry | None]] = []
        prefix = parent.path + "/" if parent.path else ""
        for e in entries:
            st = ov.state(prefix + e.name)
            if st is None or e.kind == KIND_DIR:
                out.append((e, None, None))
            elif not st.deleted:
                out.append((self.debug_entry(e.name, st, e), st, e))
        names = {e.name for e in entries}
        for name, st in ov.new_children(parent.path, names):
            out.append((self.debug_entry(name, st, None), st, None))
        return out

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
        if parent.mount.overlay is not None:
            node = await self._debug_lookup(parent, sname, entries[i] if i is not None else None)
        elif i is None:
            return self._negative(parent)
        else:
            node = self._child(parent, entries[i], index=i)
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
                    self._drop(node)
                    parent = self.nodes.get(node.parent)
                    if parent is not None and parent.children is not None:
                        if parent.children.get(node.entry.name) == ino:
                            del parent.children[node.entry.name]
        except Exception:
            log.exception("forget failed")

    def _drop(self, node: Node) -> None:
        """A node the kernel forgot. Its children that the kernel never held (named by a plain
        READDIR, or left over from a full reply) go with it: nothing else can reach them, and
        the kernel holds none (it holds a directory while it holds anything below)."""
        del self.nodes[node.ino]
        self.journal.dropped(node.ino)
        self._readers.pop(node.ino, None)
        self._writers.pop(node.ino, None)
        for ino in (node.children or {}).values():
            child = self.nodes.get(ino)
            if child is not None and child.lookups <= 0 and child.parent == node.ino:
                self._drop(child)

    @guarded
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if self.no_open:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # for good: the kernel caches listings
        if inode != ROOT_INO:
            node = self._node(inode)
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
            node = self._node(fh)
            dot = self._node_attr(node)
            parent = self.nodes.get(node.parent)
            up = self._node_attr(parent) if parent is not None else self._root_attr()
        if start_id == 0 and not pyfuse3.readdir_reply(token, b".", dot, 1):
            return False
        return pyfuse3.readdir_reply(token, b"..", up, 2)

    @guarded
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # fh is the inode: opendir returns it, and in no_opendir mode pyfuse3 passes it
        if fh != ROOT_INO:
            parent = self._node(fh)
            if parent.mount.overlay is not None:
                listing = await self._entries(parent)
            else:
                await self._readdir_tree(parent, start_id, token)
                return
        if not self._dots(fh, start_id, token):
            return
        counts = int(getattr(token, "plus", True))  # a plain READDIR's entries take no lookup
        if fh == ROOT_INO:
            mounts = sorted(self.mounts.values(), key=lambda m: m.name)
            for i in range(max(start_id, 2), len(mounts) + 2):
                mp = mounts[i - 2]
                node = self.nodes[mp.top_ino]
                if not pyfuse3.readdir_reply(token, mp.name.encode(), self._node_attr(node), i + 1):
                    return
                node.lookups += counts
            return
        for i in range(max(start_id, 2), len(listing) + 2):
            entry, dbg, tree_entry = listing[i - 2]
            node = self._child(parent, entry, dbg, tree_entry)
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
        children, nodes, reply = parent.children, self.nodes, pyfuse3.readdir_reply
        if not getattr(token, "plus", True):
            # a plain READDIR (patched pyfuse3, READDIRPLUS_AUTO): names, numbers and types; the
            # kernel takes no reference, so no node is made: entry i is numbered ino_base + i
            # and a later lookup makes its node with that number
            base = self._ino_base(parent, len(entries))
            a = pyfuse3.EntryAttributes()  # one for all: the reply copies st_ino and st_mode
            for i in range(max(start_id, 2), len(entries) + 2):
                e = entries[i - 2]
                ino = children.get(e.name)
                a.st_ino = ino if ino is not None else base + i - 2
                a.st_mode = _S_IF[e.kind]
                if not reply(token, names[i - 2], a, i + 1):
                    return
            return
        # _child and _node_attr inlined for a directory of the tree (no debug overlay here):
        # a big listing runs this once per entry
        attr = self._attr
        for i in range(max(start_id, 2), len(entries) + 2):
            e = entries[i - 2]
            ino = children.get(e.name)
            node = nodes.get(ino) if ino is not None else None
            if node is None or (node.entry is not e and node.entry != e):
                node = self._child(parent, e, index=i - 2)
            if not reply(token, names[i - 2], attr(node.ino, e), i + 1):
                return
            node.lookups += 1

    def _ino_base(self, parent: Node, n: int) -> int:
        """Inode numbers for the `n` entries of a directory listed without nodes (reserved once
        per directory inode; journaled so that a resumed daemon numbers them alike)."""
        if not parent.ino_base:
            parent.ino_base = self._next_ino
            self._next_ino += n
            self.journal.base(parent.ino, parent.ino_base, n)
        return parent.ino_base

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
        if self.no_open:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # for good: no OPEN/RELEASE, page cache kept
        node = self._node(inode)
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
        fh = self._next_fh
        self._next_fh += 1
        self.open_files[fh] = of
        if not (flags & WRITE_FLAGS):
            self.journal.opened(fh, inode)
        return pyfuse3.FileInfo(fh=fh, keep_cache=not editable, direct_io=False)

    @guarded
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:  # type: ignore[override]  # pyfuse3 takes any buffer
        of = self._reader(fh) if self.no_open else self.open_files.get(fh)
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

    def _reader(self, ino: int) -> OpenFile:
        """no_open mode: what an open file would be, for the inode a READ names. Kept for files
        of several chunks (their read-ahead state), made anew for the others (no state)."""
        of = self._readers.get(ino)
        if of is not None:
            return of
        node = self._node(ino)
        if node.entry.kind != KIND_FILE:
            raise pyfuse3.FUSEError(errno.EISDIR if node.entry.kind == KIND_DIR else errno.EINVAL)
        of = OpenFile(node, node.entry, dbg=node.dbg)
        if node.dbg is None and node.entry.size > CHUNK_SIZE:
            self._readers[ino] = of
        return of

    @guarded
    async def release(self, fh: int) -> None:
        of = self.open_files.pop(fh, None)
        if of is not None and of.buf is None:
            self.journal.released(fh)
        if of is not None and of.dirty:
            await self._commit(of)  # after a failed flush: one more try, errors only logged

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


