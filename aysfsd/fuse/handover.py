"""Hand the FUSE connection over to the next daemon process, so a restart never breaks readers.

The kernel keeps a FUSE connection alive as long as one file descriptor of its /dev/fuse
open file is open; requests that arrive while no process reads it simply queue. So:

* at start the daemon stores a duplicate of its /dev/fuse descriptor (and the memfd of its
  inode journal, see aysfsd.fuse.statejournal) in systemd's file descriptor store
  (`FDSTORE=1`, the unit has `FileDescriptorStoreMax=`); outside systemd, `aysctl restart`
  makes the daemon re-execute itself with both descriptors inherited;
* the next process finds them (`LISTEN_FDS`/`LISTEN_FDNAMES`, or `AYSFS_HANDOVER_FDS` after
  a re-exec) and resumes the session instead of mounting a new one. The kernel sends FUSE
  INIT once per connection, and libfuse refuses every request until it has seen one, so
  the new process feeds libfuse a synthetic INIT through a socketpair standing in for the
  device, and swaps the real descriptor in while libfuse handles it (`Operations.init`
  calls `finish_resume`). libfuse's reply to that INIT goes to the kernel with a request
  id the kernel never issued and is dropped (ENOENT, which libfuse ignores by design);
* requests the old process had read but not answered (it was killed) are requeued by
  FUSE_NOTIFY_RESEND (Linux 6.9+); after a graceful stop there are none: the old process
  stopped reading and answered everything it had read (`pyfuse3.terminate()` drains).

This needs no change to pyfuse3 or libfuse and works with Debian's pyfuse3 too.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct

log = logging.getLogger("aysfsd.fuse.handover")

FUSE_FDNAME = "aysfs-fuse"
STATE_FDNAME = "aysfs-state"
ENV_FDS = "AYSFS_HANDOVER_FDS"  # "name=fd,name=fd" for a re-executed daemon
SD_LISTEN_FDS_START = 3

FUSE_INIT = 26
FUSE_NOTIFY_RESEND = 7
FUSE_KERNEL_VERSION = 7
FUSE_MINOR = 38  # what libfuse 3.14 speaks; it answers with min(its own, ours) anyway
INIT_FLAGS = 0x7FFFFFFF  # every capability the kernel might have offered: libfuse wants a subset
SYNTHETIC_UNIQUE = (1 << 40) | 2  # even and far above any id the kernel hands out
MAX_READAHEAD = 128 * 1024


def received_fds() -> dict[str, int]:
    """Descriptors handed to this process by systemd's fd store or a re-exec, by name.
    Clears the environment variables so that children do not see them."""
    out: dict[str, int] = {}
    spec = os.environ.pop(ENV_FDS, "")
    for item in filter(None, spec.split(",")):
        name, _, fd = item.partition("=")
        if fd.isdigit() and _is_open(int(fd)):
            out[name] = int(fd)
    pid = os.environ.get("LISTEN_PID", "")
    if pid == str(os.getpid()):
        try:
            n = int(os.environ.get("LISTEN_FDS", "0"))
        except ValueError:
            n = 0
        names = os.environ.get("LISTEN_FDNAMES", "").split(":")
        for i in range(n):
            fdname = names[i] if i < len(names) else ""
            sdfd = SD_LISTEN_FDS_START + i
            if fdname in (FUSE_FDNAME, STATE_FDNAME) and fdname not in out:
                out[fdname] = sdfd
            else:
                log.warning("ignoring a descriptor passed by systemd: %d (%r)", sdfd, fdname)
                os.close(sdfd)
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(var, None)
    for kept in out.values():
        os.set_inheritable(kept, False)
    return out


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def is_fuse_device(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "/dev/fuse"
    except OSError:
        return False


def session_fd() -> int:
    """The descriptor of this process's FUSE session (pyfuse3 does not expose it)."""
    for name in sorted(os.listdir("/proc/self/fd"), key=int):
        if is_fuse_device(int(name)):
            return int(name)
    raise RuntimeError("no /dev/fuse descriptor in this process")


def fd_store_available() -> bool:
    """Under systemd (the unit sets FileDescriptorStoreMax=; systemd < 254 sets no $FDSTORE)."""
    return bool(os.environ.get("NOTIFY_SOCKET")) and os.environ.get("FDSTORE", "1") != "0"


def store(name: str, fd: int) -> bool:
    """Put a duplicate of `fd` into systemd's fd store under `name` (replacing an older one)."""
    from systemd import daemon as sd  # only under systemd

    try:
        sd.notify(f"FDSTOREREMOVE=1\nFDNAME={name}")
        return bool(sd.notify(f"FDSTORE=1\nFDNAME={name}", fds=[fd]))
    except (OSError, TypeError, ValueError) as e:  # TypeError: a python-systemd without fds=
        log.warning("could not store descriptor %s in systemd's fd store: %s", name, e)
        return False


def forget_stored() -> None:
    """Tell systemd to close what it keeps for us: a real stop must end the connection."""
    from systemd import daemon as sd

    for name in (FUSE_FDNAME, STATE_FDNAME):
        try:
            sd.notify(f"FDSTOREREMOVE=1\nFDNAME={name}")
        except OSError as e:
            log.warning("could not empty systemd's fd store (%s): %s", name, e)


def synthetic_init() -> bytes:
    """A FUSE_INIT request as the kernel sends it (fuse_in_header + fuse_init_in)."""
    body = struct.pack("<IIIII11I", FUSE_KERNEL_VERSION, FUSE_MINOR, MAX_READAHEAD, INIT_FLAGS, 0, *([0] * 11))
    header = struct.pack("<IIQQIIIHH", 40 + len(body), FUSE_INIT, SYNTHETIC_UNIQUE, 0, 0, 0, 0, 0, 0)
    return header + body


class Resume:
    """Resuming a session on an inherited /dev/fuse descriptor (see the module docstring).

    `mountpoint()` is what to give `pyfuse3.init` instead of the FUSE root; the operations'
    `init()` must call `finish()`, which swaps the real device in while libfuse handles the
    synthetic INIT."""

    def __init__(self, fuse_fd: int) -> None:
        if not is_fuse_device(fuse_fd):
            raise ValueError(f"descriptor {fuse_fd} is not /dev/fuse")
        self.fuse_fd = fuse_fd
        self._ours, self._libfuse = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.done = False

    def mountpoint(self) -> str:
        return f"/dev/fd/{self._libfuse.fileno()}"

    def start(self) -> None:
        """After pyfuse3.init: queue the INIT that libfuse will read first."""
        self._ours.send(synthetic_init())

    def finish(self) -> None:
        """From Operations.init: from now on libfuse's descriptor is the real device."""
        if self.done:
            return
        import trio

        fd = self._libfuse.fileno()
        try:
            trio.lowlevel.notify_closing(fd)  # a second worker may wait on the socket: wake it
        except RuntimeError:
            pass  # not under trio (tests of this module)
        os.dup2(self.fuse_fd, fd, inheritable=False)
        if not _loop_sets_nonblocking():
            # a predecessor with loop.patch left the device's (shared) open file non-blocking;
            # the stock loop reads after readiness and takes an EAGAIN (a request withdrawn
            # in between) for a fatal error
            os.set_blocking(fd, True)
        self._libfuse.detach()  # the number now belongs to the device, libfuse keeps it
        self._ours.close()
        self.done = True


def _loop_sets_nonblocking() -> bool:
    try:
        import pyfuse3
    except ImportError:  # tests of this module without pyfuse3
        return False
    return getattr(pyfuse3, "AYSFS_LOOP", 0) >= 1


def ask_resend(fuse_fd: int) -> bool:
    """FUSE_NOTIFY_RESEND: the kernel requeues requests a dead process read but never answered."""
    try:
        os.write(fuse_fd, struct.pack("<IiQ", 16, FUSE_NOTIFY_RESEND, 0))
        return True
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOSYS):
            log.warning("this kernel cannot resend requests a killed daemon had read (Linux < 6.9): "
                        "a reader blocked in one of them may stay blocked")
        else:
            log.warning("FUSE_NOTIFY_RESEND failed: %s", e)
        return False


def own_unit() -> str:
    """The systemd unit this process runs in (from its cgroup), or ""."""
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                unit = line.rstrip("\n").rsplit("/", 1)[-1]
                if unit.endswith(".service"):
                    return unit
    except OSError:
        pass
    return ""


async def restart_pending() -> tuple[bool, str]:
    """(True, why) when systemd stops us to start us again (`systemctl restart`, an upgrade's
    restart): then the mounts are handed over, on a plain stop they are unmounted. `why` says
    what systemd's job list showed (logged with the decision)."""
    import trio

    unit = own_unit()
    if not unit or not os.environ.get("NOTIFY_SOCKET"):
        return False, "not run by systemd"
    seen = ""
    with trio.move_on_after(3):
        for _ in range(3):  # a job list without our job at all: asked again (bounded)
            r = await trio.run_process(["systemctl", "list-jobs", "--no-legend", "--plain", "--full", unit],
                                       capture_stdout=True, capture_stderr=True, check=False)
            for line in r.stdout.decode(errors="replace").splitlines():
                parts = line.split()
                if len(parts) >= 3 and parts[1] == unit:
                    job = parts[2]
                    return job in ("restart", "try-restart", "reload-or-restart", "reload-or-try-restart"), \
                        f"systemd's job for {unit}: {job}"
            seen = (r.stdout + r.stderr).decode(errors="replace").strip()[:200]
            await trio.sleep(0.05)
        return False, f"no job for {unit} in systemctl list-jobs ({seen or 'empty'})"
    log.warning("systemctl did not answer within 3 s: stopping for good")
    return False, "systemctl list-jobs did not answer within 3 s"
