"""Stors and grid caches: one small interface over a directory, HTTP(S) and SSH.

Every store speaks relative paths from `aysfsd.stores.layout`. Sync methods serve `aysctl`
(publish, tools); async methods serve the daemon on trio. `None` means "not there"
(404, ENOENT); a transport failure raises StoreError so the caller can try the next tier.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from .base import LowSpeed, Store, StoreError, StoreSlow, StoreTimeout, check_rel, describe
from .dir import DirStore
from .http import HttpStore

__all__ = ["DirStore", "HttpStore", "LowSpeed", "Store", "StoreError", "StoreSlow", "StoreTimeout", "check_rel",
           "describe", "open_store"]


def open_store(url: str, *, timeout: float = 10.0, proxy: str | None = None,
               ssh_key: str | None = None, ssh_known_hosts: str | None = None,
               ssh_accept_unknown_host: bool = False) -> Store:
    """A store for a URL: http(s)://, ssh://, file:// or a plain directory path."""
    parts = urlsplit(url)
    if parts.scheme in ("http", "https"):
        return HttpStore(url, timeout=timeout, proxy=proxy)
    if parts.scheme == "file":
        return DirStore(parts.path, url, timeout=timeout)
    if parts.scheme == "ssh":
        from .ssh import SshStore  # paramiko is loaded only for ssh:// stores

        return SshStore(url, timeout=timeout, key=ssh_key, known_hosts=ssh_known_hosts,
                        accept_unknown_host=ssh_accept_unknown_host)
    if parts.scheme == "":
        return DirStore(url, timeout=timeout)
    raise ValueError(f"unsupported store URL {url!r}: use http(s)://, ssh://, file:// or a directory path")
