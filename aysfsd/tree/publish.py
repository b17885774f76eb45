"""Publish a directory as an ays tree: blobs, directory objects and the ref, into a stor."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..stores import Store
from ..stores.layout import blob_path, profile_ref_path, ref_path, start_path
from .objects import (
    CHUNK_SIZE,
    KIND_DIR,
    KIND_FILE,
    KIND_LINK,
    MAX_PACKS,
    PACK_FILE_MAX,
    PACK_SIZE,
    Entry,
    check_name,
    encode_dir,
)
from .packs import TREE_MAX_PACKS, TREE_PACK_SIZE, encode_index, plan, tree_path
from .profile import decode as decode_profile
from .ref import Ref, decode_ref, new_ref, public_key_text, sign
from .start import StartFileError, decode_start, encode_start


@dataclass
class PublishResult:
    root: str
    ref: Ref
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0
    uploaded_blobs: int = 0
    uploaded_bytes: int = 0
    skipped_blobs: int = 0
    packs: int = 0
    tree_packs: int = 0
    ref_changed: bool = False
    profile: str = ""  # the startup profile's blob, when one was published
    profile_items: int = 0
    profile_ref: str = ""
    skipped_special: list[str] = field(default_factory=list)


class Publisher:
    """Walks a directory bottom-up; uploads only the blobs the stor does not have."""

    def __init__(self, store: Store, progress: Callable[[str], None] | None = None) -> None:
        self.store = store
        self.progress = progress or (lambda _p: None)
        self._seen: set[str] = set()
        self._walk: list[tuple[str, bytes]] = []  # directory objects in walk order (tree packs)
        self._walk_bytes = 0
        self.result = PublishResult(root="", ref=Ref("", "", 0, 0.0))

    def _upload(self, h: str, data: bytes) -> None:
        if h in self._seen:
            return
        self._seen.add(h)
        rel = blob_path(h)
        if self.store.exists(rel):
            self.result.skipped_blobs += 1
            return
        self.store.write(rel, data)
        self.result.uploaded_blobs += 1
        self.result.uploaded_bytes += len(data)

    def _file(self, path: str, st: os.stat_result, name: str, pack: _Pack) -> Entry:
        pieces: list[tuple[str, int]] = []
        size = 0
        with open(path, "rb") as f:
            while True:
                data = f.read(CHUNK_SIZE)
                if not data and pieces:
                    break
                h = hashlib.sha256(data).hexdigest()
                self._upload(h, data)
                if len(data) < CHUNK_SIZE and not pieces and 0 < len(data) <= PACK_FILE_MAX:
                    pack.add(name, data)
                pieces.append((h, len(data)))
                size += len(data)
                if len(data) < CHUNK_SIZE:
                    break
        self.result.files += 1
        self.result.bytes += size
        mode, mtime = stat.S_IMODE(st.st_mode), st.st_mtime_ns
        if len(pieces) == 1:
            return Entry(name, KIND_FILE, mode, size, mtime, hash=pieces[0][0])
        return Entry(name, KIND_FILE, mode, size, mtime, chunks=tuple(pieces))

    def _dir(self, path: str) -> tuple[str, bytes]:
        """Publish a directory: its object's hash and bytes."""
        entries: list[Entry] = []
        slot = len(self._walk)  # its place in walk order (depth first, name order): before its subdirectories
        self._walk.append(("", b""))
        pack = _Pack(self._upload_pack)  # its small files
        dpack = _Pack(self._upload_pack)  # its subdirectories' objects
        with os.scandir(path) as it:
            names = sorted(it, key=lambda d: d.name)
        for d in names:
            name = check_name(d.name)
            st = d.stat(follow_symlinks=False)
            mode, mtime = stat.S_IMODE(st.st_mode), st.st_mtime_ns
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(d.path)
                entries.append(Entry(name, KIND_LINK, mode, len(os.fsencode(target)), mtime, target=target))
                self.result.symlinks += 1
            elif stat.S_ISDIR(st.st_mode):
                h, obj = self._dir(d.path)
                if len(obj) <= PACK_FILE_MAX:
                    dpack.add(name, obj)
                entries.append(Entry(name, KIND_DIR, mode, 0, mtime, hash=h))
            elif stat.S_ISREG(st.st_mode):
                entries.append(self._file(d.path, st, name, pack))
            else:
                self.result.skipped_special.append(d.path)
        pack.flush()
        dpack.flush()
        entries = [dpack.place(pack.place(e)) for e in entries]
        self.result.dirs += 1
        self.progress(path)
        data = encode_dir(entries)
        h = hashlib.sha256(data).hexdigest()
        self._upload(h, data)
        if len(data) <= TREE_PACK_SIZE and self._walk_bytes < 4 * TREE_MAX_PACKS * TREE_PACK_SIZE:
            self._walk[slot] = (h, data)  # (bounded: more than the packs can hold is not kept)
            self._walk_bytes += len(data)
        return h, data

    def _tree_packs(self, root: str) -> list[tuple[str, list[tuple[str, int]]]]:
        """Write the version's tree packs and its tree index (see aysfsd.tree.packs); the packs."""
        listed: list[tuple[str, list[tuple[str, int]]]] = []
        for members in plan([(h, d) for h, d in self._walk if h]):
            data = b"".join(d for _, d in members)
            ph = hashlib.sha256(data).hexdigest()
            self._upload(ph, data)
            listed.append((ph, [(h, len(d)) for h, d in members]))
        self._walk.clear()
        self.result.tree_packs = len(listed)
        if not listed:
            return listed
        index = encode_index(root, listed)
        rel = tree_path(root)
        if self.store.read(rel) != index:
            self.store.write(rel, index)
        return listed

    def _start_file(self, ays_id: str, root: str, packs: list[tuple[str, list[tuple[str, int]]]],
                    profile: bytes | None) -> None:
        """Write the start file (see aysfsd.tree.start); a publish of the same version without a
        profile keeps the one it carries."""
        rel = start_path(ays_id)
        old = self.store.read(rel)
        if profile is None and old is not None:
            try:
                profile = decode_start(old, root).profile
            except StartFileError:
                pass
        data = encode_start(root, packs, profile)
        if old != data:
            self.store.write(rel, data)

    def _upload_pack(self, h: str, data: bytes) -> None:
        self.result.packs += 1
        self._upload(h, data)

    def publish(self, src: str, ays_id: str, sign_key: Ed25519PrivateKey | None = None,
                profile: bytes | None = None) -> PublishResult:
        """`profile`: a startup profile of this tree (checked before the ref is written)."""
        if not os.path.isdir(src):
            raise NotADirectoryError(f"{src}: not a directory")
        root, _ = self._dir(src)
        self.result.root = root
        if profile is not None:
            p = decode_profile(profile)  # ProfileError is a ValueError
            if p.root != root:
                raise ValueError(f"the profile was recorded on version {p.root[:12]}, this tree is {root[:12]}: "
                                 "record it again on this version")
            ph = hashlib.sha256(profile).hexdigest()
            self._upload(ph, profile)
        packs = self._tree_packs(root)  # before the ref: a node that sees the ref finds them
        self._start_file(ays_id, root, packs, profile)
        rel = ref_path(ays_id)
        raw = self.store.read(rel)
        old = decode_ref(raw, ays_id) if raw is not None else None
        key_text = public_key_text(sign_key.public_key()) if sign_key is not None else ""
        if old is not None and old.root == root and (sign_key is None or old.key == key_text):
            self.result.ref = old
        else:
            ref = new_ref(ays_id, root, old)
            if sign_key is not None:
                ref = sign(ref, sign_key)
            self.store.write(rel, ref.encode())
            self.result.ref = ref
            self.result.ref_changed = True
        if profile is not None:
            # beside the plain ref, which daemons that know no profiles keep reading (see aysfsd.tree.ref)
            pref = dataclasses.replace(self.result.ref, profile=ph, key="", sig="")
            if sign_key is not None:
                pref = sign(pref, sign_key)
            self.store.write(profile_ref_path(ays_id), pref.encode())
            self.result.profile, self.result.profile_items = ph, len(p.items)
            self.result.profile_ref = profile_ref_path(ays_id)
        return self.result


class _Pack:
    """Packs a directory's small files (or its subdirectories' objects), in name order, into
    blobs of at most PACK_SIZE bytes (see aysfsd.tree.objects); a pack of one member is not worth a
    request and is not made."""

    def __init__(self, upload: Callable[[str, bytes], None]) -> None:
        self.upload = upload
        self.buf = bytearray()
        self.members: list[tuple[str, int]] = []  # (name, offset) in the current pack
        self.placed: dict[str, tuple[str, int, int]] = {}  # name -> (pack hash, offset, pack size)
        self.count = 0  # packs made

    def add(self, name: str, data: bytes) -> None:
        if len(self.buf) + len(data) > PACK_SIZE:
            self.flush()
        if self.count >= MAX_PACKS:
            return  # a directory object lists at most MAX_PACKS packs: the rest stay alone
        self.members.append((name, len(self.buf)))
        self.buf += data

    def flush(self) -> None:
        if len(self.members) > 1:
            data = bytes(self.buf)
            h = hashlib.sha256(data).hexdigest()
            self.upload(h, data)
            self.count += 1
            for name, off in self.members:
                self.placed[name] = (h, off, len(data))
        self.buf.clear()
        self.members.clear()

    def place(self, e: Entry) -> Entry:
        p = self.placed.get(e.name)
        if p is None:
            return e
        return dataclasses.replace(e, pack=p[0], pack_off=p[1], pack_size=p[2])


def publish(src: str, ays_id: str, store: Store) -> PublishResult:
    return Publisher(store).publish(src, ays_id)
