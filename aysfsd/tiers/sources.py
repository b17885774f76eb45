"""Grid caches and stors with their health, and the search through them with failover.

Every request is bounded by its source's `timeout` (the store enforces it: per
connect/read phase over HTTP and SSH, per operation for a directory); a transport error
is retried RETRIES times with backoff (a timeout is not: it already waited long); a
source that still fails is marked down for DOWN_SECONDS and skipped while others remain.
When no source that is up could serve a blob, the sources marked down get one probe each
(at most one in flight per source), so a stor that came back is used at once and a dead
one costs one refused connection.

Slow is a failure too: a transfer below the low-speed limit (the stores enforce it) marks
its source down, and so does a source still transferring when the whole fetch runs out of
`fetch_timeout` (the fetcher calls `gave_up`); a source that answers CORRUPT_DOWN corrupt
blobs in a row (e.g. a portal's HTML page for every path) is marked down as well.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import trio

from ..stores import Store, StoreError, StoreTimeout
from ..stores.layout import blob_path
from .counters import Latency
from .verify import sha256_of

log = logging.getLogger("aysfsd.fetch")

DOWN_SECONDS = 15.0
RETRIES = 2
BACKOFF = 0.1  # seconds before the first retry; tripled for each further one
CORRUPT_DOWN = 3  # corrupt answers in a row that mark a source down


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
    corrupt_run: int = 0  # corrupt answers since the last good one
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


class Search:
    """The state of one blob's search: why each source failed, which answered corrupt copies
    and which one is being asked right now."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.corrupt: list[Source] = []
        self.asking: Source | None = None

    def gave_up(self, h: str, timeout: float) -> None:
        """The whole fetch ran out of time: the source still transferring failed it."""
        src = self.asking
        if src is not None:
            reason = f"no complete answer within fetch_timeout {timeout:g}s"
            src.mark_down(reason, h)
            self.problems.append(f"{src.name}: {reason}")


async def search(sources: list[Source], h: str, st: Search) -> tuple[bytes, Source] | None:
    """Blob `h` verified from the first of `sources` that has it, or None (the reasons
    in `st.problems`, the sources that answered a corrupt copy in `st.corrupt`)."""
    rel = blob_path(h)
    problems = st.problems
    skipped: list[Source] = []
    for src in sources:
        if src.is_down():
            problems.append(f"{src.name}: down")
            skipped.append(src)
            continue
        data = await fetch_from(src, rel, h, st, RETRIES)
        if data is not None:
            return data, src
    for src in skipped:  # last resort: one probe of each source marked down
        if src.probing:
            # another fetch is probing it: wait for that answer rather than skip the source
            await src.probe_done.wait()
            if src.is_down():
                continue
            data = await fetch_from(src, rel, h, st, 0)
        else:
            src.probing = True
            src.probe_done = trio.Event()
            try:
                data = await fetch_from(src, rel, h, st, 0)
            finally:
                src.probing = False
                src.probe_done.set()
        if data is not None:
            return data, src
    return None


async def fetch_from(src: Source, rel: str, h: str, st: Search, retries: int) -> bytes | None:
    """The verified blob from one source, or None (reason appended to `st.problems`)."""
    problems = st.problems
    attempt = 0
    while True:
        src.requests += 1
        t0 = time.monotonic()
        st.asking = src  # left set when the fetch is cancelled: see Search.gave_up
        try:
            data = await src.store.fetch(rel)
            src.latency.observe(time.monotonic() - t0)
            st.asking = None
            break
        except StoreError as e:
            src.request_errors += 1
            st.asking = None
            if attempt < retries and not isinstance(e, StoreTimeout):
                await trio.sleep(BACKOFF * 3 ** attempt)
                attempt += 1
                continue
            src.mark_down(str(e), h)
            problems.append(f"{src.name}: {e}")
            return None
    if data is None:
        src.not_found += 1
        src.mark_up()
        problems.append(f"{src.name}: not found")
        return None
    if await sha256_of(data) != h:
        src.corrupt += 1
        src.corrupt_run += 1
        st.corrupt.append(src)
        log.error("corrupt blob %s from %s (%s, %d bytes, hash mismatch): skipped", h, src.name,
                  "grid cache" if src.tier == "grid" else "stor", len(data),
                  extra={"BLOB": h, "SOURCE": src.name})
        problems.append(f"{src.name}: corrupt (hash mismatch)")
        if src.corrupt_run >= CORRUPT_DOWN or src.is_down():  # (a probe of a down source: still bad)
            src.mark_down(f"{src.corrupt_run} corrupt blobs in a row (the last {len(data)} bytes, "
                          f"beginning {data[:24]!r})", h)
        return None
    src.corrupt_run = 0
    src.mark_up()
    return data
