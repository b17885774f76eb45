"""Tree format: directory objects and their entries.

A directory object is a blob: canonical JSON (sorted by name, no spaces, UTF-8)

    {"aysfs":"dir","v":1,"entries":[{"n":name,"t":"f|d|l","m":perm,"s":size,
      "mt":mtime_ns,"h":hash,"c":[[hash,size],...],"l":target,"p":[pack,offset]}, ...],
     "packs":[[hash,size],...]}

`h` is the content hash of a file (whole file, when not chunked) or the hash of a
subdirectory's object; `c` replaces `h` for a file split into chunks; `l` is a
symlink's target, kept as published (the kernel resolves it, the daemon never does).

Packs: the small files of a directory are also published concatenated, in name order,
into pack blobs of at most PACK_SIZE bytes (`packs`, present only when a directory
has any); a packed file's `p` gives the index of its pack and its offset there. The
objects of a directory's subdirectories are packed the same way (in packs of their
own), so loading a directory brings its subdirectories' objects in one request. A
member runs from its offset to the next member's (the pack's end for the last): packs
hold their members back to back. A cold reader fetches one pack instead of one blob
per file (one request per directory rather than per file), and still checks every
member against its own `h`; each file and directory object stays a blob of its own
too, so a missing or corrupt pack costs speed, not data.
Decoding validates everything: names that could escape a directory, sizes that do
not add up and malformed hashes are refused with the object's hash in the error.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass

from ..stores.layout import HASH_RE

CHUNK_SIZE = 4 * 1024 * 1024
PACK_SIZE = 1 * 1024 * 1024  # a pack blob is at most this big...
PACK_FILE_MAX = 128 * 1024  # ...and holds files of at most this size
MAX_PACKS = 65536
MAX_ENTRIES = 1_000_000
MAX_FILE_SIZE = 1 << 44  # 16 TiB: anything larger in metadata is hostile
MAX_NAME = 255
MAX_TARGET = 4095

KIND_FILE, KIND_DIR, KIND_LINK = "f", "d", "l"


class TreeError(ValueError):
    """A directory object or entry that must not be served."""


@dataclass(frozen=True, slots=True)
class Entry:
    name: str
    kind: str
    mode: int  # permission bits only (0o7777)
    size: int
    mtime_ns: int
    hash: str = ""  # file content (unchunked) or directory object
    chunks: tuple[tuple[str, int], ...] = ()
    target: str = ""
    pack: str = ""  # a small file: the pack blob holding it too (see the module docstring)
    pack_off: int = 0
    pack_size: int = 0

    def blobs(self) -> tuple[tuple[str, int], ...]:
        """The (hash, size) pieces holding a file's bytes, in order."""
        if self.kind != KIND_FILE:
            return ()
        return self.chunks if self.chunks else ((self.hash, self.size),)

    def to_json(self, pack_index: int = -1) -> dict[str, object]:
        d: dict[str, object] = {"n": self.name, "t": self.kind, "m": self.mode, "s": self.size, "mt": self.mtime_ns}
        if self.chunks:
            d["c"] = [[h, s] for h, s in self.chunks]
        elif self.hash:
            d["h"] = self.hash
        if self.kind == KIND_LINK:
            d["l"] = self.target
        if pack_index >= 0:
            d["p"] = [pack_index, self.pack_off]
        return d


class NameIndex:
    """Position of a name in a directory's entries (sorted by name): a bisection, not a dict,
    because a mount of 100,000 files keeps every directory it serves in memory."""

    __slots__ = ("_entries",)

    def __init__(self, entries: list[Entry]) -> None:
        self._entries = entries

    def get(self, name: str) -> int | None:
        i = bisect.bisect_left(self._entries, name, key=_name)
        return i if i < len(self._entries) and self._entries[i].name == name else None

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None

    def __getitem__(self, name: str) -> int:
        i = self.get(name)
        if i is None:
            raise KeyError(name)
        return i


def _name(e: Entry) -> str:
    return e.name


_SHARED: dict[int, int] = {}  # one int object per distinct mode among many entries


def check_name(name: object) -> str:
    """Refuse names that could escape or confuse a directory: '', '.', '..', '/', NUL."""
    if not isinstance(name, str):
        raise TreeError(f"name is not a string: {name!r:.80}")
    if name in ("", ".", "..") or "/" in name or "\x00" in name:
        raise TreeError(f"hostile name {name!r:.80}")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME:
        raise TreeError(f"name longer than {MAX_NAME} bytes: {name[:40]!r}...")
    return name


def encode_dir(entries: list[Entry]) -> bytes:
    """Canonical bytes of a directory object (same entries → same bytes → same hash)."""
    ents = sorted(entries, key=lambda e: e.name)
    packs: dict[str, int] = {}  # pack hash -> index, in order of first use
    for e in ents:
        if e.pack and e.pack not in packs:
            packs[e.pack] = len(packs)
    sizes = {e.pack: e.pack_size for e in ents if e.pack}
    obj: dict[str, object] = {"aysfs": "dir", "v": 1,
                              "entries": [e.to_json(packs[e.pack] if e.pack else -1) for e in ents]}
    if packs:
        obj["packs"] = [[h, sizes[h]] for h in packs]
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogateescape")


def _int(d: dict[str, object], key: str, lo: int, hi: int) -> int:
    v = d.get(key)
    if type(v) is not int or not lo <= v <= hi:
        raise TreeError(f"entry field {key!r} is {v!r:.40}, want an integer in [{lo}, {hi}]")
    return v


def _hash(v: object) -> str:
    if not isinstance(v, str) or not HASH_RE.match(v):
        raise TreeError(f"bad hash {v!r:.80}")
    return v


def _pair(p: object, limit: int, what: str) -> tuple[str, int]:
    """A [hash, size] pair (a chunk or a pack) with 0 < size <= limit."""
    if not isinstance(p, list) or len(p) != 2 or type(p[1]) is not int or not 0 < p[1] <= limit:
        raise TreeError(f"bad {what} {p!r:.80}")
    return _hash(p[0]), p[1]


def _packs(raw: object) -> list[tuple[str, int]]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not raw or len(raw) > MAX_PACKS:
        raise TreeError(f"packs must be a non-empty list of at most {MAX_PACKS}")
    return [_pair(p, PACK_SIZE, "pack") for p in raw]


def _packed(name: str, d: dict[str, object], size: int, packs: list[tuple[str, int]]) -> tuple[str, int, int]:
    """A small file's or directory object's place in a pack: (pack hash, offset, pack size);
    `size` 1 for a directory (its object's size is known from the next member's offset)."""
    p = d["p"]
    if (not isinstance(p, list) or len(p) != 2 or type(p[0]) is not int or type(p[1]) is not int
            or not 0 <= p[0] < len(packs) or "h" not in d or not 0 < size <= PACK_FILE_MAX):
        raise TreeError(f"{name!r}: bad pack reference {p!r:.80}")
    ph, psize = packs[p[0]]
    if not 0 <= p[1] <= psize - size:
        raise TreeError(f"{name!r}: {size} bytes at offset {p[1]!r} do not fit its pack of {psize}")
    return ph, p[1], psize


def pack_members(entries: list[Entry], kind: str) -> dict[str, list[tuple[str, int, int]]]:
    """The packs that entries of `kind` are in, each with its members (hash, offset, size) in
    pack order; a member ends where the next begins (see the module docstring)."""
    by_pack: dict[str, list[Entry]] = {}
    for e in entries:
        if e.pack and e.kind == kind:
            by_pack.setdefault(e.pack, []).append(e)
    out: dict[str, list[tuple[str, int, int]]] = {}
    for pack, es in by_pack.items():
        es.sort(key=lambda e: e.pack_off)
        ends = [e.pack_off for e in es[1:]] + [es[0].pack_size]
        out[pack] = [(e.hash, e.pack_off, end - e.pack_off) for e, end in zip(es, ends, strict=True)]
    return out


def _entry(d: object, packs: list[tuple[str, int]]) -> Entry:
    if not isinstance(d, dict):
        raise TreeError("entry is not an object")
    unknown = set(d) - {"n", "t", "m", "s", "mt", "h", "c", "l", "p"}
    if unknown:
        raise TreeError(f"unknown entry fields {sorted(unknown)}")
    name = check_name(d.get("n"))
    kind = d.get("t")
    mode = _int(d, "m", 0, 0o7777)
    mode = _SHARED.setdefault(mode, mode)
    size = _int(d, "s", 0, MAX_FILE_SIZE)
    mtime = _int(d, "mt", -(1 << 62), 1 << 62)
    if kind == KIND_FILE:
        if "c" in d:
            raw = d["c"]
            if not isinstance(raw, list) or not raw or "h" in d or "p" in d:
                raise TreeError(f"{name!r}: chunk list must be a non-empty list, without 'h' or 'p'")
            try:
                chunks = [_pair(c, CHUNK_SIZE, "chunk") for c in raw]
            except TreeError as e:
                raise TreeError(f"{name!r}: {e}") from None
            if any(s != CHUNK_SIZE for _, s in chunks[:-1]):
                raise TreeError(f"{name!r}: every chunk but the last must be {CHUNK_SIZE} bytes")
            if sum(s for _, s in chunks) != size:
                raise TreeError(f"{name!r}: chunk sizes add up to {sum(s for _, s in chunks)}, entry says {size}")
            return Entry(name, kind, mode, size, mtime, chunks=tuple(chunks))
        if size > CHUNK_SIZE:
            raise TreeError(f"{name!r}: unchunked file of {size} bytes (> {CHUNK_SIZE})")
        if "p" in d:
            ph, poff, psize = _packed(name, d, size, packs)
            return Entry(name, kind, mode, size, mtime, hash=_hash(d.get("h")), pack=ph, pack_off=poff,
                         pack_size=psize)
        return Entry(name, kind, mode, size, mtime, hash=_hash(d.get("h")))
    if kind == KIND_DIR:
        if "p" in d:
            ph, poff, psize = _packed(name, d, 1, packs)
            return Entry(name, kind, mode, 0, mtime, hash=_hash(d.get("h")), pack=ph, pack_off=poff,
                         pack_size=psize)
        return Entry(name, kind, mode, 0, mtime, hash=_hash(d.get("h")))
    if "p" in d:
        raise TreeError(f"{name!r}: only a file or a directory can be in a pack")
    if kind == KIND_LINK:
        target = d.get("l")
        if not isinstance(target, str) or not target or "\x00" in target or len(target) > MAX_TARGET:
            raise TreeError(f"{name!r}: bad symlink target {target!r:.80}")
        return Entry(name, kind, mode, len(target.encode("utf-8", "surrogateescape")), mtime, target=target)
    raise TreeError(f"{name!r}: unknown kind {kind!r:.20}")


def decode_dir(data: bytes, obj_hash: str = "?") -> list[Entry]:
    """Parse and validate a directory object; entries sorted by name, unique."""
    try:
        obj = json.loads(data.decode("utf-8", "surrogateescape"))
        if not isinstance(obj, dict) or obj.get("aysfs") != "dir" or obj.get("v") != 1:
            raise TreeError("not an aysfs directory object (v1)")
        raw = obj.get("entries")
        if not isinstance(raw, list) or len(raw) > MAX_ENTRIES:
            raise TreeError(f"entries must be a list of at most {MAX_ENTRIES}")
        unknown = set(obj) - {"aysfs", "v", "entries", "packs"}
        if unknown:
            raise TreeError(f"unknown fields {sorted(unknown)}")
        packs = _packs(obj.get("packs"))
        entries = [_entry(d, packs) for d in raw]
        for a, b in zip(entries, entries[1:], strict=False):
            if a.name >= b.name:
                raise TreeError(f"entries not sorted or duplicate name {b.name!r:.80}")
        return entries
    except TreeError as e:
        raise TreeError(f"directory object {obj_hash}: {e}") from None
    except (ValueError, RecursionError) as e:
        raise TreeError(f"directory object {obj_hash}: not valid JSON ({e})") from None
