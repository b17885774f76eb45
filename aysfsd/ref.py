"""Refs: the one mutable record per ays in a stor, naming the root of its current tree."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from .layout import HASH_RE

MAX_REF_BYTES = 64 * 1024


class RefError(ValueError):
    """A ref that must not be used."""


@dataclass(frozen=True, slots=True)
class Ref:
    ays: str
    root: str
    revision: int
    time: float

    def encode(self) -> bytes:
        obj = {"aysfs": "ref", "v": 1, "ays": self.ays, "root": self.root, "revision": self.revision,
               "time": self.time}
        return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode() + b"\n"


def new_ref(ays: str, root: str, previous: Ref | None) -> Ref:
    return Ref(ays, root, (previous.revision + 1) if previous else 1, round(time.time(), 3))


def decode_ref(data: bytes, ays_id: str) -> Ref:
    """Parse and check a ref fetched for `ays_id` (a ref naming another ays is refused)."""
    if len(data) > MAX_REF_BYTES:
        raise RefError(f"ref for {ays_id!r} is {len(data)} bytes, too large")
    try:
        obj = json.loads(data)
    except ValueError as e:
        raise RefError(f"ref for {ays_id!r} is not valid JSON: {e}") from None
    if not isinstance(obj, dict) or obj.get("aysfs") != "ref" or obj.get("v") != 1:
        raise RefError(f"ref for {ays_id!r} is not an aysfs ref (v1)")
    ays, root, rev, t = obj.get("ays"), obj.get("root"), obj.get("revision"), obj.get("time")
    if ays != ays_id:
        raise RefError(f"ref for {ays_id!r} names another ays: {ays!r:.80}")
    if not isinstance(root, str) or not HASH_RE.match(root):
        raise RefError(f"ref for {ays_id!r} has a bad root hash {root!r:.80}")
    if type(rev) is not int or rev < 0:
        raise RefError(f"ref for {ays_id!r} has a bad revision {rev!r:.40}")
    if type(t) not in (int, float):
        raise RefError(f"ref for {ays_id!r} has a bad time {t!r:.40}")
    return Ref(ays_id, root, rev, float(t))  # type: ignore[arg-type]
