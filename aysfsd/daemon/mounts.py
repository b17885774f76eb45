"""Each mount's lifecycle: its ref checked (at start, at expiry, at a reload), the mount brought
up, adopted after a hand-over, retried while it fails, stopped, purged; its cold start's startup
profile, its prefetch, the recheck of what made it degraded.

Apart from the daemon (aysfsd.daemon.core), which runs the process (signals, reload, the control
socket, systemd, shutdown): this module owns the per-mount state — when each ref was last
checked, the retry loops of failed mounts, each cold start's profile work, the session's
read-only and read-ahead settings the mounts change — and the daemon and the control socket ask it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable

import trio

from ..config import AysConfig, Config
from ..debug.overlay import DebugOverlay
from ..fuse import profiles, sysmount
from ..fuse.ops import MountPoint, Operations
from ..fuse.startfiles import StartAsk
from ..fuse.startwatch import StartWatch
from ..tiers import Fetcher
from ..tiers.local import LocalCache
from ..tree.ref import Ref
from .session import FuseSession
from .versions import Versions

log = logging.getLogger("aysfsd")

RETRY_SECONDS = 5.0
READ_AHEAD_KB = 4096  # one chunk: sequential reads come in large requests
REF_CONNECTIONS = 4  # connections to each http grid cache and stor opened beside a mount's ref fetch


class Mounts:
    """The session's mounts, each from its start to its stop (the MountPoints are ops.inodes.mounts)."""

    def __init__(self, config: Callable[[], Config], ops: Operations, fetcher: Fetcher, cache: LocalCache,
                 versions: Versions, session: FuseSession) -> None:
        self._config = config  # the running config (a reload replaces it)
        self.ops = ops
        self.fetcher = fetcher
        self.cache = cache
        self.versions = versions
        self.session = session
        self.fuse_root = session.fuse_root
        self.nursery: trio.Nursery | None = None  # for retries, profiles and prefetch, once running
        self._checked: dict[str, float] = {}  # mount name -> monotonic time of the last ref check
        self._retry: dict[str, trio.CancelScope] = {}
        self._read_ahead_set = False
        self._profile_scopes: dict[str, trio.CancelScope] = {}  # mount name -> its cold start's work
        # the session's superblock is read-only until a debug mount needs writes: the kernel then
        # keeps file attributes across reads (on a writable one every READ marks atime stale,
        # and the next stat costs a GETATTR request per file)
        self.session_ro = not any(a.debug for a in config().ays)

    async def refresh(self, mp: MountPoint) -> None:
        try:
            ref = await self.versions.resolve(mp)
        except LookupError as e:
            log.warning("mount %s: cannot check for a new version: %s", mp.name, e,
                        extra={"AYSFS_MOUNT": mp.name, "AYS_ID": mp.cfg.id})
            return
        finally:
            self._checked[mp.name] = time.monotonic()
        if mp.ref is None or ref.root != mp.ref.root:
            log.info("mount %s: version %s (revision %d)", mp.name, ref.root[:12], ref.revision,
                     extra={"AYSFS_MOUNT": mp.name, "AYS_ID": mp.cfg.id})
            cold = not self.cache.has(ref.root)
            self.ops.set_ref(mp, ref)
            if cold:
                self.start_profile(mp, ref, self.arm_profile(mp, ref))

    async def start_all(self, ays: Iterable[AysConfig]) -> None:
        """Start (or adopt, after a hand-over) the configured mounts, concurrently: READY does not
        wait on each in turn."""
        adopted = self.session.adopted
        async with trio.open_nursery() as starting:
            for a in ays:
                if adopted is not None and a.name in adopted.mounts:
                    starting.start_soon(self.adopt, a)
                else:
                    starting.start_soon(self.start, a)

    async def start(self, cfg: AysConfig) -> MountPoint:
        """Add a mount; when its ref cannot be had yet, report it and retry in the background."""
        mp = self.ops.add_mount(cfg)
        try:
            await self._bring_up(mp)
        except Exception as e:
            mp.state, mp.error = "error", str(e)
            log.error("mount %s (%s) at %s failed: %s; retrying every %ss", mp.name, cfg.id, cfg.mnt, e,
                      RETRY_SECONDS, extra={"AYSFS_MOUNT": mp.name, "AYS_ID": cfg.id})
            assert self.nursery is not None
            self.nursery.start_soon(self._retry_loop, mp)
        return mp

    async def _bring_up(self, mp: MountPoint) -> None:
        # the requests that follow the ref (its profile, the tree's index and root) go out at once
        self.fetcher.warm(REF_CONNECTIONS)
        asked = self._ask_start(mp)
        try:
            ref = await self.versions.resolve(mp)
        except LookupError as e:
            raise RuntimeError(f"no version of {mp.cfg.id!r} found: {e}") from None
        self._checked[mp.name] = time.monotonic()
        cold = not self.cache.has(ref.root)  # the version's first start on this node
        self.ops.set_ref(mp, ref)
        watch = self.arm_profile(mp, ref) if cold else None  # before the mount can be read
        if watch is not None:
            # the profile (and the tree, see profiles.cold_start) are looked for while the mount
            # is bound: a reader right after the mount finds them on their way
            self.start_profile(mp, ref, watch, asked)
        if mp.cfg.debug and self.session_ro:
            await sysmount.remount_rw(self.fuse_root)
            self.session_ro = False
        if mp.cfg.debug and mp.overlay is None:
            mp.overlay = DebugOverlay(mp.name, self._config().debug)
            await mp.overlay.load()
        # up before the bind returns: a reader that sees the mountpoint must not find the mount
        # "starting" in status or metrics (the bind's thread returns after the kernel shows it)
        mp.state, mp.error = "up", ""
        if not (self.session.adopted and mp.name in self.session.adopted.mounts and sysmount.is_mounted(mp.cfg.mnt)):
            if sysmount.is_mounted(mp.cfg.mnt):
                pid = sysmount.owner(mp.cfg.mnt)
                if pid is not None:
                    raise RuntimeError(f"{mp.cfg.mnt} is mounted by the running aysfsd pid {pid}")
                sysmount.cleanup_stale([mp.cfg.mnt])
            await sysmount.bind(os.path.join(self.fuse_root, mp.name), mp.cfg.mnt, read_only=not mp.cfg.debug)
        if not self._read_ahead_set:
            # after FUSE INIT (a bind mount needed it), which caps read-ahead at the 128 KiB default
            self._read_ahead_set = sysmount.set_read_ahead(self.fuse_root, READ_AHEAD_KB)
        self.start_prefetch(mp)
        log.info("mount %s: %s at %s, version %s", mp.name, mp.cfg.id, mp.cfg.mnt, ref.root[:12],
                 extra={"AYSFS_MOUNT": mp.name, "AYS_ID": mp.cfg.id})

    async def adopt(self, cfg: AysConfig) -> None:
        """A mount handed over by the previous process: it served on during the restart from the
        version it had; its ref is checked again, its bind mount stays."""
        assert self.session.adopted is not None
        mp = self.ops.inodes.mounts[cfg.name]
        old = self.session.adopted.old_mnt.get(cfg.name, "")
        if old and os.path.normpath(old) != os.path.normpath(cfg.mnt) and sysmount.is_mounted(old):
            await sysmount.unbind(old)  # the config moved it while we restarted
        try:
            await self._bring_up(mp)
        except Exception as e:
            if mp.ref is not None and sysmount.is_mounted(cfg.mnt):
                log.warning("mount %s: serving the version it had (%s): %s", mp.name, mp.ref.root[:12], e,
                            extra={"AYSFS_MOUNT": mp.name, "AYS_ID": cfg.id})
                mp.state, mp.error = "up", ""
                return
            mp.state, mp.error = "error", str(e)
            assert self.nursery is not None
            self.nursery.start_soon(self._retry_loop, mp)

    async def _retry_loop(self, mp: MountPoint) -> None:
        with trio.CancelScope() as scope:
            self._retry[mp.name] = scope
            while mp.state == "error" and self.ops.inodes.mounts.get(mp.name) is mp:
                await trio.sleep(RETRY_SECONDS)
                try:
                    await self._bring_up(mp)
                except Exception as e:
                    mp.state, mp.error = "error", str(e)
        self._retry.pop(mp.name, None)

    async def stop(self, name: str, shutdown: bool = False) -> None:
        mp = self.ops.inodes.mounts.get(name)
        if mp is None:
            return
        scope = self._retry.pop(name, None)
        if scope is not None:
            scope.cancel()
        was_up = mp.state == "up"
        mp.state = "stopping"
        if was_up:
            try:
                await sysmount.unbind(mp.cfg.mnt)
            except sysmount.MountError as e:
                log.error("mount %s: unmounting %s failed: %s", name, mp.cfg.mnt, e)
        self.ops.remove_mount(name, notify_kernel=not shutdown)
        scope = self._profile_scopes.pop(name, None)
        if scope is not None:
            scope.cancel()
        if mp.watch is not None:
            mp.watch.stop("replaced")
        if mp.overlay is not None:
            mp.overlay.close()
        self._checked.pop(name, None)
        log.info("mount %s: removed from %s", name, mp.cfg.mnt, extra={"AYSFS_MOUNT": name})

    async def stop_all(self) -> None:
        """At a stop (not a hand-over): every mount, one after the other."""
        for name in list(self.ops.inodes.mounts):
            await self.stop(name, shutdown=True)

    async def apply(self, new: Config, old: Config) -> None:
        """Make the running mounts match `new` (already the running config; `old` the one before),
        leaving unchanged mounts alone."""
        old_by_name = {a.name: a for a in old.ays} if new is not old else {}
        wanted = {a.name: a for a in new.ays}
        debug_changed = new.debug != old.debug
        for name in list(self.ops.inodes.mounts):
            a = wanted.get(name)
            mp = self.ops.inodes.mounts[name]
            if a is None or (a.id, a.mnt, a.debug) != (mp.cfg.id, mp.cfg.mnt, mp.cfg.debug) or (
                    a.debug and debug_changed):
                await self.stop(name)
            elif a != mp.cfg:
                mp.cfg = a  # cache, prefetch and import_hints flags only: no remount needed
        async with trio.open_nursery() as n:  # at once: a reload waits one ref check's bound, not one per mount
            for name, a in wanted.items():
                if name not in self.ops.inodes.mounts:
                    n.start_soon(self.start, a)
                elif name in old_by_name:
                    n.start_soon(self.refresh, self.ops.inodes.mounts[name])

    async def purge(self, mp: MountPoint) -> tuple[int, int]:
        """Drop the file blobs of a mount's current tree from the local cache (directory objects
        stay: they are small and keep the mount usable offline). Open files refetch."""
        if mp.ref is None:
            return 0, 0
        hashes: set[str] = set()
        stack = [mp.ref.root]
        while stack:
            entries, _ = await self.ops.catalog.load_dir(stack.pop(), grid=mp.cfg.cache_grid)
            for e in entries:
                if e.kind == "d":
                    stack.append(e.hash)
                else:
                    hashes.update(h for h, _ in e.blobs())
        present = [h for h in hashes if self.cache.has(h)]
        freed = await trio.to_thread.run_sync(self.cache.delete, present)
        self.fetcher.memory.clear()
        return freed, len(present)

    def arm_profile(self, mp: MountPoint, ref: Ref) -> StartWatch | None:
        """On a cold start of a version: watch it from its first need (see start_profile)."""
        if mp.cfg.debug:
            return None
        return profiles.arm(self.fetcher, mp, ref, self._config().main.profile_idle)

    def _ask_start(self, mp: MountPoint) -> StartAsk | None:
        """At a mount's start, unless it last served a version still in the local cache (then it
        most likely starts warm), its profile ref and start file are asked for beside its ref."""
        if mp.cfg.debug or self.nursery is None:
            return None
        last = self.versions.last_good(mp.cfg.id)
        if last is not None and self.cache.has(last.root):
            return None
        return StartAsk(self.fetcher, mp.cfg.id, self._config().main.fetch_timeout, self.nursery)

    def start_profile(self, mp: MountPoint, ref: Ref, watch: StartWatch | None,
                      asked: StartAsk | None = None) -> None:
        """Use a startup profile for the version, or record one for the grid (`asked`: its
        profile ref and start file, asked for with the ref)."""
        if watch is None or self.nursery is None:
            return
        old = self._profile_scopes.pop(mp.name, None)
        if old is not None:
            old.cancel()
        scope = self._profile_scopes[mp.name] = trio.CancelScope()
        trusted = self.versions.trusted(mp)

        async def job() -> None:
            with scope:
                try:
                    await profiles.cold_start(self.ops.catalog, mp, ref, watch, trusted=trusted,
                                              timeout=self._config().main.fetch_timeout, asked=asked)
                except Exception:
                    log.exception("mount %s: startup profile failed", mp.name,
                                  extra={"AYSFS_MOUNT": mp.name, "AYS_ID": mp.cfg.id})
            if self._profile_scopes.get(mp.name) is scope:
                del self._profile_scopes[mp.name]

        self.nursery.start_soon(job)

    async def record_profile(self, mp: MountPoint, idle: float, timeout: float) -> StartWatch:
        """Record the mount's next start (from its next need until `idle` seconds without one)."""
        if mp.ref is None:
            raise LookupError(f"mount {mp.name} has no version yet")
        w = StartWatch(mp.ref.root, idle=idle, timeout=timeout, first_wait=timeout, record=True)
        if mp.watch is not None:
            mp.watch.stop("replaced")
        mp.watch = w
        try:
            await w.run()
        finally:
            w.stop("stopped")
            if mp.watch is w:
                mp.watch = None
        return w

    def start_prefetch(self, mp: MountPoint) -> None:
        """Fill the tiers chosen by the mount's prefetch flags, in the background."""
        if not (mp.cfg.prefetch_local or mp.cfg.prefetch_grid) or self.nursery is None:
            return
        from ..fuse import prefetch

        self.nursery.start_soon(lambda: prefetch.run(self.ops.catalog, mp, local=mp.cfg.prefetch_local,
                                                     grid=mp.cfg.prefetch_grid))

    async def expiry_loop(self) -> None:
        """Check a mount's ref again when the refs' expiration has passed since its last check."""
        while True:
            await trio.sleep(1.0)
            exp = self.versions.expiration()
            if math.isinf(exp):
                continue
            now = time.monotonic()
            for mp in list(self.ops.inodes.mounts.values()):
                if mp.state == "up" and now - self._checked.get(mp.name, now) >= exp:
                    await self.refresh(mp)

    async def recheck_loop(self) -> None:
        """Every RETRY_SECONDS, read again what made a mount degraded (see Operations.recheck_unreadable)."""
        while True:
            await trio.sleep(RETRY_SECONDS)
            for mp in list(self.ops.inodes.mounts.values()):
                if mp.state == "up" and mp.retryable_dirs():
                    await self.ops.recheck_unreadable(mp)
