"""Tree format: directory objects and their entries.

A directory object is a blob: canonical JSON (sorted by name, no spaces, UTF-8)

    {"aysfs":"dir","v":1,"entries":[{"n":name,"t":"f|d|l","m":perm,"s":size,
      "mt":mtime_ns,"h":hash,"c":[[hash,size],...],"l":target}, ...]}

`h` is the content hash of a file (whole file, when not chunked) or the hash of a
subdirectory's object; `c` replaces `h` for a file split into chunks; `l` is a
symlink's target, kept as published (the kernel resolves it, the daemon never does).
Decoding validates everything: names that could escape a directory, sizes that do
not add up and malformed hashes are refused with the object's hash in the error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .layout import HASH_RE

CHUNK_SIZE = 4 * 1024 * 1024
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

    def blobs(self) -> tuple[tuple[str, int], ...]:
        """The (hash, size) pieces holding a file's bytes, in order."""
        if self.kind != KIND_FILE:
            return ()
        return self.chunks if self.chunks else ((self.hash, self.size),)

    def to_json(self) -> dict[str, object]:
        d: dict[str, object] = {"n": self.name, "t": self.kind, "m": self.mode, "s": self.size, "mt": self.mtime_ns}
        if self.chunks:
            d["c"] = [[h, s] for h, s in self.chunks]
        elif self.hash:
            d["h"] = self.hash
        if self.kind == KIND_LINK:
            d["l"] = self.target
        return d


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
    obj = {"aysfs": "dir", "v": 1, "entries": [e.to_json() for e in ents]}
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


def _entry(d: object) -> Entry:
    if not isinstance(d, dict):
        raise TreeError("entry is not an object")
    unknown = set(d) - {"n", "t", "m", "s", "mt", "h", "c", "l"}
    if unknown:
        raise TreeError(f"unknown entry fields {sorted(unknown)}")
    name = check_name(d.get("n"))
    kind = d.get("t")
    mode = _int(d, "m", 0, 0o7777)
    size = _int(d, "s", 0, MAX_FILE_SIZE)
    mtime = _int(d, "mt", -(1 << 62), 1 << 62)
    if kind == KIND_FILE:
        if "c" in d:
            raw = d["c"]
            if not isinstance(raw, list) or not raw or "h" in d:
                raise TreeError(f"{name!r}: chunk list must be a non-empty list, without 'h'")
            chunks = []
            for c in raw:
                if not isinstance(c, list) or len(c) != 2 or type(c[1]) is not int or not 0 < c[1] <= CHUNK_SIZE:
                    raise TreeError(f"{name!r}: bad chunk {c!r:.80}")
                chunks.append((_hash(c[0]), c[1]))
            if any(s != CHUNK_SIZE for _, s in chunks[:-1]):
                raise TreeError(f"{name!r}: every chunk but the last must be {CHUNK_SIZE} bytes")
            if sum(s for _, s in chunks) != size:
                raise TreeError(f"{name!r}: chunk sizes add up to {sum(s for _, s in chunks)}, entry says {size}")
            return Entry(name, kind, mode, size, mtime, chunks=tuple(chunks))
        if size > CHUNK_SIZE:
            raise TreeError(f"{name!r}: unchunked file of {size} bytes (> {CHUNK_SIZE})")
        return Entry(name, kind, mode, size, mtime, hash=_hash(d.get("h")))
    if kind == KIND_DIR:
        return Entry(name, kind, mode, 0, mtime, hash=_hash(d.get("h")))
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
        entries = [_entry(d) for d in raw]
        for a, b in zip(entries, entries[1:], strict=False):
            if a.name >= b.name:
                raise TreeError(f"entries not sorted or duplicate name {b.name!r:.80}")
        return entries
    except TreeError as e:
        raise TreeError(f"directory object {obj_hash}: {e}") from None
    except (ValueError, RecursionError) as e:
        raise TreeError(f"directory object {obj_hash}: not valid JSON ({e})") from None
