"""Ed25519 keys for signing refs: `aysctl keygen` writes them, publish and the daemon read them."""

from __future__ import annotations

import base64
import os

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from .ref import public_key_text


def keygen(path: str) -> str:
    """Write a new private key to `path` (PEM, mode 0600) and its public key to `path`.pub;
    returns the public key text (what goes into `trusted_keys`)."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = public_key_text(key.public_key())
    with open(path + ".pub", "w") as f:
        f.write(pub + "\n")
    return pub


def load_private(path: str) -> Ed25519PrivateKey:
    with open(path, "rb") as f:
        key = load_pem_private_key(f.read(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def check_public(text: str) -> str:
    """Validate a trusted key (base64 of the 32 raw bytes); returns it stripped."""
    t = text.strip()
    Ed25519PublicKey.from_public_bytes(base64.b64decode(t, validate=True))
    return t
