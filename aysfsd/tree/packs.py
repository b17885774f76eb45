"""Tree packs: a version's directory objects in a few blobs, so a cold walk costs a few requests.

At publish, every directory object of a version (up to TREE_MAX_PACKS packs) is also written
into tree packs: blobs of at most TREE_PACK_SIZE bytes holding directory objects back to back,
in the order a walk reaches them (depth first, name order). Each pack so holds whole subtrees,
or consecutive parts of one, as CernVM-FS nests catalogs: a walk that enters a subtree finds
its objects in one pack, and a huge tree is a bounded number of bounded packs.

The packs are listed in the version's tree index, at `trees/<root hash>` in the stor (next to
`refs/`), canonical JSON:

    {"aysfs":"trees","v":1,"root":HASH,"packs":[[pack,size,[[member,size],...]],...]}

It lives outside the ref and the root directory object on purpose: daemons that predate it
refuse unknown fields there, and never ask for `trees/`; a tree published without it simply
has none (the daemon falls back to one object, or one pack of subdirectories, per request).
The index is not a blob (its name comes from the root, not from its bytes), so it is trusted
for nothing: every pack is checked against its hash and every member against its own before
it is kept. A missing, corrupt or truncated pack, or a bad index, costs speed, never data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..stores.layout import HASH_RE, check_hash
from .objects import PACK_SIZE

TREE_PACK_SIZE = 512 * 1024  # published packs are at most this big (the decoder allows PACK_SIZE)
TREE_MAX_PACKS = 64  # packs per version: 32 MiB of directory objects; the rest is fetched per directory
MAX_MEMBERS = 1_000_000
MAX_INDEX_BYTES = 64 * 1024 * 1024


class TreeIndexError(ValueError):
    """A tree index that must not be used."""


@dataclass(frozen=True, slots=True)
class TreePack:
    hash: str
    size: int
    members: tuple[tuple[str, int, int], ...]  # (hash, offset, size), back to back from 0


def tree_path(root: str) -> str:
    """Relative path of a version's tree index in a stor."""
    return f"trees/{check_hash(root)}"


def plan(objects: list[tuple[str, bytes]]) -> list[list[tuple[str, bytes]]]:
    """Cut directory objects (hash, bytes), in walk order, into consecutive packs of at most
    TREE_PACK_SIZE bytes and at most TREE_MAX_PACKS packs; duplicates once. An object too big
    for a pack stays alone (fetched by itself), and so does one that would be a pack's only
    member (such a pack would be that very blob: same bytes, same hash)."""
    packs: list[list[tuple[str, bytes]]] = []
    cur: list[tuple[str, bytes]] = []
    size = 0
    seen: set[str] = set()
    for h, data in objects:
        if h in seen or len(data) > TREE_PACK_SIZE:
            continue
        seen.add(h)
        if size + len(data) > TREE_PACK_SIZE:
            if len(cur) > 1:
                packs.append(cur)
            cur, size = [], 0
            if len(packs) == TREE_MAX_PACKS:
                return packs
        cur.append((h, data))
        size += len(data)
    if len(cur) > 1:
        packs.append(cur)
    return packs


def packs_json(packs: list[tuple[str, list[tuple[str, int]]]]) -> list[object]:
    """An index's `packs` list: packs as (pack hash, [(member hash, size), ...])."""
    return [[h, sum(s for _, s in ms), [[m, s] for m, s in ms]] for h, ms in packs]


def encode_index(root: str, packs: list[tuple[str, list[tuple[str, int]]]]) -> bytes:
    """Canonical bytes of a tree index: packs as (pack hash, [(member hash, size), ...])."""
    obj = {"aysfs": "trees", "v": 1, "root": root, "packs": packs_json(packs)}
    return json.dumps(obj, separators=(",", ":")).encode()


def _hash(v: object) -> str:
    if not isinstance(v, str) or not HASH_RE.match(v):
        raise TreeIndexError(f"bad hash {v!r:.80}")
    return v


def decode_pack(raw: object) -> TreePack:
    """One pack of an index's `packs` list, validated."""
    if not isinstance(raw, list) or len(raw) != 3 or type(raw[1]) is not int or not isinstance(raw[2], list):
        raise TreeIndexError(f"bad pack {raw!r:.80}")
    h, size, ms = _hash(raw[0]), raw[1], raw[2]
    if not 0 < size <= PACK_SIZE or not ms:
        raise TreeIndexError(f"pack {h}: size {size} or member list out of bounds")
    members: list[tuple[str, int, int]] = []
    off = 0
    for m in ms:
        if not isinstance(m, list) or len(m) != 2 or type(m[1]) is not int or not 0 < m[1] <= size:
            raise TreeIndexError(f"pack {h}: bad member {m!r:.80}")
        members.append((_hash(m[0]), off, m[1]))
        off += m[1]
    if off != size:
        raise TreeIndexError(f"pack {h}: members add up to {off} bytes, pack is {size}")
    if len(members) < 2 or any(m == h for m, _, _ in members):
        raise TreeIndexError(f"pack {h}: a pack is not its own member")
    return TreePack(h, size, tuple(members))


def decode_packs(raw: object) -> list[TreePack]:
    """An index's `packs` list, validated and bounded."""
    if not isinstance(raw, list) or len(raw) > TREE_MAX_PACKS:
        raise TreeIndexError(f"packs must be a list of at most {TREE_MAX_PACKS}")
    packs = [decode_pack(p) for p in raw]
    if sum(len(p.members) for p in packs) > MAX_MEMBERS:
        raise TreeIndexError(f"more than {MAX_MEMBERS} members")
    return packs


def decode_index(data: bytes, root: str) -> list[TreePack]:
    """Parse and validate the tree index of `root`; an index of another root is refused."""
    try:
        if len(data) > MAX_INDEX_BYTES:
            raise TreeIndexError(f"{len(data)} bytes, more than {MAX_INDEX_BYTES}")
        obj = json.loads(data)
        if not isinstance(obj, dict) or obj.get("aysfs") != "trees" or obj.get("v") != 1:
            raise TreeIndexError("not an aysfs tree index (v1)")
        unknown = set(obj) - {"aysfs", "v", "root", "packs"}
        if unknown:
            raise TreeIndexError(f"unknown fields {sorted(unknown)}")
        if obj.get("root") != root:
            raise TreeIndexError(f"names another root {obj.get('root')!r:.80}")
        return decode_packs(obj.get("packs"))
    except TreeIndexError as e:
        raise TreeIndexError(f"tree index of {root}: {e}") from None
    except (ValueError, RecursionError) as e:
        raise TreeIndexError(f"tree index of {root}: not valid JSON ({e})") from None
