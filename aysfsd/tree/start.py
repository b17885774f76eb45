"""Start files: what a cold start of a version needs first, named by the ays id.

A node's cold start is a chain of round trips: the ref names the root, the root names the
tree index (`trees/<root>`), the index the tree packs, and the profile ref the profile blob.
The start file, at `refs/<id>.start` beside the ref (layout.start_path), holds the tree index's
pack list and the startup profile's bytes of the version the ref names, so a node asks for it
together with the ref and the profile ref, and its tree packs and the profile's first items
leave a round trip after the mount started instead of two or three. Canonical JSON:

    {"aysfs":"start","v":1,"root":HASH,"packs":[[pack,size,[[member,size],...]],...][,"profile":BASE64]}

It is trusted for nothing, like the tree index: a node uses it only for the root its ref names
(a start file of another version, left by a publish under way, is ignored), every tree pack
and member is checked against its hash, and the profile's bytes only when their SHA-256 is the
hash its profile ref (signed with the ref, when refs are signed) names. A missing or bad start
file costs the round trips it would have saved, never data. Published by every `publish`
before the ref; daemons that predate it never ask for it.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from .packs import MAX_INDEX_BYTES, TreeIndexError, TreePack, decode_packs, packs_json
from .profile import MAX_PROFILE_BYTES

MAX_START_BYTES = MAX_INDEX_BYTES + 2 * MAX_PROFILE_BYTES


class StartFileError(ValueError):
    """A start file that must not be used."""


@dataclass(frozen=True, slots=True)
class StartFile:
    root: str
    packs: list[TreePack]
    profile: bytes | None  # the startup profile's bytes, unchecked (see the module docstring)


def encode_start(root: str, packs: list[tuple[str, list[tuple[str, int]]]], profile: bytes | None) -> bytes:
    """Canonical bytes of a start file: packs as for encode_index, the profile's bytes or None."""
    obj: dict[str, object] = {"aysfs": "start", "v": 1, "root": root, "packs": packs_json(packs)}
    if profile is not None:
        obj["profile"] = base64.b64encode(profile).decode()
    return json.dumps(obj, separators=(",", ":")).encode()


def decode_start(data: bytes, root: str) -> StartFile:
    """Parse and validate the start file of version `root`; one of another version is refused."""
    try:
        if len(data) > MAX_START_BYTES:
            raise StartFileError(f"{len(data)} bytes, more than {MAX_START_BYTES}")
        obj = json.loads(data)
        if not isinstance(obj, dict) or obj.get("aysfs") != "start" or obj.get("v") != 1:
            raise StartFileError("not an aysfs start file (v1)")
        unknown = set(obj) - {"aysfs", "v", "root", "packs", "profile"}
        if unknown:
            raise StartFileError(f"unknown fields {sorted(unknown)}")
        if obj.get("root") != root:
            raise StartFileError(f"of another version {obj.get('root')!r:.80}")
        profile: bytes | None = None
        if "profile" in obj:
            raw = obj["profile"]
            if not isinstance(raw, str) or len(raw) > 2 * MAX_PROFILE_BYTES:
                raise StartFileError("profile must be base64 text of at most the profile limit")
            profile = base64.b64decode(raw, validate=True)
        return StartFile(root, decode_packs(obj.get("packs")), profile)
    except (StartFileError, TreeIndexError) as e:
        raise StartFileError(f"start file for {root}: {e}") from None
    except (ValueError, RecursionError, binascii.Error) as e:
        raise StartFileError(f"start file for {root}: not valid ({e})") from None
