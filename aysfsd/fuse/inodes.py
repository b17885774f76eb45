"""The table of what the kernel holds: mount tops, inodes, open files, and their journal.

Apart from the FUSE handlers (aysfsd.fuse.ops) because it is state, not requests: it is what
a daemon hands over to the next process (`snapshot`) and what that one takes back (`adopt`;
see aysfsd.fuse.statejournal), and the daemon, the cache's eviction and the request guard ask
it too. It alone numbers inodes and file handles and journals them; the handlers ask it, and
only they talk to the kernel (replies, invalidations). Its one answer in FUSE terms is the
errno of an inode it cannot serve (unknown: ESTALE; a READ of a non-file). It never imports
the handlers.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Iterator

import pyfuse3

from ..config import AysConfig
from ..debug.store import PathState
from ..tree.objects import CHUNK_SIZE, KIND_DIR, KIND_FILE, Entry
from ..tree.ref import Ref
from .nodes import MountPoint, Node, OpenFile
from .statejournal import Journal, Restored, snapshot_lines

ROOT_INO = pyfuse3.ROOT_INODE


class Inodes:
    """Mount tops by name, nodes by inode, open files by handle; their numbers and journal."""

    def __init__(self) -> None:
        self.mounts: dict[str, MountPoint] = {}  # by name
        self.nodes: dict[int, Node] = {}
        self.open_files: dict[int, OpenFile] = {}
        self.next_ino = ROOT_INO + 1
        self.next_fh = 1
        self.journal: Journal = Journal()  # what the next daemon needs to resume (aysfsd.fuse.handover)
        # kernel no_open/no_opendir mode (set by the daemon before the session starts): handles
        # are inodes, and big files keep their read-ahead state here instead of in an open file
        self.no_open = False
        self.readers: dict[int, OpenFile] = {}
        self.writers: dict[int, OpenFile] = {}  # debug mode, no_open: the last recorded content by inode

    def adopt(self, state: Restored) -> None:
        """Take over the inodes, open files and mount tops a previous daemon handed out."""
        self.mounts.update(state.mounts)
        self.nodes.update(state.nodes)
        self.open_files.update(state.open_files)
        self.next_ino = max(self.next_ino, state.next_ino)
        self.next_fh = max(self.next_fh, state.next_fh)
        # the kernel keeps the connection's mode: answer as the previous process did (a session
        # it ran with OPEN stays so; with no_open, READ names inodes and no OPEN will come)
        self.no_open = bool(state.no_open)

    def snapshot(self) -> Iterator[bytes]:
        """The state a graceful hand-over passes on (see aysfsd.fuse.statejournal)."""
        return snapshot_lines(list(self.mounts.values()), self.nodes, self.open_files,
                              self.next_ino, self.next_fh, self.no_open)

    def new_ino(self) -> int:
        ino = self.next_ino
        self.next_ino += 1
        return ino

    def ino_base(self, parent: Node, n: int) -> int:
        """Inode numbers for the `n` entries of a directory listed without nodes (reserved once
        per directory inode; journaled so that a resumed daemon numbers them alike)."""
        if not parent.ino_base:
            parent.ino_base = self.next_ino
            self.next_ino += n
            self.journal.base(parent.ino, parent.ino_base, n)
        return parent.ino_base

    # -- mounts -------------------------------------------------------------------------------

    def add_mount(self, cfg: AysConfig) -> MountPoint:
        mp = MountPoint(cfg, self.new_ino())
        self.mounts[cfg.name] = mp
        self.nodes[mp.top_ino] = Node(mp.top_ino, mp, mp.top_entry(), ROOT_INO, lookups=1)
        self.journal.mount(mp)
        return mp

    def remove_mount(self, name: str) -> MountPoint | None:
        """Forget mount `name` (its top keeps its inode, without children); None if unknown."""
        mp = self.mounts.pop(name, None)
        if mp is None:
            return None
        self.journal.unmount(name)
        top = self.nodes.get(mp.top_ino)
        if top is not None:
            top.children = None
            top.ino_base = 0
            top.lookups = 0
        return mp

    def set_ref(self, mp: MountPoint, ref: Ref) -> list[str] | None:
        """Switch a mount to another version. When its root changed, the names below its top
        the kernel may hold (to invalidate); None when there is nothing to invalidate."""
        old = mp.ref
        mp.ref = ref
        if old is None or old.root != ref.root:
            mp.new_version()
        self.journal.mount(mp)
        top = self.nodes[mp.top_ino]
        top.entry = mp.top_entry()
        if old is None or old.root == ref.root:
            return None
        names = list(top.children or ())
        top.children = None
        if top.ino_base:
            top.ino_base = 0  # another version's entries: numbers of their own
            self.journal.base(top.ino, 0, 0)
        return names

    # -- nodes --------------------------------------------------------------------------------

    def node(self, ino: int) -> Node:
        """The node of `ino`; ESTALE when the kernel names one no longer known."""
        node = self.nodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return node

    def child(self, parent: Node, entry: Entry, dbg: PathState | None = None,
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
                new = self.new_ino()
            node = Node(new, parent.mount, entry, parent.ino, path, dbg=dbg, tree_entry=tree_entry)
            self.nodes[node.ino] = node
            parent.children[entry.name] = node.ino
            self.journal.node(node)
        return node

    def forget(self, inode_list: Iterable[tuple[int, int]]) -> None:
        """The kernel dropped `n` references to each inode: nodes it no longer holds go."""
        nodes = self.nodes
        for ino, n in inode_list:
            node = nodes.get(ino)
            if node is None:
                continue
            node.lookups -= n
            if node.lookups <= 0 and node.ino != node.mount.top_ino:
                self._drop(node)
                parent = nodes.get(node.parent)
                if parent is not None and parent.children is not None:
                    if parent.children.get(node.entry.name) == ino:
                        del parent.children[node.entry.name]

    def _drop(self, node: Node) -> None:
        """A node the kernel forgot. Its children that the kernel never held (named by a plain
        READDIR, or left over from a full reply) go with it: nothing else can reach them, and
        the kernel holds none (it holds a directory while it holds anything below)."""
        del self.nodes[node.ino]
        self.journal.dropped(node.ino)
        self.readers.pop(node.ino, None)
        self.writers.pop(node.ino, None)
        for ino in (node.children or {}).values():
            child = self.nodes.get(ino)
            if child is not None and child.lookups <= 0 and child.parent == node.ino:
                self._drop(child)

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

    # -- open files ---------------------------------------------------------------------------

    def new_fh(self, of: OpenFile) -> int:
        """A handle for `of`; journaled unless it is written (a debug mode buffer)."""
        fh = self.next_fh
        self.next_fh += 1
        self.open_files[fh] = of
        if of.buf is None:
            self.journal.opened(fh, of.node.ino)
        return fh

    def release(self, fh: int) -> OpenFile | None:
        """Close handle `fh`: its open file, if it had one."""
        of = self.open_files.pop(fh, None)
        if of is not None and of.buf is None:
            self.journal.released(fh)
        return of

    def reader(self, ino: int) -> OpenFile:
        """no_open mode: what an open file would be, for the inode a READ names. Kept for files
        of several chunks (their read-ahead state), made anew for the others (no state)."""
        of = self.readers.get(ino)
        if of is not None:
            return of
        node = self.node(ino)
        if node.entry.kind != KIND_FILE:
            raise pyfuse3.FUSEError(errno.EISDIR if node.entry.kind == KIND_DIR else errno.EINVAL)
        of = OpenFile(node, node.entry, dbg=node.dbg)
        if node.dbg is None and node.entry.size > CHUNK_SIZE:
            self.readers[ino] = of
        return of

    def pinned_blobs(self) -> list[str]:
        """Blobs of open files and kept readers: the cache never evicts them. Called from the
        cache's eviction threads: it only reads, copying each table in one C-level step."""
        return [h for of in list(self.open_files.values()) + list(self.readers.values())
                for h, _ in of.entry.blobs()]
