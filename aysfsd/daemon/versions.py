"""Which version each mount serves: its ref from the first stor with a valid one, or, when no
stor answers, a signed one from the grid caches or the last good one kept in the local cache;
with the signature and rollback checks. The daemon asks (start, reload, expiry); this module
owns what it decided: the last good refs, the refs shared to the grid, the warnings given."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import trio

from ..config import Config
from ..fuse.nodes import MountPoint
from ..stores import StoreError, describe
from ..stores.layout import ref_path
from ..tiers import Fetcher, Source
from ..tiers.local import LocalCache
from ..tree.ref import Ref, RefError, decode_ref, verify
from . import gridrefs

log = logging.getLogger("aysfsd.daemon.versions")


class Versions:
    def __init__(self, config: Callable[[], Config], fetcher: Fetcher, cache: LocalCache) -> None:
        self._config = config  # the running config (a reload replaces it)
        self.fetcher = fetcher
        self.cache = cache
        self.nursery: trio.Nursery | None = None  # for sharing refs to the grid, once running
        self._warned_unsigned: set[str] = set()
        self._shared: dict[str, str] = {}  # ays id -> root of the ref last written to the grid caches

    def trusted(self, mp: MountPoint) -> list[str]:
        keys = mp.cfg.trusted_keys if mp.cfg.trusted_keys is not None else self._config().main.trusted_keys
        return list(keys)

    async def resolve(self, mp: MountPoint) -> Ref:
        """The current ref of a mount's ays from the first stor that has a valid one; when no
        stor answers, the newest validly signed one in the grid caches (only with trusted keys)
        or else the last good one kept in the local cache. Bounded by `fetch_timeout` in all
        (the grid caches get at least a second more): a slow or silent stor does not hold a
        start or a reload longer; a stor that fails the request is marked down."""
        ays_id = mp.cfg.id
        problems: list[str] = []
        reached = False  # some stor answered (with a ref or without one)
        bound = max(1.0, self._config().main.fetch_timeout)
        deadline = trio.current_time() + bound
        asking: Source | None = None
        ref: Ref | None = None
        with trio.move_on_at(deadline):
            for src in sorted(self.fetcher.stors, key=lambda s: s.is_down()):  # down ones last
                try:
                    asking = src
                    raw = await src.store.fetch(ref_path(ays_id))
                    asking = None
                    reached = True
                    if raw is None:
                        problems.append(f"{src.name}: no ref")
                        continue
                    got = decode_ref(raw, ays_id)
                    self._check_trust(mp, got)
                except RefError as e:
                    log.error("mount %s: refused the ref from %s: %s", mp.name, src.name, e,
                              extra={"AYSFS_MOUNT": mp.name, "AYS_ID": ays_id, "SOURCE": src.name})
                    problems.append(f"{src.name}: {e}")
                    continue
                except StoreError as e:
                    asking = None
                    src.mark_down(f"ref of {ays_id}: {describe(e)}")
                    text = describe(e)
                    problems.append(text if text.startswith(src.name) else f"{src.name}: {text}")
                    continue
                ref = got
                break
        if ref is not None:
            await self._accept(mp, ref)
            return ref
        if asking is not None:
            reason = f"no complete answer for the ref within fetch_timeout {bound:g}s"
            asking.mark_down(reason)
            problems.append(f"{asking.name}: {reason}")
        last = self.last_good(ays_id)
        trusted = self.trusted(mp)
        if last is not None and trusted:
            try:
                verify(last, trusted)
            except RefError as e:
                problems.append(f"last good version: {e}")
                last = None
        if not reached and self.fetcher.grid:
            if trusted:
                gref, why = await gridrefs.newest(ays_id, self.fetcher.grid, trusted, last,
                                                  max(1.0, deadline - trio.current_time()))
                problems += why
                if gref is not None and (last is None or gref.revision > last.revision):
                    log.warning("mount %s: no stor answered for %s (%s); using revision %d (%s) from a grid "
                                "cache, signed by a trusted key", mp.name, ays_id, "; ".join(problems),
                                gref.revision, gref.root[:12], extra={"AYSFS_MOUNT": mp.name, "AYS_ID": ays_id})
                    await self._accept(mp, gref, share=False)
                    return gref
            elif last is None:
                problems.append(gridrefs.UNTRUSTED)
        if last is not None:
            if self.fetcher.stors:
                log.warning("mount %s: no stor answered for %s (%s); using the last good version %s",
                            mp.name, ays_id, "; ".join(problems), last.root[:12],
                            extra={"AYSFS_MOUNT": mp.name, "AYS_ID": ays_id})
            return last
        raise LookupError("; ".join(problems) or "no stors configured")

    async def _accept(self, mp: MountPoint, ref: Ref, share: bool = True) -> None:
        """Keep an accepted ref as the last good one; a signed one (with trusted keys) also goes
        to the writable grid caches, once per version and run, in the background."""
        last = self.last_good(ref.ays)
        if last is None or last.encode() != ref.encode():
            await trio.to_thread.run_sync(self.cache.put_meta, f"ref:{ref.ays}", ref.encode())
        if (share and ref.signed and self.trusted(mp) and mp.cfg.cache_grid and self.nursery is not None
                and self._shared.get(ref.ays) != ref.root and any(s.writable for s in self.fetcher.grid)):
            self._shared[ref.ays] = ref.root
            self.nursery.start_soon(gridrefs.share, ref, list(self.fetcher.grid), max(1.0, self._config().main.fetch_timeout))

    def _check_trust(self, mp: MountPoint, ref: Ref) -> None:
        """Signature (when keys are configured) and rollback checks; RefError when refused."""
        trusted = self.trusted(mp)
        if trusted:
            verify(ref, trusted)
        elif mp.name not in self._warned_unsigned:
            self._warned_unsigned.add(mp.name)
            log.warning("mount %s: no trusted_keys configured: %s is authenticated only by its hashes, "
                        "not by a signature", mp.name, mp.cfg.id, extra={"AYSFS_MOUNT": mp.name, "AYS_ID": mp.cfg.id})
        last = self.last_good(mp.cfg.id)
        if last is not None and (ref.revision < last.revision or
                                 (ref.revision == last.revision and ref.root != last.root)):
            raise RefError(f"rollback refused: revision {ref.revision} (root {ref.root[:12]}) is not newer than "
                           f"the accepted revision {last.revision} (root {last.root[:12]})")

    def last_good(self, ays_id: str) -> Ref | None:
        raw = self.cache.get_meta(f"ref:{ays_id}")
        try:
            return decode_ref(raw, ays_id) if raw else None
        except RefError:
            return None

    def expiration(self) -> float:
        """Seconds a resolved ref is trusted: the smallest non-zero `cache.expiration` (0: forever,
        checked again only on reload)."""
        vals = [s.expiration for s in self._config().stors if s.expiration > 0]
        return float(min(vals)) if vals else math.inf
