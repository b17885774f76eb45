"""What every store shares: the Store interface, its errors and the path check."""

from __future__ import annotations

from typing import Protocol


class StoreError(Exception):
    """A store could not be reached or answered with an error (not "not found")."""


class StoreTimeout(StoreError):
    """A store did not answer within its per-request timeout (not worth retrying at once)."""


class Store(Protocol):
    url: str
    timeout: float  # seconds one request may take (the fetcher bounds each request by it)

    def read(self, rel: str) -> bytes | None: ...
    def write(self, rel: str, data: bytes) -> None: ...
    def exists(self, rel: str) -> bool: ...
    def close(self) -> None: ...
    async def fetch(self, rel: str) -> bytes | None: ...
    async def store(self, rel: str, data: bytes) -> None: ...
    async def contains(self, rel: str) -> bool: ...
    async def aclose(self) -> None: ...


def check_rel(rel: str) -> str:
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\x00" in rel:
        raise ValueError(f"unsafe store path {rel!r}")
    return rel
