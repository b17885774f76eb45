"""Refs: the one mutable record per ays in a stor, naming the root of its current tree.

    {"aysfs":"ref","v":1,"ays":ID,"root":HASH,"revision":N,"time":T[,"profile":HASH][,"key":PUB,"sig":SIG]}

A signed ref carries the signer's Ed25519 public key and a signature (both base64) over
the canonical JSON of every other field (sorted keys, no spaces), so the ays id, root,
revision and time are all covered: a ref cannot be replayed for another ays, and the
revision lets a node refuse a rollback to an older version.

`profile` names the blob of a startup profile of that version (see aysfsd.tree.profile) and is
covered by the signature like every other field. Daemons before profiles refuse unknown
fields, so a ref naming a profile is published as a second file beside the plain ref
(see layout.profile_ref_path), with the same fields: a node uses it only when they match.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, replace

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..stores.layout import HASH_RE

MAX_REF_BYTES = 64 * 1024


class RefError(ValueError):
    """A ref that must not be used."""


@dataclass(frozen=True, slots=True)
class Ref:
    ays: str
    root: str
    revision: int
    time: float
    key: str = ""  # base64 raw Ed25519 public key of the signer ("" = unsigned)
    sig: str = ""  # base64 signature over payload()
    profile: str = ""  # hash of a startup profile blob ("" = none)

    def payload(self) -> bytes:
        obj: dict[str, object] = {"aysfs": "ref", "v": 1, "ays": self.ays, "root": self.root,
                                  "revision": self.revision, "time": self.time}
        if self.profile:
            obj["profile"] = self.profile
        if self.key:
            obj["key"] = self.key
        return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()

    def encode(self) -> bytes:
        obj = json.loads(self.payload())
        if self.sig:
            obj["sig"] = self.sig
        return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode() + b"\n"

    @property
    def signed(self) -> bool:
        return bool(self.sig)


def new_ref(ays: str, root: str, previous: Ref | None) -> Ref:
    return Ref(ays, root, (previous.revision + 1) if previous else 1, round(time.time(), 3))


def public_key_text(pub: Ed25519PublicKey) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return base64.b64encode(pub.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


def sign(ref: Ref, key: Ed25519PrivateKey) -> Ref:
    unsigned = replace(ref, key=public_key_text(key.public_key()), sig="")
    return replace(unsigned, sig=base64.b64encode(key.sign(unsigned.payload())).decode())


def verify(ref: Ref, trusted: list[str]) -> None:
    """Raise RefError unless `ref` is signed by one of the `trusted` keys (base64 raw Ed25519)."""
    if not ref.signed:
        raise RefError(f"ref for {ref.ays!r} is not signed, and trusted keys are configured")
    if ref.key not in trusted:
        raise RefError(f"ref for {ref.ays!r} is signed by an untrusted key {ref.key}")
    try:
        Ed25519PublicKey.from_public_bytes(base64.b64decode(ref.key, validate=True)).verify(
            base64.b64decode(ref.sig, validate=True), ref.payload())
    except (InvalidSignature, ValueError):
        raise RefError(f"ref for {ref.ays!r}: bad signature (key {ref.key})") from None


def decode_ref(data: bytes, ays_id: str) -> Ref:
    """Parse and check a ref fetched for `ays_id` (a ref naming another ays is refused)."""
    if len(data) > MAX_REF_BYTES:
        raise RefError(f"ref for {ays_id!r} is {len(data)} bytes, too large")
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise RefError(f"ref for {ays_id!r} is not valid JSON: {e}") from None
    if not isinstance(obj, dict) or obj.get("aysfs") != "ref" or obj.get("v") != 1:
        raise RefError(f"ref for {ays_id!r} is not an aysfs ref (v1)")
    unknown = set(obj) - {"aysfs", "v", "ays", "root", "revision", "time", "key", "sig", "profile"}
    if unknown:
        raise RefError(f"ref for {ays_id!r} has unknown fields {sorted(unknown)}")
    ays, root, rev, t = obj.get("ays"), obj.get("root"), obj.get("revision"), obj.get("time")
    key, sig, profile = obj.get("key", ""), obj.get("sig", ""), obj.get("profile", "")
    if ays != ays_id:
        raise RefError(f"ref for {ays_id!r} names another ays: {ays!r:.80}")
    if not isinstance(root, str) or not HASH_RE.match(root):
        raise RefError(f"ref for {ays_id!r} has a bad root hash {root!r:.80}")
    if type(rev) is not int or not 0 <= rev < 1 << 62:
        raise RefError(f"ref for {ays_id!r} has a bad revision {rev!r:.40}")
    if type(t) not in (int, float) or t != t:
        raise RefError(f"ref for {ays_id!r} has a bad time {t!r:.40}")
    if not isinstance(key, str) or not isinstance(sig, str) or len(key) > 100 or len(sig) > 200 or bool(key) != bool(sig):
        raise RefError(f"ref for {ays_id!r} has a malformed signature")
    if "profile" in obj and (not isinstance(profile, str) or not HASH_RE.match(profile)):
        raise RefError(f"ref for {ays_id!r} has a bad profile hash {profile!r:.80}")
    return Ref(ays_id, root, rev, float(t), key, sig, profile)  # type: ignore[arg-type]
