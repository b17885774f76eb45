"""The one stor layout shared by every transport (directory, HTTP, SSH) and grid cache.

    <root>/blobs/<first 2 hex>/<sha256 hex>    a blob, stored plain (uncompressed)
    <root>/refs/<escaped ays id>               a ref (JSON, see aysfsd.tree.ref)
    <root>/trees/<root hash>                   a version's tree index (JSON, see aysfsd.tree.packs)
    <root>/refs/<escaped ays id>.profile       the same ref naming a startup profile (stors)
    <root>/refs/<escaped ays id>.start         what a cold start needs first, by id (JSON, see aysfsd.tree.start)
    <root>/profiles/<root hash>                a startup profile of that version (grid caches)

Blobs are stored plain so that any web server can serve them and a byte range of a
chunk could be requested directly; HTTP transfer compression is the server's business.
"""

from __future__ import annotations

import hashlib
import re

HASH_RE = re.compile(r"^[0-9a-f]{64}$")
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def check_hash(h: str) -> str:
    """Return `h` if it is a lowercase 64-hex SHA-256, else raise ValueError."""
    if not isinstance(h, str) or not HASH_RE.match(h):
        raise ValueError(f"not a sha256 hex digest: {h!r:.80}")
    return h


def blob_path(h: str) -> str:
    """Relative path of a blob in a stor or grid cache."""
    check_hash(h)
    return f"blobs/{h[:2]}/{h}"


def escape_id(ays_id: str) -> str:
    """Escape an ays id into one safe path component.

    Every byte outside [A-Za-z0-9_-] (dots included, so `..` cannot appear) becomes %XX,
    so `jumpscale|mongodb!main` is `jumpscale%7Cmongodb%21main`. Reversible, never empty.
    """
    if not ays_id or "\x00" in ays_id:
        raise ValueError(f"invalid ays id: {ays_id!r}")
    return "".join(c if c in _SAFE else "".join(f"%{b:02X}" for b in c.encode()) for c in ays_id)


def ref_path(ays_id: str) -> str:
    """Relative path of the ref of `ays_id` in a stor."""
    return f"refs/{escape_id(ays_id)}"


def profile_ref_path(ays_id: str) -> str:
    """The ref that also names a startup profile; a separate file, so that daemons that know
    no profiles keep reading the plain ref (an escaped id has no '.': no clash)."""
    return f"refs/{escape_id(ays_id)}.profile"


def start_path(ays_id: str) -> str:
    """The start file of `ays_id` (see aysfsd.tree.start), beside its ref."""
    return f"refs/{escape_id(ays_id)}.start"


def grid_profile_path(root: str) -> str:
    """Where a grid cache keeps the startup profile a node recorded for version `root`."""
    check_hash(root)
    return f"profiles/{root}"
