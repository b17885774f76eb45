"""The files by ays id a mount's cold start asks for beside its ref: the profile ref
(`<id>.profile`, see aysfsd.tree.ref) and the start file (`<id>.start`, see aysfsd.tree.start).

Their names come from the ays id alone, so they leave with the ref instead of a round trip
after it: the tree packs and a profile's first items then go out as soon as the ref is here.
Each is fetched from the first stor that has it, bounded by fetch_timeout; none is required.
"""

from __future__ import annotations

import logging

import trio

from ..stores import StoreError
from ..stores.layout import profile_ref_path, start_path
from ..tiers import Fetcher
from ..tree.start import StartFile, StartFileError, decode_start

log = logging.getLogger("aysfsd.fuse.startfiles")


class StorFile:
    """A file of the stors that is not a blob (named, not checked by its hash), from the first
    stor that has one."""

    def __init__(self, fetcher: Fetcher, rel: str, timeout: float) -> None:
        self.fetcher = fetcher
        self.rel = rel
        self.timeout = timeout
        self.found: tuple[str, bytes] | None = None  # (stor, bytes), once done
        self.done = trio.Event()

    async def run(self) -> None:
        try:
            for src in sorted(self.fetcher.stors, key=lambda s: s.is_down()):
                try:
                    with trio.fail_after(max(1.0, self.timeout)):
                        raw = await src.store.fetch(self.rel)
                except (StoreError, trio.TooSlowError):
                    continue
                if raw is not None:
                    self.found = (src.name, raw)
                    return
        finally:
            self.done.set()

    async def get(self) -> tuple[str, bytes] | None:
        await self.done.wait()
        return self.found


class StartAsk:
    """A cold start's profile ref and start file, asked for in the background from now."""

    def __init__(self, fetcher: Fetcher, ays_id: str, timeout: float, nursery: trio.Nursery) -> None:
        self.profile_ref = StorFile(fetcher, profile_ref_path(ays_id), timeout)
        self.start = StorFile(fetcher, start_path(ays_id), timeout)
        self._decoded: dict[str, StartFile | None] = {}  # by root
        nursery.start_soon(self.profile_ref.run)
        nursery.start_soon(self.start.run)

    async def start_file(self, root: str) -> StartFile | None:
        """The start file if it is one of version `root` (else None; a bad one is logged once)."""
        if root not in self._decoded:
            found = await self.start.get()
            if root in self._decoded:
                return self._decoded[root]
            sf: StartFile | None = None
            if found is not None:
                try:
                    sf = decode_start(found[1], root)
                except StartFileError as e:
                    log.log(logging.DEBUG if "of another version" in str(e) else logging.WARNING,
                            "%s (from %s): ignored", e, found[0], extra={"SOURCE": found[0]})
            self._decoded[root] = sf
        return self._decoded[root]
