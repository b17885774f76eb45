"""Debug mode's FUSE operations: writes to files matching `debug_filter`, kept in Redis.

A file opened for writing is held in memory and recorded in Redis (one transaction)
when it is flushed or closed; a failed record is EIO at close(), with a log line, and
the previous version stays. Everything else on a debug mount stays read-only (EROFS).

In a session in kernel no_open mode (started without debug mounts, one added later by a
reload) there is no OPEN, RELEASE or FLUSH to hold and record a file by: every WRITE is
recorded at once (the file's whole new content, one transaction), and a failed record is
EIO at write() instead of close().
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import time
from dataclasses import replace
from typing import Any

import pyfuse3

from ..debug.overlay import DebugOverlay
from ..debug.store import DebugStoreError, PathState
from ..tiers import FetchError
from ..tree.objects import KIND_DIR, KIND_FILE, Entry
from .content import ContentReader
from .guard import guarded
from .inodes import Inodes
from .nodes import MountPoint, Node, OpenFile

log = logging.getLogger("aysfsd.debug.overlay")
EMPTY_MD5 = hashlib.md5(b"").hexdigest()
MAX_DEBUG_FILE = 512 << 20  # Redis strings cap at 512 MiB


def _erofs() -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(errno.EROFS)


class DebugWrites:
    """Mixed into fs.Operations; uses its node table (Inodes) and helpers."""

    inodes: Inodes
    _dir_of: Any
    _node_attr: Any
    content: ContentReader
    _debug_mtimes: dict[str, int]  # path -> mtime of an edited file (set up by Operations)

    # -- helpers used by fs.Operations --------------------------------------------------------

    def _debug_path(self, node: Node) -> bool:
        """True for a path that debug mode lets the user edit on this node's mount."""
        ov = node.mount.overlay
        return ov is not None and ov.matches(node.path)

    def debug_entry(self, name: str, st: PathState, tree: Entry | None) -> Entry:
        mode = tree.mode if tree is not None else 0o644
        mtime = self._debug_mtimes.setdefault(st.path, time.time_ns())
        return Entry(name, KIND_FILE, mode, st.size, mtime)

    def _touch_debug(self, path: str) -> None:
        self._debug_mtimes[path] = time.time_ns()

    async def _debug_lookup(self, parent: Node, name: str, tree: Entry | None) -> Node:
        ov = parent.mount.overlay
        assert ov is not None
        path = f"{parent.path}/{name}" if parent.path else name
        if ov.matches(path) and (tree is None or tree.kind != KIND_DIR):
            await ov.ensure_loaded()
            st = ov.state(path)
            if st is not None:
                if st.deleted:
                    raise pyfuse3.FUSEError(errno.ENOENT)
                return self.inodes.child(parent, self.debug_entry(name, st, tree), st, tree)
        if tree is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.inodes.child(parent, tree)

    async def _debug_entries(self, parent: Node) -> list[tuple[Entry, PathState | None, Entry | None]]:
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

    async def _debug_content(self, node: Node, st: PathState) -> bytes | None:
        """An edited file's bytes from Redis; None when Redis cannot give them."""
        ov = node.mount.overlay
        if st.md5 == EMPTY_MD5:
            return b""
        if ov is None:
            return None
        try:
            return await ov.content(st.md5)
        except DebugStoreError as e:
            log.error("debug: reading %s from redis failed, serving the published version: %s", node.path, e,
                      extra={"AYSFS_MOUNT": node.mount.name})
            return None

    async def _current_bytes(self, node: Node) -> bytes:
        """The whole current content of a file (edited version first), for rewriting it."""
        if node.dbg is not None:
            data = await self._debug_content(node, node.dbg)
            if data is not None:
                return data
            node.mount.count_eio("debug_store")
            raise pyfuse3.FUSEError(errno.EIO)
        size = node.entry.size
        if size > MAX_DEBUG_FILE:
            raise pyfuse3.FUSEError(errno.EFBIG)
        try:
            # bytes, not a view: the whole content is recorded in Redis (a rename) or edited
            return bytes(await self.content.read(OpenFile(node, node.entry), 0, size)) if size else b""
        except FetchError:
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def _open_for_write(self, node: Node, flags: int) -> OpenFile:
        if flags & os.O_TRUNC:
            buf, dirty = bytearray(), True
        else:
            buf, dirty = bytearray(await self._current_bytes(node)), False
        return OpenFile(node, node.entry, dbg=node.dbg, buf=buf, dirty=dirty)

    async def save_pending_writes(self) -> None:
        """Before a hand-over to the next process: record every written, unsaved buffer."""
        for of in list(self.inodes.open_files.values()):
            if of.dirty:
                try:
                    await self._commit(of)
                except pyfuse3.FUSEError:
                    pass  # logged by _commit

    async def _commit(self, of: OpenFile) -> None:
        """Record an open file's buffer in Redis; EIO (and the old version kept) on failure."""
        node = of.node
        ov = node.mount.overlay
        if ov is None or of.buf is None:
            return
        try:
            st = await ov.record(node.path, bytes(of.buf))
        except DebugStoreError as e:
            log.error("debug: write of %s failed, the change is NOT saved: %s", node.path, e,
                      extra={"AYSFS_MOUNT": node.mount.name, "AYS_ID": node.mount.cfg.id})
            node.mount.count_eio("debug_store")
            raise pyfuse3.FUSEError(errno.EIO) from None
        of.dirty = False
        of.dbg = st
        self._touch_debug(node.path)
        if node.tree_entry is None and node.dbg is None and node.entry.kind == KIND_FILE and node.entry.hash:
            node.tree_entry = node.entry
        node.dbg = st
        node.entry = self.debug_entry(node.entry.name, st, node.tree_entry)

    def _editable(self, mp: MountPoint, path: str) -> None:
        ov = mp.overlay
        if ov is None or not ov.matches(path):
            raise _erofs()

    async def _edit_target(self, parent_inode: int, name: bytes,
                           ) -> tuple[Node, str, str, DebugOverlay, list[Entry], dict[str, int]]:
        """The directory, name, path and overlay for creating or removing `name`; EROFS unless
        debug mode lets this path be edited."""
        parent = self.inodes.node(parent_inode)
        sname = name.decode("utf-8", "surrogateescape")
        path = f"{parent.path}/{sname}" if parent.path else sname
        if parent_inode == pyfuse3.ROOT_INODE or parent.entry.kind != KIND_DIR:
            raise _erofs()
        self._editable(parent.mount, path)
        ov = parent.mount.overlay
        assert ov is not None
        await ov.ensure_loaded()
        entries, index = await self._dir_of(parent)
        return parent, sname, path, ov, entries, index

    # -- FUSE handlers ------------------------------------------------------------------------

    @guarded
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if self.inodes.no_open:
            return await self._write_through(fh, off, buf)
        of = self.inodes.open_files.get(fh)
        if of is None or of.buf is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return self._apply(of, off, buf)

    async def _write_through(self, ino: int, off: int, buf: bytes) -> int:
        """no_open mode: a WRITE names the inode; the content is recorded right away."""
        node = self.inodes.node(ino)
        if node.entry.kind != KIND_FILE or not self._debug_path(node):
            raise _erofs()
        writers = self.inodes.writers
        of = writers.get(ino)
        if of is None or of.dbg is not node.dbg:  # first write, or changed since (truncate, rename)
            of = OpenFile(node, node.entry, dbg=node.dbg, buf=bytearray(await self._current_bytes(node)))
            writers[ino] = of
        n = self._apply(of, off, buf)
        try:
            await self._commit(of)
        except pyfuse3.FUSEError:
            writers.pop(ino, None)  # its buffer holds what was not recorded
            raise
        return n

    def _apply(self, of: OpenFile, off: int, buf: bytes) -> int:
        assert of.buf is not None
        end = off + len(buf)
        if end > MAX_DEBUG_FILE:
            raise pyfuse3.FUSEError(errno.EFBIG)
        if off > len(of.buf):
            of.buf.extend(bytes(off - len(of.buf)))
        of.buf[off:end] = buf
        of.dirty = True
        of.node.entry = replace(of.node.entry, size=len(of.buf), mtime_ns=time.time_ns())
        return len(buf)

    @guarded
    async def flush(self, fh: int) -> None:
        if self.inodes.no_open:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # writes are recorded as they come: nothing to flush
        of = self.inodes.open_files.get(fh)
        if of is not None and of.dirty:
            await self._commit(of)
        elif of is not None and of.buf is None and not any(m.overlay for m in self.inodes.mounts.values()):
            # No mount is in debug mode: ENOSYS tells the kernel to stop sending FLUSH on every
            # close (a round trip per file read). Should a debug mount come later by reload, its
            # writes are still recorded at release; only close() no longer reports their errors.
            raise pyfuse3.FUSEError(errno.ENOSYS)

    @guarded
    async def fsync(self, fh: int, datasync: bool) -> None:
        if self.inodes.no_open:
            return  # recorded at every write
        of = self.inodes.open_files.get(fh)
        if of is not None and of.dirty:
            await self._commit(of)

    @guarded
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent, sname, path, ov, entries, index = await self._edit_target(parent_inode, name)
        tree = entries[index[sname]] if sname in index else None
        if tree is not None and tree.kind == KIND_DIR:
            raise pyfuse3.FUSEError(errno.EISDIR)
        st = PathState(path, EMPTY_MD5, 0)
        ov.states[path] = st
        self._touch_debug(path)
        entry = replace(self.debug_entry(sname, st, tree), mode=mode & 0o7777)
        node = self.inodes.child(parent, entry, st, tree)
        node.lookups += 1
        of = OpenFile(node, node.entry, dbg=st, buf=bytearray(), dirty=True)
        if self.inodes.no_open:
            # no RELEASE will come: recorded now, and the writes name the inode (handle 0)
            await self._commit(of)
            return pyfuse3.FileInfo(fh=0, keep_cache=False), self._node_attr(node)
        fh = self.inodes.new_fh(of)  # a written file: not journaled
        return pyfuse3.FileInfo(fh=fh, keep_cache=False), self._node_attr(node)

    @guarded
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent, sname, path, ov, entries, index = await self._edit_target(parent_inode, name)
        st = ov.state(path)
        exists = (st is not None and not st.deleted) or (st is None and sname in index)
        if not exists:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if sname in index and entries[index[sname]].kind == KIND_DIR:
            raise pyfuse3.FUSEError(errno.EISDIR)
        try:
            await ov.remove(path)
        except DebugStoreError as e:
            log.error("debug: removal of %s failed: %s", path, e, extra={"AYSFS_MOUNT": parent.mount.name})
            parent.mount.count_eio("debug_store")
            raise pyfuse3.FUSEError(errno.EIO) from None

    @guarded
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.inodes.node(inode)
        if inode == pyfuse3.ROOT_INODE or node.entry.kind != KIND_FILE or not self._debug_path(node):
            raise _erofs()
        if fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)  # everything is root:root
        if fields.update_size:
            of = self.inodes.open_files.get(fh) if fh is not None else None
            temp = of is None or of.buf is None
            if of is None or of.buf is None:
                of = OpenFile(node, node.entry, dbg=node.dbg, buf=bytearray(await self._current_bytes(node)))
            buf = of.buf
            assert buf is not None
            del buf[attr.st_size:]
            if attr.st_size > len(buf):
                buf.extend(bytes(attr.st_size - len(buf)))
            of.dirty = True
            if temp:
                await self._commit(of)
            else:
                node.entry = replace(node.entry, size=len(buf))
        if fields.update_mode:
            node.entry = replace(node.entry, mode=attr.st_mode & 0o7777)  # kept in memory only
        if fields.update_mtime:
            node.entry = replace(node.entry, mtime_ns=attr.st_mtime_ns)
            self._debug_mtimes[node.path] = attr.st_mtime_ns
        return self._node_attr(node)

    @guarded
    async def rename(self, parent_old: int, name_old: bytes, parent_new: int, name_new: bytes, flags: int,
                     ctx: pyfuse3.RequestContext) -> None:
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)  # RENAME_EXCHANGE / NOREPLACE: not supported
        po, pn = self.inodes.node(parent_old), self.inodes.node(parent_new)
        if pyfuse3.ROOT_INODE in (parent_old, parent_new) or po.mount is not pn.mount:
            raise _erofs()
        so = name_old.decode("utf-8", "surrogateescape")
        sn = name_new.decode("utf-8", "surrogateescape")
        old = f"{po.path}/{so}" if po.path else so
        new = f"{pn.path}/{sn}" if pn.path else sn
        self._editable(po.mount, old)
        self._editable(pn.mount, new)
        entries, index = await self._dir_of(po)
        node = await self._debug_lookup(po, so, entries[index[so]] if so in index else None)
        if node.entry.kind != KIND_FILE:
            raise _erofs()
        data = await self._current_bytes(node)
        ov = po.mount.overlay
        assert ov is not None
        try:
            st = await ov.record(new, data)
            await ov.remove(old)
        except DebugStoreError as e:
            log.error("debug: rename %s -> %s failed: %s", old, new, e, extra={"AYSFS_MOUNT": po.mount.name})
            po.mount.count_eio("debug_store")
            raise pyfuse3.FUSEError(errno.EIO) from None
        # the kernel moves the inode to the new name: so do we
        if po.children is not None:
            po.children.pop(so, None)
        if pn.children is None:
            pn.children = {}
        pn.children[sn] = node.ino
        node.parent, node.path, node.dbg = pn.ino, new, st
        entries, index = await self._dir_of(pn)
        node.tree_entry = entries[index[sn]] if sn in index else None
        self._touch_debug(new)
        node.entry = self.debug_entry(sn, st, node.tree_entry)

    @guarded
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        if mode & os.W_OK:
            node = self.inodes.nodes.get(inode)
            if node is None or not self._debug_path(node):
                raise _erofs()
        return True
