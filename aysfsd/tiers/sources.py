"""Grid caches and stors with their health, and the search through them with failover.

Every request is bounded by its source's `timeout` (the store enforces it: per
connect/read phase over HTTP and SSH, per operation for a directory); a transport error
is retried RETRIES times with backoff (a timeout is not: it already waited long); a
source that still fails is marked down for DOWN_SECONDS and skipped while others remain.
When no source that is up could serve a blob, the sources marked down get one probe each
(at most one in flight per source), so a stor that came back is used at once and a dead
one costs one refused connection.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import trio

from ..layout import blob_path
from ..stores import Store, StoreError, StoreTimeout
from .counters import Latency
from .verify import sha256_of

log = logging.getLogger("aysfsd.fetch")

DOWN_SECONDS = 15.0
RETRIES = 2
BACKOFF = 0.1  # seconds before the first retry; tripled for each further one


@dataclass(eq=False)
class Source:
    """A grid cache or stor with its health and counters."""

    store: Store
    tier: str  # "grid" or "stor"
    writable: bool = True
    down_until: float = 0.0
    failures: int = 0
    fetched_blobs: int = 0
    fetched_bytes: int = 0
    corrupt: int = 0
    requests: int = 0  # blob requests sent (retries and probes included)
    request_errors: int = 0  # of them, failed (transport error, timeout, HTTP error)
    not_found: int = 0  # of them, answered "not there"
    latency: Latency = field(default_factory=Latency)  # of the requests that got an answer
    probing: bool = False
    probe_done: trio.Event = field(default_factory=trio.Event)  # set when a probe ends

    @property
    def name(self) -> str:
        return self.store.url

    def is_down(self) -> bool:
        return time.monotonic() < self.down_until

    def mark_down(self, reason: str, blob: str = "") -> None:
        self.failures += 1
        self.down_until = time.monotonic() + DOWN_SECONDS
        log.warning("source %s marked down for %gs: %s", self.name, DOWN_SECONDS, reason,
                    extra={"BLOB": blob, "SOURCE": self.name})

    def mark_up(self) -> None:
        if self.down_until:
            self.down_until = 0.0
            log.info("source %s answers again", self.name, extra={"SOURCE": self.name})


async def search(sources: list[Source], h: str, problems: list[str],
                 corrupt: list[Source]) -> tuple[bytes, Source] | None:
    """Blob `h` verified from the first of `sources` that has it, or None (the reasons
    appended to `problems`, the sources that answered a corrupt copy to `corrupt`)."""
    rel = blob_path(h)
    skipped: list[Source] = []
    for src in sources:
        if src.is_down():
            problems.append(f"{src.name}: down")
            skipped.append(src)
            continue
        data = await fetch_from(src, rel, h, problems, corrupt, RETRIES)
        if data is not None:
            return data, src
    for src in skipped:  # last resort: one probe of each source marked down
        if src.probing:
            # another fetch is probing it: wait for that answer rather than skip the source
            await src.probe_done.wait()
            if src.is_down():
                continue
            data = await fetch_from(src, rel, h, problems, corrupt, 0)
        else:
            src.probing = True
            src.probe_done = trio.Event()
            try:
                data = await fetch_from(src, rel, h, problems, corrupt, 0)
            finally:
                src.probing = False
                src.probe_done.set()
        if data is not None:
            return data, src
    return None


async def fetch_from(src: Source, rel: str, h: str, problems: list[str], corrupt: list[Source],
                     retries: int) -> bytes | None:
    """The verified blob from one source, or None (reason appended to `problems`)."""
    attempt = 0
    while True:
        src.requests += 1
        t0 = time.monotonic()
        try:
            data = await src.store.fetch(rel)
            src.latency.observe(time.monotonic() - t0)
            break
        except StoreError as e:
            src.request_errors += 1
            if attempt < retries and not isinstance(e, StoreTimeout):
                await trio.sleep(BACKOFF * 3 ** attempt)
                attempt += 1
                continue
            src.mark_down(str(e), h)
            problems.append(f"{src.name}: {e}")
            return None
    src.mark_up()
    if data is None:
        src.not_found += 1
        problems.append(f"{src.name}: not found")
        return None
    if await sha256_of(data) != h:
        src.corrupt += 1
        corrupt.append(src)
        log.error("corrupt blob %s from %s (%s, %d bytes, hash mismatch): skipped", h, src.name,
                  "grid cache" if src.tier == "grid" else "stor", len(data),
                  extra={"BLOB": h, "SOURCE": src.name})
        problems.append(f"{src.name}: corrupt (hash mismatch)")
        return None
    return data
