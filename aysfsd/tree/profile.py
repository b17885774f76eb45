"""Startup profiles: the order in which a start of a version first needed its blobs.

A profile is canonical JSON (keys in this order, no spaces, UTF-8):

    {"aysfs":"profile","v":1,"root":HASH,"items":[[path,index,hash,size],...]}

Each item is a *tree position*, not just a hash: `path` is relative to the root ("" is the
root itself, components joined by "/"), `index` is the chunk of the file at `path` (0 for a
file of one blob) or -1 for the directory object at `path`, `hash` and `size` what the tree
names there (a directory's size is 0, as in its entry). A node using a profile resolves
every item through its own verified directory objects and fetches only what its tree names
at that place: a foreign hash costs nothing but a log line, so a profile from a grid cache
needs no signature. Decoding is strict: bounded (items, bytes of the profile, bytes it
names), unknown fields, hostile names and absurd sizes refuse the whole profile.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..stores.layout import HASH_RE
from .objects import CHUNK_SIZE, MAX_FILE_SIZE, TreeError, check_name

MAX_PROFILE_BYTES = 8 << 20  # an encoded profile larger than this is refused
MAX_ITEMS = 65536
MAX_DATA = 1 << 30  # bytes of blobs a profile may name (and a recording may collect)
MAX_PATH = 16384  # characters of an item's path
MAX_INDEX = MAX_FILE_SIZE // CHUNK_SIZE
DIR_INDEX = -1


class ProfileError(ValueError):
    """A profile that must not be used."""


@dataclass(frozen=True, slots=True)
class Item:
    path: str  # "" = the root
    index: int  # chunk of the file at `path`, or DIR_INDEX for the directory object there
    hash: str
    size: int

    def parts(self) -> list[str]:
        return self.path.split("/") if self.path else []


@dataclass(frozen=True, slots=True)
class Profile:
    root: str
    items: tuple[Item, ...]

    def encode(self) -> bytes:
        obj = {"aysfs": "profile", "v": 1, "root": self.root,
               "items": [[i.path, i.index, i.hash, i.size] for i in self.items]}
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogateescape")

    @property
    def data_bytes(self) -> int:
        return sum(i.size for i in self.items)


def _item(raw: object, n: int) -> Item:
    if not isinstance(raw, list) or len(raw) != 4:
        raise ProfileError(f"item {n} is not [path, index, hash, size]")
    path, index, h, size = raw
    if not isinstance(path, str) or len(path) > MAX_PATH:
        raise ProfileError(f"item {n}: bad path {path!r:.80}")
    if path:
        try:
            for part in path.split("/"):
                check_name(part)
        except TreeError as e:
            raise ProfileError(f"item {n}: {e}") from None
    if type(index) is not int or not DIR_INDEX <= index <= MAX_INDEX:
        raise ProfileError(f"item {n}: bad index {index!r:.40}")
    if not isinstance(h, str) or not HASH_RE.match(h):
        raise ProfileError(f"item {n}: bad hash {h!r:.80}")
    if type(size) is not int or not 0 <= size <= CHUNK_SIZE or (index == DIR_INDEX and size != 0):
        raise ProfileError(f"item {n}: absurd size {size!r:.40} (a chunk is at most {CHUNK_SIZE}, a directory 0)")
    return Item(path, index, h, size)


def decode(data: bytes, root: str | None = None) -> Profile:
    """Parse and check a profile; `root`: the version it must be for."""
    if len(data) > MAX_PROFILE_BYTES:
        raise ProfileError(f"profile is {len(data)} bytes, more than {MAX_PROFILE_BYTES}")
    try:
        obj = json.loads(data.decode("utf-8", "surrogateescape"))
    except (ValueError, RecursionError) as e:
        raise ProfileError(f"profile is not valid JSON: {e}") from None
    if not isinstance(obj, dict) or obj.get("aysfs") != "profile" or obj.get("v") != 1:
        raise ProfileError("not an aysfs profile (v1)")
    unknown = set(obj) - {"aysfs", "v", "root", "items"}
    if unknown:
        raise ProfileError(f"profile has unknown fields {sorted(unknown)}")
    r, raw = obj.get("root"), obj.get("items")
    if not isinstance(r, str) or not HASH_RE.match(r):
        raise ProfileError(f"profile has a bad root hash {r!r:.80}")
    if root is not None and r != root:
        raise ProfileError(f"profile is for version {r[:12]}, not {root[:12]}")
    if not isinstance(raw, list) or len(raw) > MAX_ITEMS:
        raise ProfileError(f"items must be a list of at most {MAX_ITEMS}")
    p = Profile(r, tuple(_item(x, n) for n, x in enumerate(raw)))
    if p.data_bytes > MAX_DATA:
        raise ProfileError(f"profile names {p.data_bytes} bytes of blobs, more than {MAX_DATA}")
    if p.encode() != data:
        raise ProfileError("profile is not in canonical form")
    return p
