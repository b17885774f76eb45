"""The inodes, open files and mount tops the kernel knows, kept where the next daemon finds them.

A FUSE connection outlives a daemon process (aysfsd.fuse.handover), and the kernel keeps
using the inode numbers and file handles the old process gave it. So every node the
daemon hands out is journaled into a memfd that systemd's fd store (or a re-exec) passes
on; the next process rebuilds its node table from it before it answers a request. A
record is one short line kept when a node is created or dropped, or a file opened or
released (never per read), and written out before the reply that hands it to the kernel:
the FUSE handlers' guard (aysfsd.fuse.guard) flushes after each handler, before pyfuse3
replies, so a READDIRPLUS reply of a page of new nodes costs one write, not one per node
(a 50,000-entry listing: ~2,000 writes instead of 50,000). No disk, no fsync.

What a SIGKILL can lose is what no reply has carried yet: nodes of a request still being
answered (the kernel re-sends it to the next daemon: FUSE_NOTIFY_RESEND) and `x` lines of
FORGETs (no reply; written with the next one): the next daemon then keeps a few forgotten
nodes until its own restart, never misses one the kernel holds.

A node is recorded by its place, not its content: inode, parent inode and name. The entry
is found again in the parent's directory object, which the local cache keeps (and which
was verified against its hash when fetched), so the journal needs no trust of its own.

    n INO PARENT "NAME"       a node (a snapshot adds its lookup count: n INO PARENT "NAME" LOOKUPS)
    x INO                     a node the kernel forgot
    b DIR BASE N              a directory listed without nodes: its entry i is numbered BASE + i
                              (aysfsd.fuse.ops, plain READDIR; `b DIR 0 0`: no longer)
    o FH INO / c FH           a file opened / released
    {"mount": ...}            a mount top, where it is bound and its version (a JSON line)
    {"unmount": NAME}
    {"next_ino": N, "next_fh": N}   counters (snapshots)
    {"session": {"no_open": B}}     the kernel mode the session runs in (see aysfsd.fuse.ops), for good

A graceful hand-over writes a compact snapshot with exact lookup counts. After a crash the
counts are unknown: restored nodes then live until the next restart (the kernel forgets
them, but never below zero), which costs memory, never correctness.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from ..config import AysConfig
from ..tree.objects import KIND_DIR, Entry
from ..tree.ref import RefError, decode_ref
from .nodes import MountPoint, Node, OpenFile

log = logging.getLogger("aysfsd.fuse.statejournal")

MAX_BYTES = 256 << 20  # past this the journal is compacted (snapshot) or, failing that, stopped
UNKNOWN_LOOKUPS = 1 << 40
_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode  # one encoder: dumps() makes one a call
_QUOTE: Callable[[str], str] = json.encoder.encode_basestring  # a name as a JSON string (C), per node


def _line(rec: dict[str, object]) -> bytes:
    return _ENCODE(rec).encode("utf-8", "surrogateescape") + b"\n"


class Journal:
    """No journal (tests driving the operations directly, or journaling turned off)."""

    fd = -1
    writes = 0

    def flush(self) -> None: ...

    def mount(self, mp: MountPoint) -> None: ...
    def unmount(self, name: str) -> None: ...
    def node(self, node: Node) -> None: ...
    def dropped(self, ino: int) -> None: ...
    def base(self, ino: int, base: int, n: int) -> None: ...
    def opened(self, fh: int, ino: int) -> None: ...
    def released(self, fh: int) -> None: ...
    def session(self, no_open: bool) -> None: ...


class StateJournal(Journal):
    """Append-only lines in a memfd (see the module docstring)."""

    def __init__(self, fd: int | None = None) -> None:
        self.fd = fd if fd is not None else os.memfd_create("aysfs-state", os.MFD_CLOEXEC)
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        self.broken = False
        self.compact: Callable[[], Iterable[bytes]] | None = None  # a snapshot of the live state
        self._pending: list[bytes] = []  # lines not written yet (see flush)
        self.writes = 0  # write(2) calls: what the batching saves, counted for the tests

    def _write(self, rec: dict[str, object]) -> None:
        """A record outside any FUSE request (mounts, the session's mode): written at once."""
        self._put(_line(rec))
        self.flush()

    def _put(self, line: bytes) -> None:
        if not self.broken:
            self._pending.append(line)

    def flush(self) -> None:
        """Write the pending lines in one go. Called before every FUSE reply; never raises."""
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending = []
        if self.broken:
            return
        try:
            if self.size + len(data) > MAX_BYTES and self.compact is not None:
                self.snapshot(self.compact())  # the live state: it holds the pending nodes too
                return
            if self.size + len(data) > MAX_BYTES:
                self.broken = True
                log.warning("state journal full (%d bytes): a crash now loses the inode table "
                            "(a graceful restart still hands it over)", self.size)
                return
            self._write_all(data)
            self.size += len(data)
        except OSError as e:
            self.broken = True
            log.warning("state journal: %s; a crash now loses the inode table", e)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            self.writes += 1
            view = view[n:]

    def mount(self, mp: MountPoint) -> None:
        self._write(mount_record(mp))

    def unmount(self, name: str) -> None:
        self._write({"unmount": name})

    def node(self, node: Node) -> None:
        if node.dbg is None:  # an edited file of debug mode lives in Redis, not in the tree
            self._put(node_line(node))

    def dropped(self, ino: int) -> None:
        self._put(b"x %d\n" % ino)

    def base(self, ino: int, base: int, n: int) -> None:
        self._put(b"b %d %d %d\n" % (ino, base, n))

    def opened(self, fh: int, ino: int) -> None:
        self._put(b"o %d %d\n" % (fh, ino))

    def released(self, fh: int) -> None:
        self._put(b"c %d\n" % fh)

    def session(self, no_open: bool) -> None:
        self._write({"session": {"no_open": no_open}})

    def snapshot(self, lines: Iterable[bytes]) -> None:
        """Replace the journal with `lines` (a compact image of the live state)."""
        data = b"".join(lines)
        self._pending = []  # the image holds the live state: nothing pending is still due
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        self._write_all(data)
        self.size = len(data)
        self.broken = False

    def lines(self) -> list[bytes]:
        """Every record written, oldest first."""
        os.lseek(self.fd, 0, os.SEEK_SET)
        with os.fdopen(os.dup(self.fd), "rb") as f:
            out = f.readlines()
        os.lseek(self.fd, 0, os.SEEK_END)
        return out


def mount_record(mp: MountPoint) -> dict[str, object]:
    ref = json.loads(mp.ref.encode()) if mp.ref is not None else None
    return {"mount": mp.name, "top": mp.top_ino, "mnt": mp.cfg.mnt, "ref": ref}


def node_line(node: Node, lookups: int | None = None) -> bytes:
    name = _QUOTE(node.entry.name).encode("utf-8", "surrogateescape")
    if lookups is None:
        return b"n %d %d %s\n" % (node.ino, node.parent, name)
    return b"n %d %d %s %d\n" % (node.ino, node.parent, name, lookups)


@dataclass
class Restored:
    """What a journal gave back: mount tops, nodes and open files, ready for the operations."""

    mounts: dict[str, MountPoint] = field(default_factory=dict)
    old_mnt: dict[str, str] = field(default_factory=dict)  # mount name -> where it was bound
    gone: dict[str, str] = field(default_factory=dict)  # mounts no longer configured -> where bound
    nodes: dict[int, Node] = field(default_factory=dict)
    open_files: dict[int, OpenFile] = field(default_factory=dict)
    next_ino: int = 2
    next_fh: int = 1
    skipped: int = 0
    no_open: bool | None = None  # the session's kernel mode; None: not recorded (open mode then)


def _parse_node(line: bytes) -> tuple[int, int, str, int | None]:
    """`n INO PARENT "NAME" [LOOKUPS]` -> (ino, parent, name, lookups or None)."""
    head, _, rest = line[2:].partition(b" ")
    parent, _, rest = rest.partition(b" ")
    rest = rest.rstrip(b"\n")
    lookups: int | None = None
    if not rest.endswith(b'"'):
        rest, _, n = rest.rpartition(b" ")
        lookups = int(n)
    name = json.loads(rest.decode("utf-8", "surrogateescape"))
    if not isinstance(name, str):
        raise ValueError("name is not a string")
    return int(head), int(parent), name, lookups


def restore(lines: Iterable[bytes], configs: Sequence[AysConfig],
            entries_of: Callable[[str], list[Entry] | None]) -> Restored:
    """Rebuild the state the journal describes, for the mounts still in `configs`;
    `entries_of(hash)` gives a directory object's entries from the local cache (or None)."""
    by_name = {c.name: c for c in configs}
    tops: dict[str, dict[str, object]] = {}
    raw_nodes: dict[int, tuple[int, str, int | None]] = {}
    bases: dict[int, int] = {}
    files: dict[int, int] = {}
    out = Restored()
    for line in lines:
        try:
            kind = line[:1]
            if kind == b"n":
                n_ino, n_parent, n_name, n_lookups = _parse_node(line)
                raw_nodes[n_ino] = (n_parent, n_name, n_lookups)
                out.next_ino = max(out.next_ino, n_ino + 1)  # never hand out a number again
            elif kind == b"x":
                raw_nodes.pop(int(line[2:]), None)
            elif kind == b"b":
                b_dir, b_base, b_n = (int(x) for x in line[2:].split())
                bases[b_dir] = b_base
                out.next_ino = max(out.next_ino, b_base + b_n)
            elif kind == b"o":
                o_fh, o_ino = line[2:].split()
                files[int(o_fh)] = int(o_ino)
                out.next_fh = max(out.next_fh, int(o_fh) + 1)
            elif kind == b"c":
                files.pop(int(line[2:]), None)
            elif kind == b"{":
                rec = json.loads(line)
                if "mount" in rec:
                    tops[str(rec["mount"])] = rec
                elif "unmount" in rec:
                    tops.pop(str(rec["unmount"]), None)
                elif "session" in rec:
                    out.no_open = bool(rec["session"]["no_open"])
                elif "next_ino" in rec:
                    out.next_ino = max(out.next_ino, int(rec["next_ino"]))
                    out.next_fh = max(out.next_fh, int(rec["next_fh"]))
        except (ValueError, KeyError, TypeError):
            out.skipped += 1  # a torn last line: a crash in the middle of a write
    for name, rec in tops.items():
        top = int(rec["top"])  # type: ignore[call-overload]
        out.next_ino = max(out.next_ino, top + 1)
        cfg = by_name.get(name)
        if cfg is None:
            out.gone[name] = str(rec.get("mnt") or "")
            continue
        mp = MountPoint(cfg, top)
        if isinstance(rec.get("ref"), dict):
            try:
                mp.ref = decode_ref(json.dumps(rec["ref"]).encode(), cfg.id)
            except RefError as e:
                log.warning("state journal: mount %s: its version cannot be restored: %s", name, e)
        mp.state = "up" if mp.ref is not None else "starting"
        out.mounts[name] = mp
        out.old_mnt[name] = str(rec.get("mnt") or "")
    for mp in out.mounts.values():
        out.nodes[mp.top_ino] = Node(mp.top_ino, mp, mp.top_entry(), 1, lookups=UNKNOWN_LOOKUPS)
    listings: dict[str, dict[str, Entry] | None] = {}
    # parents before children: a node's parent existed (and was looked up) before it
    for ino in sorted(raw_nodes):
        parent_ino, name, lookups = raw_nodes[ino]
        parent = out.nodes.get(parent_ino)
        if parent is None or parent.entry.kind != KIND_DIR or not parent.entry.hash:
            out.skipped += 1
            continue
        h = parent.entry.hash
        if h not in listings:
            got = entries_of(h)
            listings[h] = {e.name: e for e in got} if got is not None else None
        entry = (listings[h] or {}).get(name)
        if entry is None:
            out.skipped += 1
            continue
        path = "" if not parent.mount.cfg.debug else f"{parent.path}/{name}" if parent.path else name
        node = Node(ino, parent.mount, entry, parent.ino, path,
                    lookups=lookups if lookups is not None else UNKNOWN_LOOKUPS)
        out.nodes[ino] = node
        if parent.children is None:
            parent.children = {}
        parent.children[name] = ino
    for ino, base in bases.items():
        if ino in out.nodes:
            out.nodes[ino].ino_base = base
    for fh, ino in files.items():
        held = out.nodes.get(ino)
        if held is not None:
            out.open_files[fh] = OpenFile(held, held.entry)
    return out


def recorded_no_open(lines: Iterable[bytes]) -> bool:
    """Whether the journal says its session runs in the kernel's no_open mode (the last
    session record; none: open mode, as journals before the mode existed)."""
    mode = False
    for line in lines:
        if line.startswith(b'{"session"'):
            try:
                mode = bool(json.loads(line)["session"]["no_open"])
            except (ValueError, KeyError, TypeError):
                pass  # a torn line
    return mode


def snapshot_lines(mounts: Iterable[MountPoint], nodes: dict[int, Node], open_files: dict[int, OpenFile],
                   next_ino: int, next_fh: int, no_open: bool = False) -> Iterator[bytes]:
    """A compact image of the live state, exact lookup counts included."""
    yield _line({"session": {"no_open": no_open}})
    yield _line({"next_ino": next_ino, "next_fh": next_fh})
    tops = set()
    for mp in mounts:
        tops.add(mp.top_ino)
        yield _line(mount_record(mp))
    for ino in sorted(nodes):
        node = nodes[ino]
        if node.ino_base and node.mount.top_ino in tops:
            yield b"b %d %d 0\n" % (ino, node.ino_base)  # (next_ino, above, covers the numbers)
        if ino in tops or node.dbg is not None or node.mount.top_ino not in tops:
            continue
        yield node_line(node, node.lookups)
    for fh, of in open_files.items():
        if of.dbg is None and of.buf is None:
            yield b"o %d %d\n" % (fh, of.node.ino)
