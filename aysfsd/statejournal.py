"""The inodes, open files and mount tops the kernel knows, kept where the next daemon finds them.

A FUSE connection outlives a daemon process (aysfsd.handover), and the kernel keeps
using the inode numbers and file handles the old process gave it. So every node the
daemon hands out is journaled, as one JSON line, into a memfd that systemd's fd store
(or a re-exec) passes on; the next process rebuilds its node table from it before it
answers the first request. A write is a memory copy (no disk, no fsync) and happens when
a node is created or dropped and when a file is opened or released, not per read.

Records (one JSON object per line):
    {"mount": name, "top": ino, "mnt": path, "ref": ref JSON or null}   a mount top, its version
    {"unmount": name}
    {"n": ino, "p": parent ino, "m": mount, "e": entry, "path": ...}    a node (+ "l": lookups in a snapshot)
    {"x": ino}                                                          a node the kernel forgot
    {"o": fh, "i": ino} / {"c": fh}                                     a file opened / released
    {"next_ino": n, "next_fh": n}                                       counters (snapshots)

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

from .config import AysConfig
from .nodes import MountPoint, Node, OpenFile
from .ref import RefError, decode_ref
from .tree import TreeError, decode_entry, encode_entry

log = logging.getLogger("aysfsd.statejournal")

MAX_BYTES = 256 << 20  # past this the journal is compacted (snapshot) or, failing that, stopped
UNKNOWN_LOOKUPS = 1 << 40


class Journal:
    """No journal (tests driving the operations directly, or journaling turned off)."""

    fd = -1

    def mount(self, mp: MountPoint) -> None: ...
    def unmount(self, name: str) -> None: ...
    def node(self, node: Node) -> None: ...
    def dropped(self, ino: int) -> None: ...
    def opened(self, fh: int, ino: int) -> None: ...
    def released(self, fh: int) -> None: ...


class StateJournal(Journal):
    """Append-only JSON lines in a memfd (see the module docstring)."""

    def __init__(self, fd: int | None = None) -> None:
        self.fd = fd if fd is not None else os.memfd_create("aysfs-state", os.MFD_CLOEXEC)
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        self.broken = False
        self.compact: Callable[[], Iterable[dict[str, object]]] | None = None  # a snapshot of the live state

    def _write(self, rec: dict[str, object]) -> None:
        if self.broken:
            return
        line = json.dumps(rec, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogateescape") + b"\n"
        if self.size + len(line) > MAX_BYTES and self.compact is not None:
            self.snapshot(self.compact())
        if self.size + len(line) > MAX_BYTES:
            self.broken = True
            log.warning("state journal full (%d bytes): a crash now loses the inode table "
                        "(a graceful restart still hands it over)", self.size)
            return
        try:
            os.write(self.fd, line)
            self.size += len(line)
        except OSError as e:
            self.broken = True
            log.warning("state journal: %s; a crash now loses the inode table", e)

    def mount(self, mp: MountPoint) -> None:
        self._write(mount_record(mp))

    def unmount(self, name: str) -> None:
        self._write({"unmount": name})

    def node(self, node: Node) -> None:
        if node.dbg is None:  # an edited file of debug mode lives in Redis, not in the tree
            self._write(node_record(node))

    def dropped(self, ino: int) -> None:
        self._write({"x": ino})

    def opened(self, fh: int, ino: int) -> None:
        self._write({"o": fh, "i": ino})

    def released(self, fh: int) -> None:
        self._write({"c": fh})

    def snapshot(self, records: Iterable[dict[str, object]]) -> None:
        """Replace the journal with `records` (a compact image of the live state)."""
        data = b"".join(json.dumps(r, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogateescape")
                        + b"\n" for r in records)
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.size = len(data)
        self.broken = False

    def records(self) -> Iterator[dict[str, object]]:
        """Every record, oldest first; a torn last line (a crash mid-write) is skipped."""
        os.lseek(self.fd, 0, os.SEEK_SET)
        with os.fdopen(os.dup(self.fd), "rb") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    log.warning("state journal: skipping a torn record")
                    continue
                if isinstance(rec, dict):
                    yield rec
        os.lseek(self.fd, 0, os.SEEK_END)


def mount_record(mp: MountPoint) -> dict[str, object]:
    ref = json.loads(mp.ref.encode()) if mp.ref is not None else None
    return {"mount": mp.name, "top": mp.top_ino, "mnt": mp.cfg.mnt, "ref": ref}


def node_record(node: Node, lookups: int | None = None) -> dict[str, object]:
    rec: dict[str, object] = {"n": node.ino, "p": node.parent, "m": node.mount.name, "e": encode_entry(node.entry)}
    if node.path:
        rec["path"] = node.path
    if lookups is not None:
        rec["l"] = lookups
    return rec


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


def restore(records: Iterable[dict[str, object]], configs: Sequence[AysConfig]) -> Restored:
    """Rebuild the state the records describe, for the mounts still in `configs`."""
    by_name = {c.name: c for c in configs}
    tops: dict[str, dict[str, object]] = {}
    raw_nodes: dict[int, dict[str, object]] = {}
    files: dict[int, int] = {}
    out = Restored()
    for rec in records:
        if "n" in rec:
            raw_nodes[int(rec["n"])] = rec  # type: ignore[call-overload]
        elif "x" in rec:
            raw_nodes.pop(int(rec["x"]), None)  # type: ignore[call-overload]
        elif "o" in rec:
            files[int(rec["o"])] = int(rec["i"])  # type: ignore[call-overload]
        elif "c" in rec:
            files.pop(int(rec["c"]), None)  # type: ignore[call-overload]
        elif "mount" in rec:
            tops[str(rec["mount"])] = rec
        elif "unmount" in rec:
            tops.pop(str(rec["unmount"]), None)
        elif "next_ino" in rec:
            out.next_ino = max(out.next_ino, int(rec["next_ino"]))  # type: ignore[call-overload]
            out.next_fh = max(out.next_fh, int(rec["next_fh"]))  # type: ignore[call-overload]
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
    # parents before children: inode numbers grow as nodes are handed out
    for ino in sorted(raw_nodes):
        rec = raw_nodes[ino]
        out.next_ino = max(out.next_ino, ino + 1)
        owner = out.mounts.get(str(rec.get("m")))
        parent = out.nodes.get(int(rec.get("p", 0)))  # type: ignore[call-overload]
        if owner is None or parent is None or parent.mount is not owner:
            out.skipped += 1
            continue
        try:
            entry = decode_entry(rec["e"])
        except (TreeError, KeyError) as e:
            log.warning("state journal: node %d cannot be restored: %s", ino, e)
            out.skipped += 1
            continue
        lookups = rec.get("l")
        node = Node(ino, owner, entry, parent.ino, str(rec.get("path", "")),
                    lookups=int(lookups) if isinstance(lookups, int) else UNKNOWN_LOOKUPS)
        out.nodes[ino] = node
        if parent.children is None:
            parent.children = {}
        parent.children[entry.name] = ino
    for fh, ino in files.items():
        out.next_fh = max(out.next_fh, fh + 1)
        held = out.nodes.get(ino)
        if held is not None:
            out.open_files[fh] = OpenFile(held, held.entry)
    return out


def snapshot_records(mounts: Iterable[MountPoint], nodes: dict[int, Node], open_files: dict[int, OpenFile],
                     next_ino: int, next_fh: int) -> Iterator[dict[str, object]]:
    """A compact image of the live state, exact lookup counts included."""
    yield {"next_ino": next_ino, "next_fh": next_fh}
    tops = set()
    for mp in mounts:
        tops.add(mp.top_ino)
        yield mount_record(mp)
    for ino in sorted(nodes):
        node = nodes[ino]
        if ino in tops or node.dbg is not None or node.mount.top_ino not in tops:
            continue
        yield node_record(node, node.lookups)
    for fh, of in open_files.items():
        if of.dbg is None and of.buf is None:
            yield {"o": fh, "i": of.node.ino}
