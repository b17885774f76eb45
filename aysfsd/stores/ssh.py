"""A stor or grid cache reached over SSH/SFTP: `ssh://[user@]host[:port]/abs/path`.

Public-key authentication only and host keys verified against known_hosts (unknown keys
are refused unless the operator explicitly accepts them). Connections are pooled (at most
`max_connections`): an SFTPClient is not safe for concurrent use, so every operation checks
a connection out, uses it alone and hands it back. A connection that failed at the
transport level is closed, never pooled again. Blocking paramiko calls run in worker
threads for the async methods, never on the trio loop.
"""

from __future__ import annotations

import errno
import getpass
import logging
import os
import posixpath
import secrets
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import paramiko
import trio

from ..compat import run_abandonable
from .base import LowSpeed, Progress, StoreError, StoreTimeout, check_rel, describe, within_low_speed

log = logging.getLogger("aysfsd.ssh")

T = TypeVar("T")

_STATUS_ERRNOS = (None, errno.ENOENT, errno.EACCES)
READ_PIECE = 1 << 20  # bytes per read of a fetched file (the low-speed limit counts them)


class _UnknownHostKey(paramiko.SSHException):
    """The server's host key is in no known_hosts file (and accepting it was not allowed)."""

    def __init__(self, hostname: str, key: paramiko.PKey) -> None:
        super().__init__(hostname, key)
        self.hostname = hostname
        self.key_name = key.get_name()
        self.fingerprint = _fingerprint(key)


def _fingerprint(key: paramiko.PKey) -> str:
    fp = getattr(key, "fingerprint", None)  # paramiko >= 3.2: "SHA256:..."
    return str(fp) if fp else key.get_fingerprint().hex()


class _RejectPolicy(paramiko.MissingHostKeyPolicy):
    """Refuse unknown host keys with an exception we can recognize."""

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        raise _UnknownHostKey(hostname, key)


class _AcceptPolicy(paramiko.MissingHostKeyPolicy):
    """Accept an unknown host key (with a warning) and pin it for the store's lifetime.

    Unlike paramiko's AutoAddPolicy it never rewrites the known_hosts file; later
    connections of the same store must present the same key.
    """

    def __init__(self, store: SshStore) -> None:
        self._store = store

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        with self._store._cond:
            pinned = self._store._pinned.get(hostname)
            if pinned is None:
                self._store._pinned[hostname] = key
        if pinned is not None and pinned != key:  # cannot happen: pinned keys are preloaded
            raise paramiko.BadHostKeyException(hostname, key, pinned)
        if pinned is None:
            log.warning("%s: accepting UNVERIFIED ssh host key of %s (%s %s): it is not in known_hosts",
                        self._store.url, hostname, key.get_name(), _fingerprint(key))
        client.get_host_keys().add(hostname, key.get_name(), key)


@dataclass(eq=False)
class _Conn:
    client: paramiko.SSHClient
    sftp: paramiko.SFTPClient
    gen: int

    def alive(self) -> bool:
        t = self.client.get_transport()
        return t is not None and t.is_active()

    def close(self) -> None:
        for c in (self.sftp, self.client):
            try:
                c.close()
            except Exception:  # noqa: BLE001 - closing a broken connection must not fail
                pass


def _is_status_error(e: BaseException) -> bool:
    """True for an SFTP status answer (no such file, permission denied, failure)."""
    return (isinstance(e, OSError) and type(e) in (OSError, FileNotFoundError, PermissionError)
            and e.errno in _STATUS_ERRNOS)


class SshStore:
    """A stor or grid cache on an SSH server, read and written with SFTP."""

    max_connections = 4

    def __init__(self, url: str, timeout: float = 10.0, key: str | None = None,
                 known_hosts: str | None = None, accept_unknown_host: bool = False) -> None:
        parts = urlsplit(url)
        if parts.scheme != "ssh" or not parts.hostname:
            raise ValueError(f"not an ssh:// store URL: {url!r}")
        if parts.password is not None:
            raise ValueError(f"passwords in ssh URLs are not supported (key authentication only): {parts.hostname}")
        if parts.query or parts.fragment:
            raise ValueError(f"unexpected query or fragment in ssh URL {url!r}")
        root = posixpath.normpath(unquote(parts.path)) if parts.path else ""
        if not root.startswith("/"):
            raise ValueError(f"ssh store URL needs an absolute path: {url!r}")
        self.host: str = parts.hostname
        self.port: int = parts.port or 22
        self.user: str = unquote(parts.username) if parts.username else getpass.getuser()
        self.root: str = root.rstrip("/")  # "" for "/", so root + "/" + rel is always right
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.key = key
        self.known_hosts = known_hosts
        self.accept_unknown_host = accept_unknown_host
        self.low_speed = LowSpeed()
        self.peak_connections = 0  # highest number of simultaneously open connections
        self.connects = 0  # connections opened so far
        self._cond = threading.Condition()
        self._idle: list[_Conn] = []
        self._live = 0  # open or opening connections, idle or checked out
        self._gen = 0  # bumped by close(): older checked-out connections are not pooled again
        self._pinned: dict[str, paramiko.PKey] = {}
        self._limiter: trio.CapacityLimiter | None = None

    def __repr__(self) -> str:
        return f"<SshStore {self.url}>"

    def _abs(self, rel: str) -> str:
        return f"{self.root}/{check_rel(rel)}"

    # -- connections ---------------------------------------------------------------

    def _connect(self, op: str, rel: str) -> _Conn:
        """Open, authenticate and start SFTP on a new connection, or raise StoreError."""
        where = f"{self.url}: {op} {rel}"
        who = f"{self.user}@{self.host}:{self.port}"
        if self.key is not None and not os.path.isfile(self.key):
            raise StoreError(f"{where}: ssh authentication impossible: key file {self.key} not found")
        client = paramiko.SSHClient()
        try:
            if self.known_hosts is not None:
                client.load_host_keys(self.known_hosts)
            else:
                client.load_system_host_keys()
            with self._cond:
                pinned = list(self._pinned.items())
            for host, k in pinned:
                client.get_host_keys().add(host, k.get_name(), k)
            client.set_missing_host_key_policy(_AcceptPolicy(self) if self.accept_unknown_host else _RejectPolicy())
            client.connect(self.host, port=self.port, username=self.user, key_filename=self.key,
                           look_for_keys=self.key is None, allow_agent=self.key is None,
                           timeout=self.timeout, banner_timeout=self.timeout, auth_timeout=self.timeout)
            # (no channel_timeout: paramiko 2.12 lacks it; _open_sftp bounds the channel open itself)
            sftp = self._open_sftp(client)
        except BaseException as e:
            client.close()
            if isinstance(e, _UnknownHostKey):
                src = self.known_hosts or "the system/user known_hosts files"
                raise StoreError(f"{where}: unknown ssh host key for {e.hostname} ({e.key_name} {e.fingerprint}): "
                                 f"not in {src}; add it there (or allow accepting unknown host keys)") from e
            if isinstance(e, paramiko.BadHostKeyException):
                raise StoreError(f"{where}: ssh host key MISMATCH for {e.hostname}: got {e.key.get_name()} "
                                 f"{_fingerprint(e.key)}, expected {_fingerprint(e.expected_key)} "
                                 "(server reinstalled, or someone in the middle?)") from e
            if isinstance(e, paramiko.AuthenticationException):
                how = f"key {self.key}" if self.key else "default keys/agent"
                raise StoreError(f"{where}: ssh authentication failed for {who} with {how}: {describe(e)}") from e
            if isinstance(e, OSError | EOFError | paramiko.SSHException):
                err = StoreTimeout if isinstance(e, TimeoutError) else StoreError
                raise err(f"{where}: cannot connect to ssh server {who}: {describe(e)}") from e
            raise
        log.debug("%s: connected to %s", self.url, who)
        with self._cond:
            self.connects += 1
            return _Conn(client, sftp, self._gen)

    def _open_sftp(self, client: paramiko.SSHClient) -> paramiko.SFTPClient:
        """Start the sftp subsystem, all of it bounded by the timeout."""
        transport = client.get_transport()
        assert transport is not None
        # Channel.invoke_subsystem waits without a timeout: a watchdog closes the transport.
        watchdog = threading.Timer(self.timeout, transport.close)
        watchdog.daemon = True
        watchdog.start()
        try:
            chan = transport.open_session(timeout=self.timeout)
            chan.settimeout(self.timeout)
            chan.invoke_subsystem("sftp")
            sftp = paramiko.SFTPClient(chan)
        finally:
            watchdog.cancel()
        if not transport.is_active():
            raise paramiko.SSHException("timed out starting the sftp subsystem")
        sftp.get_channel().settimeout(self.timeout)
        return sftp

    def _checkout(self, op: str, rel: str) -> tuple[_Conn, bool]:
        """An idle live connection (reused=True) or a new one; waits while the pool is full."""
        dead: list[_Conn] = []
        try:
            with self._cond:
                while True:
                    while self._idle:
                        conn = self._idle.pop()
                        if conn.alive():
                            return conn, True
                        self._live -= 1
                        dead.append(conn)
                    if self._live < self.max_connections:
                        self._live += 1
                        self.peak_connections = max(self.peak_connections, self._live)
                        break
                    self._cond.wait()
        finally:
            for conn in dead:
                conn.close()
        try:
            return self._connect(op, rel), False
        except BaseException:
            with self._cond:
                self._live -= 1
                self._cond.notify()
            raise

    def _checkin(self, conn: _Conn, healthy: bool) -> None:
        with self._cond:
            keep = healthy and conn.gen == self._gen and conn.alive()
            if keep:
                self._idle.append(conn)
            else:
                self._live -= 1
            self._cond.notify()
        if not keep:
            conn.close()

    def _run(self, op: str, rel: str, fn: Callable[[paramiko.SFTPClient, str], T]) -> T:
        """Run fn(sftp, abs_path) on a pooled connection, mapping failures to StoreError.

        A transport failure on a reused connection (it went stale, e.g. the server
        restarted) is retried once on a fresh one; every operation is idempotent.
        """
        path = self._abs(rel)
        for attempt in (0, 1):
            conn, reused = self._checkout(op, rel)
            try:
                result = fn(conn.sftp, path)
            except BaseException as e:
                transport_ok = isinstance(e, StoreError) or _is_status_error(e)
                self._checkin(conn, healthy=transport_ok)
                if transport_ok:
                    if isinstance(e, OSError):
                        raise StoreError(f"{self.url}: {op} {rel}: {describe(e)}") from e
                    raise
                if not isinstance(e, OSError | EOFError | paramiko.SSHException):
                    raise
                if reused and attempt == 0 and not isinstance(e, TimeoutError):
                    log.debug("%s: %s %s: stale connection (%s), reconnecting", self.url, op, rel, describe(e))
                    continue
                err = StoreTimeout if isinstance(e, TimeoutError) else StoreError
                raise err(f"{self.url}: {op} {rel}: ssh connection failed: {describe(e)}") from e
            self._checkin(conn, healthy=True)
            return result
        raise AssertionError("unreachable")

    # -- sftp operations (run with a checked-out connection) -----------------------

    def _read_op(self, sftp: paramiko.SFTPClient, path: str, progress: Progress | None = None) -> bytes | None:
        try:
            f = sftp.open(path, "rb")
        except FileNotFoundError:
            return None
        with f:
            st = f.stat()
            if st.st_mode is not None and not stat.S_ISREG(st.st_mode):
                return None
            size = st.st_size
            f.prefetch(size)
            if progress is None:
                data = f.read()
            else:  # in pieces, so that the low-speed limit sees the bytes come
                progress.started = True
                parts = []
                while part := f.read(READ_PIECE):
                    parts.append(part)
                    progress.bytes += len(part)
                data = b"".join(parts)
        if size is not None and len(data) != size:
            raise StoreError(f"{self.url}: read {path}: truncated: got {len(data)} of {size} bytes")
        return bytes(data)

    def _exists_op(self, sftp: paramiko.SFTPClient, path: str) -> bool:
        try:
            st = sftp.stat(path)
        except FileNotFoundError:
            return False
        return st.st_mode is None or stat.S_ISREG(st.st_mode)

    def _mkdirs(self, sftp: paramiko.SFTPClient, d: str) -> None:
        """mkdir -p: create d, creating missing parents first; existing directories are fine."""
        try:
            sftp.mkdir(d, 0o755)
            return
        except FileNotFoundError:
            parent = posixpath.dirname(d)
            if parent == d:
                raise
            self._mkdirs(sftp, parent)
        except OSError as e:
            if not _is_status_error(e):
                raise
        else:
            return
        try:
            sftp.mkdir(d, 0o755)
        except OSError as e:
            if not _is_status_error(e):
                raise
        # "exists" is a generic SFTP failure: check what is there (stat raises if nothing)
        if not stat.S_ISDIR(sftp.stat(d).st_mode or 0):
            raise OSError(f"{d} exists and is not a directory")

    def _write_op(self, sftp: paramiko.SFTPClient, path: str, data: bytes) -> None:
        d, name = posixpath.split(path)
        tmp = f"{d}/.{name}.tmp.{secrets.token_hex(6)}"
        try:
            f = sftp.open(tmp, "wb")
        except FileNotFoundError:
            self._mkdirs(sftp, d)
            f = sftp.open(tmp, "wb")
        try:
            with f:
                f.set_pipelined(True)
                f.write(data)
                f.chmod(0o644)
            try:
                sftp.posix_rename(tmp, path)
            except OSError as e:
                if type(e) is not OSError or e.errno is not None:
                    raise
                # generic failure: probably no posix-rename@openssh.com; plain SFTP rename
                # refuses to overwrite, so remove the target first
                try:
                    sftp.remove(path)
                except FileNotFoundError:
                    pass
                sftp.rename(tmp, path)
        except BaseException:
            try:
                transport = sftp.get_channel().get_transport()
                if transport is not None and transport.is_active():
                    sftp.remove(tmp)
            except Exception:  # noqa: BLE001 - best effort, the original error matters
                pass
            raise

    # -- the Store interface -------------------------------------------------------

    def read(self, rel: str) -> bytes | None:
        """The whole file at `rel`, or None if it does not exist."""
        return self._run("read", rel, self._read_op)

    def write(self, rel: str, data: bytes) -> None:
        """Atomically (temp file + rename) write `data` at `rel`, creating directories."""
        payload = bytes(data)
        self._run("write", rel, lambda sftp, path: self._write_op(sftp, path, payload))

    def exists(self, rel: str) -> bool:
        """True if a regular file exists at `rel`."""
        return self._run("exists", rel, self._exists_op)

    def close(self) -> None:
        """Close every pooled connection (busy ones are closed when handed back)."""
        with self._cond:
            self._gen += 1
            idle, self._idle = self._idle, []
            self._live -= len(idle)
            self._cond.notify_all()
        for conn in idle:
            conn.close()

    def _threads(self) -> trio.CapacityLimiter:
        if self._limiter is None:
            self._limiter = trio.CapacityLimiter(self.max_connections)
        return self._limiter

    async def fetch(self, rel: str) -> bytes | None:
        """Async read in a worker thread, under the low-speed limit (an abandoned thread ends
        at the channel's timeout)."""
        def read(p: Progress) -> bytes | None:
            return self._run("read", rel, lambda sftp, path: self._read_op(sftp, path, p))

        return await within_low_speed(self.low_speed, f"{self.url}: read {rel}",
                                      lambda p: run_abandonable(read, p, limiter=self._threads()))

    async def store(self, rel: str, data: bytes) -> None:
        """Async write in a worker thread."""
        await run_abandonable(self.write, rel, data, limiter=self._threads())

    async def contains(self, rel: str) -> bool:
        """Async exists in a worker thread."""
        return await run_abandonable(self.exists, rel, limiter=self._threads())

    async def aclose(self) -> None:
        """Async close."""
        await trio.to_thread.run_sync(self.close)

    async def warm(self, n: int) -> None:
        """Nothing opened ahead (see HttpStore.warm): the pool opens its few connections (at most
        max_connections, each a key exchange and a login) as requests need them."""

    def __enter__(self) -> SshStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
