"""The control socket: JSON lines over a Unix stream socket.

One request per connection: the client sends one JSON object and a newline (at most
64 KiB); the server answers with zero or more event lines `{"event": ...}` and exactly
one final line `{"ok": true, ...}` or `{"ok": false, "code": ..., "error": ...}`.
Commands: status, reload, cache.purge, cache.verify, prefetch, profile.record, profile.stop,
log.tail (see the README).

Access: the socket is created mode 0660, group `aysfs` (0600 when that group does not
exist), before it listens. SO_PEERCRED then decides per request: root and members of
`aysfs` may run everything; anyone else who can connect gets status only.

Slots: privileged peers (root, group `aysfs`) have MAX_CLIENTS connections of their own;
other peers share MAX_UNPRIVILEGED, at most MAX_PER_UID per uid, must send their request
within UNPRIVILEGED_TIMEOUT and are done within UNPRIVILEGED_DEADLINE. So idle connections
of other users can never lock root out. A peer over its limit gets `"code": "busy"`, and
aysctl tries again until its own timeout.
"""

from __future__ import annotations

import grp
import json
import logging
import math
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import trio

from ..config import Config
from ..debug.store import DebugStoreError
from ..fuse.ops import MountPoint, Operations
from ..fuse.progress import Progress
from ..tiers import Fetcher
from ..tiers.local import LocalCache
from ..tiers.scrub import scrub
from . import logsetup
from .mounts import Mounts

log = logging.getLogger("aysfsd.daemon.control")

MAX_REQUEST = 64 * 1024
REQUEST_TIMEOUT = 10.0  # a privileged peer must send its request within this
MAX_CLIENTS = 64  # connections of privileged peers at once
MAX_UNPRIVILEGED = 16  # connections of all other peers at once
MAX_PER_UID = 4  # ... and of one such uid
UNPRIVILEGED_TIMEOUT = 2.0  # an unprivileged peer must send its request within this
UNPRIVILEGED_DEADLINE = 5.0  # ... and is disconnected after this (status takes milliseconds)
BACKLOG = 128
GROUP = "aysfs"
READ_ONLY = {"status"}


class DaemonAPI(Protocol):
    """What the control server needs of the daemon (daemon.Daemon implements it); a mount's purge
    and profile recording it asks of the daemon's `mounts` (daemon.mounts.Mounts)."""

    ops: Operations
    mounts: Mounts
    cache: LocalCache
    fetcher: Fetcher
    cfg: Config

    async def status_report(self) -> dict[str, object]: ...

    async def reload(self) -> tuple[bool, str]: ...

    def request_handover(self) -> str: ...

    def debug_log(self, mount: str | None, lines: int, follow: bool) -> AsyncIterator[dict[str, object]]: ...


class Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def peer_cred(sock: trio.socket.SocketType) -> tuple[int, int, int]:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def privileged(pid: int, uid: int, gid: int) -> bool:
    """Root, or a member of group `aysfs` (primary or supplementary, read from /proc)."""
    if uid == 0:
        return True
    try:
        g = grp.getgrnam(GROUP).gr_gid
    except KeyError:
        return False
    if gid == g:
        return True
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return g in {int(x) for x in line.split()[1:]}
    except OSError:
        pass
    return False


def make_socket(path: str) -> trio.socket.SocketType:
    """Bind with the final mode already applied (umask), then chown/chmod before listen()."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    try:
        gid = grp.getgrnam(GROUP).gr_gid
        mode = 0o660
    except KeyError:
        gid, mode = -1, 0o600
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock._sock.bind(path)  # type: ignore[attr-defined]  # sync bind: no await window
    finally:
        os.umask(old)
    if gid >= 0:
        os.chown(path, 0 if os.geteuid() == 0 else -1, gid)
    os.chmod(path, mode)
    sock.listen(BACKLOG)
    return sock


class ControlServer:
    def __init__(self, daemon: DaemonAPI, path: str) -> None:
        self.daemon = daemon
        self.path = path
        self.privileged = 0  # open connections of privileged peers
        self.unprivileged: dict[int, int] = {}  # uid -> open connections of other peers
        self.handlers: dict[str, Callable[[dict[str, Any], Callable[[dict[str, Any]], Awaitable[None]]],
                                          Awaitable[dict[str, Any]]]] = {
            "status": self.status,
            "reload": self.reload,
            "restart": self.restart,
            "cache.purge": self.purge,
            "cache.verify": self.verify,
            "prefetch": self.prefetch,
            "profile.record": self.profile_record,
            "profile.stop": self.profile_stop,
            "log.tail": self.log_tail,
        }

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sock = make_socket(self.path)
        listener = trio.SocketListener(sock)
        log.info("control socket at %s", self.path)
        task_status.started()
        try:
            async with trio.open_nursery() as n:
                while True:
                    stream = await listener.accept()
                    n.start_soon(self._client, stream)
        finally:
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def _admit(self, uid: int, priv: bool) -> str:
        """Take a slot for a new connection; "" when admitted, else why not."""
        if priv:
            if self.privileged >= MAX_CLIENTS:
                return f"too many clients ({MAX_CLIENTS} connections of privileged users are open)"
            self.privileged += 1
            return ""
        if sum(self.unprivileged.values()) >= MAX_UNPRIVILEGED:
            return f"too many clients ({MAX_UNPRIVILEGED} connections of unprivileged users are open)"
        if self.unprivileged.get(uid, 0) >= MAX_PER_UID:
            return f"too many clients (uid {uid} has {MAX_PER_UID} connections open)"
        self.unprivileged[uid] = self.unprivileged.get(uid, 0) + 1
        return ""

    def _release(self, uid: int, priv: bool) -> None:
        if priv:
            self.privileged -= 1
        elif self.unprivileged.get(uid, 0) <= 1:
            self.unprivileged.pop(uid, None)
        else:
            self.unprivileged[uid] -= 1

    async def _client(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                pid, uid, gid = peer_cred(stream.socket)
            except OSError:
                return
            priv = privileged(pid, uid, gid)
            refused = self._admit(uid, priv)
            if refused:
                with trio.move_on_after(1):
                    try:
                        await self._send(stream, {"ok": False, "code": "busy", "error": refused})
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                return
            try:
                with trio.move_on_after(math.inf if priv else UNPRIVILEGED_DEADLINE):
                    await self._handle(stream, pid, uid, gid, priv)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            except Exception as e:
                log.exception("control request failed")
                try:
                    await self._send(stream, {"ok": False, "code": "failed", "error": f"internal error: {e}"})
                except Exception:
                    pass
            finally:
                self._release(uid, priv)

    async def _send(self, stream: trio.SocketStream, obj: dict[str, Any]) -> None:
        await stream.send_all(json.dumps(obj, default=str).encode() + b"\n")

    async def _read_request(self, stream: trio.SocketStream, timeout: float) -> dict[str, Any]:
        buf = b""
        with trio.move_on_after(timeout) as scope:
            while b"\n" not in buf:
                chunk = await stream.receive_some(MAX_REQUEST + 1)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > MAX_REQUEST:
                    raise Refused("bad-request", f"request larger than {MAX_REQUEST} bytes")
        if scope.cancelled_caught:
            raise Refused("bad-request", f"no complete request within {timeout:g}s")
        line = buf.split(b"\n", 1)[0]
        try:
            req = json.loads(line)
        except ValueError as e:
            raise Refused("bad-request", f"not JSON: {e}") from None
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            raise Refused("bad-request", 'a request is a JSON object with a "cmd" string')
        return req

    async def _handle(self, stream: trio.SocketStream, pid: int, uid: int, gid: int, priv: bool) -> None:
        try:
            req = await self._read_request(stream, REQUEST_TIMEOUT if priv else UNPRIVILEGED_TIMEOUT)
            cmd = req["cmd"]
            handler = self.handlers.get(cmd)
            if handler is None:
                raise Refused("bad-request", f"unknown command {cmd!r:.40}; known: {', '.join(self.handlers)}")
            if cmd not in READ_ONLY and not priv:
                raise Refused("permission", f"permission denied: {cmd} needs root or group {GROUP!r} (uid {uid})")

            async def event(obj: dict[str, Any]) -> None:
                await self._send(stream, obj)

            reply = await handler(req, event)
            await self._send(stream, {"ok": True, **reply})
        except Refused as e:
            await self._send(stream, {"ok": False, "code": e.code, "error": str(e)})

    # -- commands -----------------------------------------------------------------------------

    def _mount(self, req: dict[str, Any]) -> MountPoint:
        key = req.get("ays")
        if not isinstance(key, str) or not key:
            raise Refused("bad-request", '"ays" (an ays id or mount name) is required')
        mounts = self.daemon.ops.inodes.mounts
        if key in mounts:
            return mounts[key]
        for mp in mounts.values():
            if mp.cfg.id == key:
                return mp
        raise Refused("unknown-ays", f"no mount of {key!r}; mounts: {', '.join(sorted(mounts)) or 'none'}")

    async def status(self, req: dict[str, Any], event: Any) -> dict[str, Any]:
        return await self.daemon.status_report()

    async def reload(self, req: dict[str, Any], event: Any) -> dict[str, Any]:
        ok, err = await self.daemon.reload()
        if not ok:
            raise Refused("failed", err)
        return {}

    async def restart(self, req: dict[str, Any], event: Any) -> dict[str, Any]:
        return {"message": self.daemon.request_handover(), "pid": os.getpid()}

    async def purge(self, req: dict[str, Any], event: Any) -> dict[str, Any]:
        if req.get("ays"):
            mp = self._mount(req)
            freed, n = await self.daemon.mounts.purge(mp)
        else:
            before = self.daemon.cache.stats().entries
            freed = await trio.to_thread.run_sync(self.daemon.cache.purge)
            n = before
        return {"freed_bytes": freed, "blobs": n}

    async def verify(self, req: dict[str, Any], event: Any) -> dict[str, Any]:
        checked, bad = await trio.to_thread.run_sync(scrub, self.daemon.cache)
        for h in bad:
            log.error("local cache: blob %s was corrupt on disk: dropped", h, extra={"BLOB": h})
        self.daemon.fetcher.memory.clear()
        return {"checked": checked, "dropped": bad}

    async def prefetch(self, req: dict[str, Any], event: Any) -> dict[str, Any]:
        from ..fuse import prefetch

        mp = self._mount(req)
        local, grid = bool(req.get("local", True)), bool(req.get("grid", False))
        send, recv = trio.open_memory_channel[dict[str, Any]](1)

        def on_progress(p: Progress) -> None:
            try:
                send.send_nowait({"event": "progress", "blobs_done": p.blobs_done, "blobs_total": p.blobs_total,
                                  "bytes_done": p.bytes_done, "bytes_total": p.bytes_total})
            except trio.WouldBlock:
                pass  # the client is slow: skip this update, never stall the prefetch

        result: list[Progress] = []

        async def job() -> None:
            async with send:
                result.append(await prefetch.run(self.daemon.ops.catalog, mp, local=local, grid=grid,
                                                 on_progress=on_progress))

        async with trio.open_nursery() as n:
            n.start_soon(job)
            async with recv:
                async for ev in recv:
                    await event(ev)
        p = result[0]
        return {"blobs": p.blobs_done, "bytes": p.bytes_done, "fetched_blobs": p.fetched_blobs,
                "fetched_bytes": p.fetched_bytes, "errors": p.errors, "seconds": p.seconds, "state": p.state}

    def _seconds(self, req: dict[str, Any], key: str, default: float, hi: float) -> float:
        v = req.get(key, default)
        if type(v) not in (int, float) or not 0 < v <= hi:
            raise Refused("bad-request", f'"{key}" must be a number of seconds in (0, {hi:g}]')
        return float(v)

    async def profile_record(self, req: dict[str, Any], event: Any) -> dict[str, Any]:
        """Record the mount's next start; answers when the recording ends, with the profile."""
        mp = self._mount(req)
        if mp.cfg.debug:
            raise Refused("failed", f"mount {mp.name} is in debug mode: its tree is not the published one")
        idle = self._seconds(req, "idle", self.daemon.cfg.main.profile_idle, 3600)
        timeout = self._seconds(req, "timeout", 600, 86400)
        try:
            w = await self.daemon.mounts.record_profile(mp, idle, timeout)
        except LookupError as e:
            raise Refused("failed", str(e)) from None
        if not w.items:
            raise Refused("failed", f"nothing of {mp.name} was read ({w.reason or 'stopped'}): no profile recorded")
        p = w.profile()
        return {"ays": mp.cfg.id, "root": p.root, "items": len(p.items), "bytes": p.data_bytes,
                "seconds": w.seconds, "reason": w.reason, "profile": p.encode().decode("utf-8", "surrogateescape")}

    async def profile_stop(self, req: dict[str, Any], event: Any) -> dict[str, Any]:
        mp = self._mount(req)
        w = mp.watch
        stopped = w is not None and w.active and w.record
        if stopped:
            assert w is not None
            w.stop("stopped")
        return {"stopped": stopped}

    async def log_tail(self, req: dict[str, Any], event: Any) -> dict[str, Any]:
        lines = req.get("lines", 20)
        if type(lines) is not int or lines < 0:
            raise Refused("bad-request", '"lines" must be a non-negative integer')
        mount = req.get("mount")
        debug = bool(req.get("debug"))
        if debug:
            try:
                async for item in self.daemon.debug_log(mount, lines, bool(req.get("follow"))):
                    await event({"event": "log", **item})
            except LookupError as e:
                raise Refused("unknown-ays", str(e)) from None
            except DebugStoreError as e:
                raise Refused("failed", str(e)) from None
            return {}

        def wanted(item: dict[str, object]) -> bool:
            return not mount or item.get("AYSFS_MOUNT") == mount

        backlog = [i for i in logsetup.recent.lines if wanted(i)]
        for item in backlog[-lines:] if lines else []:
            await event({"event": "log", **item})
        if not req.get("follow"):
            return {}
        send, recv = trio.open_memory_channel[dict[str, object]](1000)
        token = trio.lowlevel.current_trio_token()

        def deliver(item: dict[str, object]) -> None:
            try:
                send.send_nowait(item)
            except (trio.WouldBlock, trio.ClosedResourceError):
                pass  # a slow follower loses lines rather than slowing the daemon

        def listener(item: dict[str, object]) -> None:
            if wanted(item):
                try:
                    token.run_sync_soon(deliver, item)
                except trio.RunFinishedError:
                    pass

        logsetup.recent.listeners.add(listener)
        try:
            async for item in recv:
                await event({"event": "log", **item})
        finally:
            logsetup.recent.listeners.discard(listener)
        return {}

