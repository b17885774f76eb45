"""The daemon's one FUSE session: mounted anew, or resumed from the descriptor and state the
previous process handed over (aysfsd.fuse.handover), served by pyfuse3's loop, handed over to
the next process at a restart, closed at a stop."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import pyfuse3
import trio

from ..config import AysConfig
from ..fuse import handover, sysmount
from ..fuse import lib as fuselib
from ..fuse.ops import Operations
from ..fuse.statejournal import Restored, StateJournal, recorded_no_open, restore
from . import notify

log = logging.getLogger("aysfsd")


def fuse_patched() -> bool:
    """Whether pyfuse3 has aysfs's patch (packaging/pyfuse3/): READ and READDIR name the inode
    when the kernel sends no handle, and symlinks may be cached (aysfsd.fuse.lib)."""
    return fuselib.patched()


class FuseSession:
    def __init__(self, ops: Operations, fuse_root: str) -> None:
        self.ops = ops
        self.fuse_root = fuse_root
        self.adopted: Restored | None = None  # the state a previous process handed over
        self.fd = -1  # /dev/fuse
        self._done = trio.Event()

    async def serve(self) -> None:
        try:
            await pyfuse3.main(min_tasks=4, max_tasks=64)
        finally:
            self._done.set()

    def _resumable(self, fds: dict[str, int]) -> handover.Resume | None:
        """A session handed over by the previous process, when its descriptor and mounts are there."""
        fuse_fd = fds.get(handover.FUSE_FDNAME)
        if fuse_fd is None:
            return None
        why = ""
        state_fd = fds.get(handover.STATE_FDNAME)
        if not handover.is_fuse_device(fuse_fd):
            why = "the descriptor handed over is not /dev/fuse"
        elif not sysmount.is_mounted(self.fuse_root):
            why = f"{self.fuse_root} is no longer mounted (the connection ended)"
        elif (state_fd is not None and recorded_no_open(StateJournal(state_fd).lines())
              and not fuse_patched()):
            # the kernel keeps the mode for the connection's life: it sends READs with handle 0,
            # which a stock pyfuse3 cannot map to a file. Readers of the old session get ENOTCONN
            # once its descriptors are closed (as after a crash without them), never wrong bytes.
            why = ("it runs in the kernel's no_open mode, which this pyfuse3 cannot serve "
                   f"({fuselib.summary(fuselib.describe())})")
        if why:
            log.warning("cannot resume the FUSE session: %s; mounting a new one", why)
            os.close(fuse_fd)
            return None
        return handover.Resume(fuse_fd)

    def start(self, options: set[str], ays: Sequence[AysConfig]) -> None:
        """Mount a new FUSE session, or resume the one the previous process handed over."""
        fds = handover.received_fds()
        resume = self._resumable(fds)
        state_fd = fds.get(handover.STATE_FDNAME)
        if resume is None and state_fd is not None:
            os.close(state_fd)
            state_fd = None
        journal = StateJournal(state_fd)
        if resume is not None:
            self.adopted = restore(journal.lines(), ays, self.ops.catalog.cached_entries)
            self.ops.inodes.adopt(self.adopted)
            log.info("resuming the FUSE session of the previous process: %d mounts, %d inodes, %d open files "
                     "(%d records skipped)", len(self.adopted.mounts), len(self.adopted.nodes),
                     len(self.adopted.open_files), self.adopted.skipped)
            for mnt in self.adopted.gone.values():
                if mnt and sysmount.is_mounted(mnt):
                    sysmount.cleanup_stale([mnt])  # removed from the config while we restarted
            journal.snapshot(self.ops.inodes.snapshot())
        else:
            sysmount.cleanup_stale([self.fuse_root] + [a.mnt for a in ays])
            os.makedirs(self.fuse_root, mode=0o755, exist_ok=True)
        self.ops.inodes.journal = journal
        journal.compact = self.ops.inodes.snapshot
        if resume is None:
            journal.session(self.ops.inodes.no_open)  # a resumed session keeps its mode (see Inodes.adopt)
        if resume is not None:
            self.ops.on_init = resume.finish
            pyfuse3.init(self.ops, resume.mountpoint(), options)
            resume.start()
            self.fd = resume.fuse_fd
        else:
            pyfuse3.init(self.ops, self.fuse_root, options)
            self.fd = handover.session_fd()
        if handover.fd_store_available():
            handover.store(handover.FUSE_FDNAME, self.fd)
            handover.store(handover.STATE_FDNAME, journal.fd)

    async def hand_over(self, bound: float, exec_fds: bool) -> dict[str, int]:
        """Stop reading requests, answer those already read (for `bound` seconds at most), write the
        state for the next process; with `exec_fds`, duplicates of the descriptors to pass on."""
        notify.notify("STOPPING=1", "STATUS=handing the mounts over to the next process")
        pyfuse3.terminate()
        with trio.move_on_after(bound) as scope:
            await self._done.wait()
        if scope.cancelled_caught:
            log.warning("requests still running after %.0fs: the next process gets them again",
                        scope.deadline - trio.current_time())
        await self.ops.save_pending_writes()  # debug mode: keep what was written so far
        inodes = self.ops.inodes
        journal = inodes.journal
        assert isinstance(journal, StateJournal)
        journal.snapshot(inodes.snapshot())
        log.info("handed over: %d inodes, %d open files", len(inodes.nodes), len(inodes.open_files))
        if exec_fds:
            return {handover.FUSE_FDNAME: os.dup(self.fd), handover.STATE_FDNAME: os.dup(journal.fd)}
        return {}

    def mode(self) -> str:
        """The kernel mode the FUSE session runs in, and why (log, `aysctl status`)."""
        if self.ops.inodes.no_open:
            return "no_open (kernel caches pages and listings: no OPEN/RELEASE/READDIR per file)"
        if self.adopted is not None and self.adopted.no_open is not None:
            return "open/release per file (the session resumed was started so)"
        if fuse_patched():
            return "open/release per file (a debug mount at start)"
        return "open/release per file (pyfuse3 without aysfs's patch: every open and listing is a request)"

    def close(self, handing_over: bool) -> None:
        """End the session; when not handing it over, also unmount it and forget what systemd keeps."""
        try:
            pyfuse3.close(unmount=not handing_over)
        except Exception as e:
            log.error("closing the FUSE session: %s", e)
        if not handing_over:
            if self.adopted is not None:
                sysmount.unmount_session(self.fuse_root)
            sysmount.cleanup_stale([self.fuse_root])
            if handover.fd_store_available():
                handover.forget_stored()
