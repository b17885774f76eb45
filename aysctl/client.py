"""Client side of the aysfsd control protocol.

One request per Unix-socket connection: the client sends one JSON object and a newline
(UTF-8, at most 64 KiB); aysfsd answers with zero or more ``{"event": ...}`` lines and one
final line holding ``"ok": true`` or ``"ok": false, "error": ..., "code": ...``, then closes.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

from aysfsd.config import ConfigError, MainConfig, load

DEFAULT_CONFIG = "/etc/aysfs/aysfs.toml"
DEFAULT_SOCKET: str = MainConfig.control_socket
MAX_REQUEST = 64 * 1024
MAX_LINE = 64 * 1024 * 1024  # refuse a reply line larger than this (a runaway server)
CONNECT_TIMEOUT = 10.0  # used when `request` runs without a read timeout (follow mode)

# exit codes of aysctl's control commands
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_RUNNING, EXIT_PERMISSION, EXIT_UNKNOWN_AYS = 0, 1, 2, 3, 4, 5
_CODE_EXIT = {"permission": EXIT_PERMISSION, "unknown-ays": EXIT_UNKNOWN_AYS}

Reply = dict[str, Any]


class ControlError(Exception):
    """A failed control request. ``exit_code`` is what aysctl exits with; ``code`` and ``reply``
    are the daemon's error code and final line when the daemon answered ``"ok": false``."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED, code: str | None = None,
                 reply: Reply | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.code = code
        self.reply = reply

    def __str__(self) -> str:
        return self.message


def find_socket(socket_arg: str | None, config_arg: str | None) -> str:
    """The control socket path: ``--socket``, else ``control_socket`` of ``--config`` (an invalid
    file is an error, exit 2), else of /etc/aysfs/aysfs.toml if it exists and is valid, else the default."""
    if socket_arg:
        return socket_arg
    if config_arg:
        try:
            return load(config_arg).main.control_socket
        except ConfigError as e:
            raise ControlError(str(e), EXIT_USAGE) from None
    if os.path.exists(DEFAULT_CONFIG):
        try:
            return load(DEFAULT_CONFIG).main.control_socket
        except ConfigError:
            pass  # a broken system config must not stop aysctl from reaching the daemon
    return DEFAULT_SOCKET


def not_running(path: str) -> ControlError:
    return ControlError(f"aysfsd is not running (no daemon listening on {path}). "
                        "Start it with: systemctl start aysfsd", EXIT_NOT_RUNNING)


RETRY_PAUSE = (0.02, 0.5)  # first and longest pause between tries while the daemon is busy


def _connect(sock: socket.socket, path: str, deadline: float) -> None:
    """Connect, waiting up to `deadline` (monotonic) while the daemon's listen backlog is full
    (a non-blocking connect on a Unix socket fails at once with EAGAIN then)."""
    pause = RETRY_PAUSE[0]
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            if time.monotonic() + pause >= deadline:
                raise ControlError(f"timed out connecting to aysfsd on {path}: it is busy "
                                   "(its listen backlog stayed full)") from None
            time.sleep(pause)
            pause = min(pause * 2, RETRY_PAUSE[1])
        except OSError as e:
            raise _connect_error(e, path) from None


def _connect_error(e: OSError, path: str) -> ControlError:
    if isinstance(e, TimeoutError):
        return ControlError(f"timed out connecting to aysfsd on {path}")
    if isinstance(e, (FileNotFoundError, ConnectionRefusedError)) or e.errno in (errno.ENOENT, errno.ECONNREFUSED):
        return not_running(path)
    if isinstance(e, PermissionError) or e.errno in (errno.EACCES, errno.EPERM):
        return ControlError(f"permission denied on {path}: run as root or as a member of group 'aysfs'",
                            EXIT_PERMISSION)
    return ControlError(f"cannot connect to aysfsd on {path}: {e.strerror or e}")


def _closed(path: str) -> ControlError:
    return ControlError(f"aysfsd closed the connection on {path} without a final reply "
                        "(did it stop or restart? see: journalctl -u aysfsd)")


def _lines(sock: socket.socket, path: str, timeout: float | None) -> Iterator[bytes]:
    """The newline-terminated lines read from `sock`, then a trailing unterminated one if any."""
    buf = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise ControlError(f"no answer from aysfsd on {path} within {timeout:g} s") from None
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            if buf.strip():
                yield buf
            return
        buf += chunk
        while (nl := buf.find(b"\n")) >= 0:
            line, buf = buf[:nl], buf[nl + 1:]
            yield line
        if len(buf) > MAX_LINE:
            raise ControlError(f"aysfsd sent a reply line longer than {MAX_LINE} bytes on {path}")


def _decode(line: bytes) -> Reply:
    try:
        msg = json.loads(line)
    except ValueError:
        shown = line[:200].decode("utf-8", "replace")
        raise ControlError(f"aysfsd sent a line that is not JSON: {shown!r}") from None
    if not isinstance(msg, dict):
        raise ControlError(f"aysfsd sent a JSON {type(msg).__name__} instead of an object: {msg!r:.200}")
    return msg


def _failure(msg: Reply) -> ControlError:
    code = msg.get("code")
    code = code if isinstance(code, str) else None
    error = msg.get("error")
    text = error if isinstance(error, str) and error else f"aysfsd reported a failure (code {code or 'none'})"
    return ControlError(text, _CODE_EXIT.get(code or "", EXIT_FAILED), code, msg)


def request(path: str, obj: dict[str, Any], timeout: float | None = 30.0) -> Iterator[Reply]:
    """Send request `obj` to the daemon at `path` and yield every reply line: the events, then the
    final ``"ok": true`` object. Raises ControlError for a failure reply or a transport problem.

    `timeout` bounds each read (so a stream of events never times out while it keeps coming);
    None waits forever, for ``log.tail`` with ``follow``.
    """
    data = (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
    if len(data) > MAX_REQUEST:
        raise ControlError(f"request too large ({len(data)} bytes, at most {MAX_REQUEST})", EXIT_USAGE)
    deadline = time.monotonic() + (CONNECT_TIMEOUT if timeout is None else timeout)
    pause = RETRY_PAUSE[0]
    while True:
        try:
            yield from _request_once(path, data, timeout, deadline)
            return
        except ControlError as e:
            # "busy": refused before anything else was sent, so trying again is safe
            if e.code != "busy" or time.monotonic() + pause >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, RETRY_PAUSE[1])


def _request_once(path: str, data: bytes, timeout: float | None, deadline: float) -> Iterator[Reply]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(CONNECT_TIMEOUT if timeout is None else timeout)
        _connect(sock, path, deadline)
        try:
            sock.sendall(data)
        except TimeoutError:
            raise ControlError(f"timed out sending the request to aysfsd on {path}") from None
        except OSError:
            raise _closed(path) from None
        sock.settimeout(timeout)
        for line in _lines(sock, path, timeout):
            if not line.strip():
                continue
            msg = _decode(line)
            if "ok" in msg and "event" not in msg:
                if msg["ok"] is not True:
                    raise _failure(msg)
                yield msg
                return
            yield msg
    raise _closed(path)


def call(path: str, obj: dict[str, Any], timeout: float | None = 30.0) -> Reply:
    """Send `obj` and return the final ``"ok": true`` object, ignoring any events."""
    final: Reply = {}
    for msg in request(path, obj, timeout):
        final = msg
    return final


__all__ = [
    "DEFAULT_CONFIG", "DEFAULT_SOCKET", "ControlError", "Reply", "call", "find_socket", "request",
]
