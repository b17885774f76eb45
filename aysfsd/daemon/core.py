"""The daemon: the process — one FUSE session, reload, signals, the control socket and systemd.

Several mounts, one process, one FUSE session: each ays is a top-level directory
of the session (mounted at `fuse_root`), bind-mounted onto its mountpoint. Chosen
over one worker process per mount because all mounts then share one LMDB
environment, one set of store connections, one single-flight table and one memory
budget. Measured here: this daemon serving 3 mounts (each tree read through) has an RSS
of 53 MB, while one interpreter with the same modules loaded is ~50-59 MB, so a worker
per mount would cost ~3x the memory for 3 mounts and grow by that much per mount. A
reload only adds or removes bind mounts: an untouched mount is never restarted, so its
open files keep reading. The price: one crash takes every mount down (systemd restarts
the daemon; the next start removes the stale mounts).

The daemon runs its FUSE session through `session` (new, resumed or handed over), its mounts
through `mounts` (which asks `versions` which version each serves) and reports through `status`.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pyfuse3
import trio

from .. import __version__
from ..config import Config, ConfigError, load
from ..debug.store import DebugStoreError
from ..fuse import guard as fuseguard
from ..fuse import handover, interrupts, sysmount
from ..fuse import lib as fuselib
from ..fuse.ops import MountPoint, Operations
from ..metrics import MetricsEndpoint
from ..stores import DirStore, LowSpeed, open_store
from ..tiers import Fetcher, Source
from ..tiers.local import LocalCache
from . import notify
from .control import ControlServer
from .installed import installed_version, upgrade_note
from .mounts import Mounts
from .session import FuseSession, fuse_patched
from .status import cache_status, mount_status, source_status, status_line
from .versions import Versions
from .watch import watch_config

log = logging.getLogger("aysfsd")

LOCAL_FLUSH_SECONDS = 10.0  # at a stop, the local cache's write queue is written for this long at most


@dataclass
class DaemonStatus:
    config_error: str = ""
    reloads: int = 0
    reload_failures: int = 0
    last_reload: float = 0.0


def _sources(cfg: Config) -> tuple[list[Source], list[Source]]:
    grid = [Source(open_store(c.mnt, timeout=c.timeout, proxy=c.proxy), "grid", writable=c.writable)
            for c in cfg.caches]
    stors = [Source(open_store(s.url, timeout=s.timeout, proxy=s.proxy, ssh_key=s.ssh_key,
                               ssh_known_hosts=s.ssh_known_hosts,
                               ssh_accept_unknown_host=s.ssh_accept_unknown_host), "stor")
             for s in cfg.stors]
    set_low_speed(cfg, grid, stors)
    return grid, stors


def set_low_speed(cfg: Config, grid: list[Source], stors: list[Source]) -> None:
    """Each HTTP or SSH source's low-speed limit: its own low_speed_limit/low_speed_time, else
    [main]'s (a directory's operations are bounded by its timeout alone)."""
    own: list[tuple[int | None, float | None]] = [(c.low_speed_limit, c.low_speed_time) for c in cfg.caches]
    own += [(s.low_speed_limit, s.low_speed_time) for s in cfg.stors]
    for (limit, seconds), src in zip(own, grid + stors, strict=True):
        if not isinstance(src.store, DirStore):
            src.store.low_speed = LowSpeed(cfg.main.low_speed_limit if limit is None else limit,
                                           cfg.main.low_speed_time if seconds is None else seconds)


class Daemon:
    def __init__(self, config_path: str, cfg: Config) -> None:
        self.config_path = config_path
        self.cfg = cfg
        self.status = DaemonStatus()
        self.cache = LocalCache(os.path.join(cfg.main.cache_dir, "lmdb"), cfg.main.cache_size,
                                min_free=cfg.main.cache_min_free.bytes_of)
        grid, stors = _sources(cfg)
        self.fetcher = Fetcher(self.cache, grid, stors, timeout=cfg.main.fetch_timeout)
        self.ops = Operations(self.fetcher, self.cache)
        self.versions = Versions(lambda: self.cfg, self.fetcher, self.cache)
        self.fuse_root = cfg.main.fuse_root
        self._stop = trio.Event()
        self._reload_lock = trio.Lock()
        self.started = time.time()
        self.session = FuseSession(self.ops, self.fuse_root)
        self.mounts = Mounts(lambda: self.cfg, self.ops, self.fetcher, self.cache, self.versions, self.session)
        # Kernel no_open/no_opendir mode (no OPEN, RELEASE, OPENDIR, READDIR once cached; see
        # aysfsd.fuse.ops) needs the patched pyfuse3 and is chosen per session, at its start: the kernel
        # cannot leave it. A session started with a debug mount keeps OPEN and RELEASE (its writes
        # are held per open file and recorded at close, errors reported by close()); a debug
        # mount added later by a reload records every write at once (aysfsd.fuse.debug_writes).
        self.ops.inodes.no_open = fuse_patched() and self.mounts.session_ro
        self.debug_log = self._debug_log
        # restart without unmounting (aysfsd.fuse.handover): "" stop for good, "exit" leave the FUSE
        # connection in systemd's fd store, "exec" re-execute this program with it
        self.handover_mode = ""
        self.exec_fds: dict[str, int] = {}  # after run(): what to pass to the re-executed program
        self.metrics = MetricsEndpoint(self.status_dict)

    # -- config -------------------------------------------------------------------------------

    async def apply(self, new: Config) -> None:
        """Run `new`: its sources and settings; the mounts made to match it (Mounts.apply)."""
        if (new.stors, new.caches) != (self.cfg.stors, self.cfg.caches):
            grid, stors = _sources(new)
            old = self.fetcher.grid + self.fetcher.stors
            self.fetcher.grid, self.fetcher.stors = grid, stors
            for s in old:
                await s.store.aclose()
                await trio.to_thread.run_sync(s.store.close)
        else:
            set_low_speed(new, self.fetcher.grid, self.fetcher.stors)  # [main]'s may have changed
        self.fetcher.timeout = new.main.fetch_timeout
        await self.metrics.configure(new.main.metrics_listen)
        self.cache.room.min_free = new.main.cache_min_free.bytes_of
        fuselib.set_spin(new.main.fuse_spin_us)
        old_cfg, self.cfg = self.cfg, new
        await self.mounts.apply(new, old_cfg)

    async def reload(self) -> tuple[bool, str]:
        """Re-read the config file; an invalid one keeps the running config."""
        async with self._reload_lock:
            notify.reloading()
            try:
                try:
                    new = await trio.to_thread.run_sync(load, self.config_path)
                except ConfigError as e:
                    self.status.config_error = str(e)
                    self.status.reload_failures += 1
                    log.error("reload refused, keeping the running config:\n%s", e)
                    return False, str(e)
                self.status.config_error = ""
                await self.apply(new)
                self.status.reloads += 1
                self.status.last_reload = time.time()
                log.info("reloaded %s", self.config_path)
                return True, ""
            finally:
                notify.notify("READY=1", f"STATUS={self.status_line()}")

    async def status_report(self) -> dict[str, object]:
        """status_dict() plus the version installed on disk (read off the loop)."""
        installed = await trio.to_thread.run_sync(installed_version)
        st = self.status_dict()
        daemon = st["daemon"]
        assert isinstance(daemon, dict)
        daemon["installed_version"] = installed
        daemon["upgrade"] = upgrade_note(installed)
        return st

    def status_dict(self) -> dict[str, object]:
        """The snapshot `aysctl status` and the metrics show (see aysfsd.daemon.status)."""
        return {
            "daemon": {"pid": os.getpid(), "version": __version__, "uptime": round(time.time() - self.started, 3),
                       "started": self.started, "resumed_session": self.session.adopted is not None,
                       "config": self.config_path, "config_error": self.status.config_error,
                       "reloads": self.status.reloads, "reload_failures": self.status.reload_failures,
                       "internal_errors": fuseguard.unexpected_errors, "metrics": self.metrics.public(),
                       "pyfuse3": fuselib.describe(), "no_open": self.ops.inodes.no_open, "fuse_mode": self.session.mode(),
                       "status": self.status_line()},
            "cache": cache_status(self.cache, self.fetcher.counters, self.fetcher.keeper.local_queue(),
                                  self.fetcher.waiting()),
            "sources": [source_status(s) for s in self.fetcher.grid + self.fetcher.stors],
            "mounts": [mount_status(mp) for mp in sorted(self.ops.inodes.mounts.values(), key=lambda m: m.name)],
        }

    async def _debug_log(self, mount: str | None, lines: int, follow: bool) -> AsyncIterator[dict[str, object]]:
        """Debug transaction log entries (`debug:log:$mountname`) of one or every debug mount:
        the last `lines` of each, then (following) new ones as they are appended."""
        mounts = [m for m in self.ops.inodes.mounts.values() if m.overlay is not None and (not mount or m.name == mount)]
        if mount and not mounts:
            raise LookupError(f"no mount named {mount!r} in debug mode")

        async def entries(mp: MountPoint, start: int | None) -> tuple[int, list[tuple[int, str, str]]]:
            assert mp.overlay is not None
            store = mp.overlay.store
            n = await trio.to_thread.run_sync(store.log_length)
            first = max(0, n - lines) if start is None else start
            new = await trio.to_thread.run_sync(store.log_entries, first, n - 1) if n > first else []
            return n, new

        pos: dict[str, int] = {}
        first_round = True
        while first_round or follow:
            if not first_round:
                await trio.sleep(0.5)
            for mp in mounts:
                try:
                    pos[mp.name], new = await entries(mp, pos.get(mp.name))
                except DebugStoreError:
                    if first_round:
                        raise
                    continue
                for epoch, path, md5 in new:
                    yield {"time": epoch, "level": "info", "logger": "debug", "AYSFS_MOUNT": mp.name,
                           "path": path, "hash": md5, "message": f"{path} {md5 or 'removed'}"}
            first_round = False

    def status_line(self) -> str:
        return status_line(list(self.ops.inodes.mounts.values()), self.status.config_error, self.metrics.error)

    # -- main loop ----------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as sigs:
            async for sig in sigs:
                if sig == signal.SIGHUP:
                    log.info("SIGHUP: reloading")
                    await self.reload()
                else:
                    restart, why = await handover.restart_pending() if sig == signal.SIGTERM else (False, "")
                    if restart:
                        log.info("SIGTERM with a restart of the unit queued (%s): handing the mounts over", why)
                        self.handover_mode = "exit"
                    else:
                        log.info("%s: stopping%s", signal.Signals(sig).name, f" ({why})" if why else "")
                    self._stop.set()

    def request_handover(self) -> str:
        """`aysctl restart`: re-execute with the mounts handed over (no unmount, no lost request)."""
        self.handover_mode = "exec"
        self._stop.set()
        return "re-executing aysfsd; the mounts stay and are served again in a moment"

    async def _watchdog(self, interval: float) -> None:
        while True:
            notify.notify("WATCHDOG=1")
            await trio.sleep(interval)

    async def _flush_loop(self) -> None:
        while True:
            await trio.sleep(5.0)
            await trio.to_thread.run_sync(self.cache.flush)

    async def run(self) -> None:
        options = set(pyfuse3.default_options)
        options |= {"fsname=" + sysmount.FSNAME, "subtype=aysfs", "allow_other", "default_permissions"}
        if self.mounts.session_ro:
            options.add("ro")
        self.session.start(options, self.cfg.ays)
        spin = fuselib.set_spin(self.cfg.main.fuse_spin_us)
        if interrupts.available():
            intr = "requests of killed callers given up (EINTR)"
        else:
            intr = "pyfuse3 without aysfs's interrupt patch: a killed caller's request runs to its end"
        loop = ("aysfs's (a request answered at once costs no task switch)" if fuselib.fast_loop()
                else "pyfuse3's (a lock hand-off and a wait per request)")
        if spin:
            loop += f", spinning up to {spin} us for the next request"
        log.info("FUSE session at %s, %s; %s; interrupts: %s; request loop: %s", self.fuse_root,
                 fuselib.summary(fuselib.describe()), self.session.mode(), intr, loop)
        try:
            async with trio.open_nursery() as n:
                self.mounts.nursery = self.versions.nursery = n
                self.fetcher.nursery = n
                n.start_soon(self.session.serve)
                if interrupts.available():
                    n.start_soon(self.ops.callers.run)
                if self.session.adopted is not None:
                    handover.ask_resend(self.session.fd)  # what a killed process had read, unanswered
                n.start_soon(self._signals)
                await n.start(ControlServer(self, self.cfg.main.control_socket).serve)
                await self.metrics.configure(self.cfg.main.metrics_listen)
                await self.mounts.start_all(self.cfg.ays)
                n.start_soon(watch_config, self.config_path, self.reload)
                n.start_soon(self.mounts.expiry_loop)
                n.start_soon(self.mounts.recheck_loop)
                n.start_soon(self._flush_loop)
                wd = notify.watchdog_interval()
                if wd:
                    n.start_soon(self._watchdog, wd)
                notify.notify("READY=1", f"STATUS={self.status_line()}")
                log.info("ready: %s", self.status_line())
                await self._stop.wait()
                if self.handover_mode:
                    self.exec_fds = await self.session.hand_over(max(5.0, self.cfg.main.fetch_timeout + 2),
                                                                 exec_fds=self.handover_mode == "exec")
                else:
                    notify.notify("STOPPING=1")
                    await self.mounts.stop_all()
                # what was fetched stays: the blobs still queued for the local cache are written
                # before the writer is cancelled (the next start may find the stors down)
                with trio.move_on_after(LOCAL_FLUSH_SECONDS) as flushing:
                    await self.fetcher.flushed()
                if flushing.cancelled_caught:
                    log.warning("stopping with blobs still queued for the local cache after %ss: they are "
                                "fetched again when next read", LOCAL_FLUSH_SECONDS)
                with trio.move_on_after(2):
                    await self.fetcher.drain()  # queued grid write-backs: no temp files left behind
                n.cancel_scope.cancel()
        finally:
            self.session.close(handing_over=bool(self.handover_mode))
            with trio.CancelScope(shield=True):
                await self.metrics.close()
            for s in self.fetcher.grid + self.fetcher.stors:
                with trio.CancelScope(shield=True):
                    await s.store.aclose()
                s.store.close()
            self.cache.close()
            log.info("stopped")
