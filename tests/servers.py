"""Real throwaway servers (nginx/WebDAV, redis, sshd) for integration tests.

Every server binds 127.0.0.1 on a free port, keeps all of its state, config
and logs in a private work directory and is started/stopped by the test, never
through the system service manager.  The classes have no pytest dependency;
the pytest fixtures are at the bottom of the module.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import http.client
import http.server
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import paramiko
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

HOST = "127.0.0.1"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
_POLL_INTERVAL = 0.02
_LOG_TAIL_BYTES = 4000


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def port_open(port: int, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections on 127.0.0.1:port."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def _tail(*paths: Path, nbytes: int = _LOG_TAIL_BYTES) -> str:
    """The last bytes of each existing log file, for error messages."""
    parts = []
    for p in paths:
        try:
            with p.open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - nbytes))
                data = f.read().decode("utf-8", "replace")
        except OSError:
            continue
        parts.append(f"--- {p} ---\n{data}")
    return "\n".join(parts) or "(no log output)"


def _proc_starttime(pid: int) -> int | None:
    """Kernel start time of pid (to guard against pid reuse), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The comm field may contain spaces/parens: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])  # field 22 overall


def _alive(pid: int, starttime: int) -> bool:
    """True if (pid, starttime) is still a running, non-zombie process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0] not in ("Z", "X") and int(fields[19]) == starttime


def _descendants(root_pid: int) -> list[tuple[int, int]]:
    """(pid, starttime) of every live descendant of root_pid (via /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out: list[tuple[int, int]] = []
    stack = list(children.get(root_pid, []))
    while stack and len(out) < 10000:
        pid = stack.pop()
        st = _proc_starttime(pid)
        if st is not None:
            out.append((pid, st))
        stack.extend(children.get(pid, []))
    return out


def _wait_for(
    ready: Callable[[], bool],
    proc: subprocess.Popen[bytes],
    what: str,
    logs: tuple[Path, ...],
    timeout: float = START_TIMEOUT,
) -> None:
    """Poll ready() until true; raise RuntimeError (with log tail) on exit/timeout."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / _POLL_INTERVAL) + 1):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} during startup\n{_tail(*logs)}")
        if ready():
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(_POLL_INTERVAL)
    raise RuntimeError(f"{what} not ready after {timeout:.0f}s\n{_tail(*logs)}")


class _Server:
    """Common subprocess handling: start in own session, log to file, reliable stop."""

    name = "server"
    stop_signal = signal.SIGTERM

    def __init__(self, workdir: Path, port: int | None) -> None:
        self.workdir = Path(workdir).resolve()
        self.port: int = port if port is not None else free_port()
        self.log_path = self.workdir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    # -- to be provided by subclasses ----------------------------------
    def _prepare(self) -> None:
        """Create config files etc. (called before every start)."""

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def _logs(self) -> tuple[Path, ...]:
        return (self.log_path,)

    # -- lifecycle ------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """Pid of the main server process, None when not running."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        """Start the server and wait (bounded) until it serves requests."""
        if self.running:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._prepare()
        cmd = self._command()
        with self.log_path.open("ab") as log:
            log.write(f"=== {time.strftime('%H:%M:%S')} start: {' '.join(cmd)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        try:
            _wait_for(self._ready, self._proc, f"{self.name} on port {self.port}", self._logs())
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the server and all its descendants; wait (bounded) for them to exit."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            # Freeze the main process so it cannot fork while we snapshot its tree
            # (sshd's per-connection children survive the listener otherwise).
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGSTOP)
            tree = _descendants(proc.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, self.stop_signal)
                os.kill(proc.pid, signal.SIGCONT)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=timeout)
            # Leftover descendants (e.g. sshd connection handlers): kill and wait
            # (bounded) until they are gone, so their sockets are closed too.
            for pid, starttime in tree:
                if _proc_starttime(pid) == starttime:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout
            for _ in range(int(timeout / _POLL_INTERVAL) + 1):
                if not any(_alive(pid, st) for pid, st in tree) or time.monotonic() > deadline:
                    break
                time.sleep(_POLL_INTERVAL)
        else:
            proc.wait()

    def restart(self) -> Self:
        """Stop and start again on the same port with the same state directory."""
        self.stop()
        return self.start()

    def log_tail(self) -> str:
        """Tail of this server's log files (for debugging failed tests)."""
        return _tail(*self._logs())

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} port={self.port} running={self.running} workdir={self.workdir}>"


# ---------------------------------------------------------------------------
# nginx (static files + WebDAV PUT/DELETE)
# ---------------------------------------------------------------------------


@functools.cache
def _nginx_build_info() -> str:
    res = subprocess.run(["nginx", "-V"], capture_output=True, text=True, timeout=10, check=False)
    return res.stdout + res.stderr


def _nq(value: Path | str) -> str:
    """Quote a value for nginx.conf."""
    s = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


class Nginx(_Server):
    """nginx serving ``root`` read-only, or with WebDAV PUT/DELETE when put=True."""

    name = "nginx"
    stop_signal = signal.SIGTERM  # fast shutdown; SIGQUIT would wait for in-flight requests

    def __init__(self, root: Path, workdir: Path, put: bool = True, port: int | None = None,
                 access_log: bool = False) -> None:
        super().__init__(workdir, port)
        self.root = Path(root).resolve()
        self.put = put
        self.access_log = self.workdir / "access.log" if access_log else None
        self.conf_path = self.workdir / "nginx.conf"
        self.error_log = self.workdir / "error.log"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def _body_temp_dir(self) -> Path:
        """A client_body_temp_path on root's filesystem so PUT's rename is atomic."""
        root_dev = self.root.stat().st_dev
        if self.workdir.stat().st_dev == root_dev:
            return self.workdir / "client_body_temp"
        sibling = self.root.parent / f".{self.root.name}.nginx_body_temp"
        if self.root.parent.stat().st_dev == root_dev:
            return sibling
        return self.root / ".nginx_body_temp"  # root is a mount point; hidden via location below

    def _prepare(self) -> None:
        info = _nginx_build_info()
        if self.put and "--with-http_dav_module" not in info:
            raise RuntimeError("this nginx has no http_dav_module (needed for put=True)")
        self.root.mkdir(parents=True, exist_ok=True)
        temps = {"client_body_temp_path": self._body_temp_dir()}
        for mod in ("proxy", "fastcgi", "uwsgi", "scgi"):
            if f"--without-http_{mod}_module" not in info:
                temps[f"{mod}_temp_path"] = self.workdir / f"{mod}_temp"
        for d in temps.values():
            d.mkdir(parents=True, exist_ok=True)
        temp_lines = "\n".join(f"    {k} {_nq(v)};" for k, v in temps.items())
        user_line = "user root root;" if os.geteuid() == 0 else ""
        dav = ""
        if self.put:
            dav = """
        dav_methods PUT DELETE;
        create_full_put_path on;
        dav_access user:rw group:r all:r;"""
        hide_temp = ""
        body_temp = temps["client_body_temp_path"]
        if body_temp.is_relative_to(self.root):
            hide_temp = f"\n        location ^~ /{body_temp.name}/ {{ return 404; }}"
        self.conf_path.write_text(
            f"""{user_line}
worker_processes 1;
daemon off;
master_process on;
pid {_nq(self.workdir / "nginx.pid")};
error_log {_nq(self.error_log)} warn;

events {{
    worker_connections 1024;
}}

http {{
    default_type application/octet-stream;
    log_format started '$msec $request_time "$request" $status';
    access_log {_nq(self.access_log) + " started" if self.access_log else "off"};
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    client_max_body_size 0;
{temp_lines}

    server {{
        listen {HOST}:{self.port};
        server_name localhost;
        root {_nq(self.root)};
        autoindex off;{dav}{hide_temp}
    }}
}}
"""
        )

    def requests(self, method: str = "GET") -> list[str]:
        """The paths of the `method` requests served so far, in the order they began (nginx logs
        a request when it ends: its start is that time less its duration; needs access_log=True)."""
        return [path for _, path in self.timed_requests(method)]

    def timed_requests(self, method: str = "GET") -> list[tuple[float, str]]:
        """(when it began, in seconds of the epoch, to the millisecond; path) of each `method`
        request served so far, in that order."""
        assert self.access_log is not None, "started without access_log"
        out: list[tuple[float, int, str]] = []
        if self.access_log.exists():
            for n, line in enumerate(self.access_log.read_text().splitlines()):
                parts = line.split('"')
                times, req = parts[0].split(), parts[1].split() if len(parts) > 1 else []
                if len(req) == 3 and req[0] == method and len(times) == 2:
                    out.append((float(times[0]) - float(times[1]), n, req[1]))
        return [(t, path) for t, _, path in sorted(out)]

    def _command(self) -> list[str]:
        return ["nginx", "-p", f"{self.workdir}/", "-e", str(self.error_log), "-c", str(self.conf_path)]

    def _logs(self) -> tuple[Path, ...]:
        return (self.log_path, self.error_log)

    def _ready(self) -> bool:
        if not port_open(self.port, timeout=0.2):
            return False
        conn = http.client.HTTPConnection(HOST, self.port, timeout=1)
        try:
            conn.request("GET", "/")
            conn.getresponse().read()
            return True
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()


# ---------------------------------------------------------------------------
# redis
# ---------------------------------------------------------------------------


class Redis(_Server):
    """A non-persistent redis-server, password-protected by default."""

    name = "redis"

    def __init__(self, workdir: Path, password: str | None = "testpass", port: int | None = None) -> None:
        super().__init__(workdir, port)
        self.password = password

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password is not None else ""
        return f"redis://{auth}{HOST}:{self.port}/0"

    def _command(self) -> list[str]:
        cmd = [
            shutil.which("redis-server") or "redis-server",
            "--port", str(self.port),
            "--bind", HOST,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--daemonize", "no",
            "--logfile", "",
        ]  # fmt: skip
        if self.password is not None:
            cmd += ["--requirepass", self.password]
        return cmd

    def client(self, **kwargs: Any) -> redis.Redis:
        """A new redis client authenticated with this server's password (kwargs override).

        Unlike redis-py's default (3 retries with exponential backoff, which also
        applies to AuthenticationError and makes a stopped server take seconds to
        notice) it retries once, immediately: enough to replace a pooled
        connection that went stale across a restart.
        """
        opts: dict[str, Any] = {
            "host": HOST,
            "port": self.port,
            "password": self.password,
            "decode_responses": False,
            "retry": Retry(NoBackoff(), 1),
        }
        opts.update(kwargs)
        return redis.Redis(**opts)

    def _ready(self) -> bool:
        if not port_open(self.port, timeout=0.2):
            return False
        r = self.client(socket_connect_timeout=0.5, socket_timeout=1, retry=Retry(NoBackoff(), 0))
        try:
            return bool(r.ping())
        except redis.RedisError:
            return False
        finally:
            r.close()


# ---------------------------------------------------------------------------
# sshd (SFTP, public-key auth as the current user)
# ---------------------------------------------------------------------------

PRIVSEP_DIR = Path("/run/sshd")


def _keygen(path: Path) -> None:
    """Create an unencrypted ed25519 key pair at path / path.pub if missing."""
    if path.exists() and path.with_suffix(".pub").exists():
        return
    for p in (path, path.with_suffix(".pub")):
        p.unlink(missing_ok=True)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )


def _pubkey(path: Path) -> str:
    """'type base64' of a .pub file, without the comment."""
    return " ".join(path.read_text().split()[:2])


class Sshd(_Server):
    """An sshd with its own host key, accepting one generated client key for the current user."""

    name = "sshd"

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        super().__init__(workdir, port)
        self.host_key = self.workdir / "ssh_host_ed25519_key"
        self.client_key = self.workdir / "id_ed25519"
        self.authorized_keys = self.workdir / "authorized_keys"
        self.known_hosts = self.workdir / "known_hosts"
        self.config_path = self.workdir / "sshd_config"
        self.user = "root" if os.geteuid() == 0 else os.environ.get("USER", "root")

    def url(self, path: str = "/") -> str:
        """ssh:// URL for an absolute path on this server."""
        return f"ssh://{self.user}@{HOST}:{self.port}{path}"

    def _prepare(self) -> None:
        # sshd refuses to start without its privilege separation directory.
        if not PRIVSEP_DIR.is_dir():
            PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
            os.chmod(PRIVSEP_DIR, 0o755)
        _keygen(self.host_key)
        _keygen(self.client_key)
        self.authorized_keys.write_text(_pubkey(self.client_key.with_suffix(".pub")) + "\n")
        self.known_hosts.write_text(f"[{HOST}]:{self.port} {_pubkey(self.host_key.with_suffix('.pub'))}\n")
        self.config_path.write_text(
            f"""Port {self.port}
ListenAddress {HOST}
HostKey "{self.host_key}"
PidFile "{self.workdir / "sshd.pid"}"
AuthorizedKeysFile "{self.authorized_keys}"
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin yes
StrictModes no
UsePAM no
UseDNS no
PrintMotd no
MaxStartups 100:30:200
MaxSessions 100
Subsystem sftp internal-sftp
LogLevel ERROR
"""
        )

    def _command(self) -> list[str]:
        return ["/usr/sbin/sshd", "-D", "-e", "-f", str(self.config_path)]

    def connect(self, timeout: float = 5.0) -> paramiko.SSHClient:
        """A paramiko SSHClient connected with the client key, verifying the host key."""
        client = paramiko.SSHClient()
        client.load_host_keys(str(self.known_hosts))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.connect(
                HOST,
                port=self.port,
                username=self.user,
                key_filename=str(self.client_key),
                look_for_keys=False,
                allow_agent=False,
                timeout=timeout,
                banner_timeout=timeout,
                auth_timeout=timeout,
            )
        except BaseException:
            client.close()
            raise
        return client

    def _banner_ok(self) -> bool:
        """Cheap pre-check: the port answers with an SSH banner (not just a backlog)."""
        try:
            with socket.create_connection((HOST, self.port), timeout=0.5) as s:
                return s.recv(256).startswith(b"SSH-")
        except OSError:
            return False

    def _ready(self) -> bool:
        if not self._banner_ok():
            return False
        try:
            client = self.connect(timeout=2.0)
        except (OSError, paramiko.SSHException):
            return False
        try:
            client.open_sftp().close()
            return True
        except (OSError, paramiko.SSHException):
            return False
        finally:
            client.close()


# ---------------------------------------------------------------------------
# a stor that misbehaves on purpose
# ---------------------------------------------------------------------------


class BadStor:
    """A real HTTP server (threads, in this process) serving a stor directory read-only, that can
    misbehave on the paths under `prefixes` (default: blobs): `mode` "ok", "trickle" (200, the
    right length, then the body one byte every `interval` seconds), "silent" (accepts, reads the
    request, answers only once the mode is changed, closes after 60 s) or "html" (200 with an
    HTML page for every path). Every GET is counted by path in `requests`. Settable while running."""

    def __init__(self, root: Path, mode: str = "ok", interval: float = 0.5,
                 prefixes: tuple[str, ...] = ("blobs/",)) -> None:
        import http.server
        import threading

        self.root = root
        self.mode = mode
        self.interval = interval
        self.prefixes = prefixes
        self.requests: collections.Counter[str] = collections.Counter()
        self._stop = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def handle(self) -> None:
                try:
                    super().handle()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a fetch cancelled) before the answer

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                rel = urllib.parse.unquote(self.path.lstrip("/"))
                outer.requests[rel] += 1
                mode = outer.mode if rel.startswith(outer.prefixes) else "ok"
                if mode == "silent":
                    # until the mode changes (then answered as the new mode says) or stop()
                    for _ in range(1200):
                        if outer.mode != "silent" or outer._stop.wait(0.05):
                            break
                    mode = outer.mode
                    if mode == "silent" or outer._stop.is_set():
                        self.close_connection = True
                        return
                if mode == "html":
                    body = b"<html><body>Welcome to our portal</body></html>\n"
                else:
                    path = outer.root / rel
                    if ".." in rel.split("/") or not path.is_file():
                        self.send_error(404)
                        return
                    body = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "text/html" if mode == "html" else "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if mode != "trickle":
                    self.wfile.write(body)
                    return
                for i in range(len(body)):
                    if outer._stop.wait(outer.interval):
                        break
                    try:
                        self.wfile.write(body[i:i + 1])
                        self.wfile.flush()
                    except OSError:  # the client gave up
                        break
                self.close_connection = True

        self._server = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def blob_requests(self) -> int:
        return sum(n for rel, n in self.requests.items() if rel.startswith("blobs/"))

    def start(self) -> BadStor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def __enter__(self) -> BadStor:
        return self.start()

    def __exit__(self, *a: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------
# pytest fixtures
# ---------------------------------------------------------------------------


class ForwardProxy(http.server.ThreadingHTTPServer):
    """A real (tiny) HTTP forward proxy: absolute-URI requests relayed to the origin, counted."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.seen: Counter[tuple[str, str, str]] = Counter()  # (method, host:port, path)
        self.lock = threading.Lock()
        self.active = 0  # requests being relayed now
        self.max_active = 0  # the most at once since the last reset

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: ForwardProxy

    def log_message(self, *a: object) -> None:
        pass

    def _relay(self) -> None:
        u = urlsplit(self.path)
        if u.scheme != "http" or not u.netloc:
            self.send_error(400, "not a proxy request")
            return
        srv = self.server
        with srv.lock:
            srv.seen[(self.command, u.netloc, u.path)] += 1
            srv.active += 1
            srv.max_active = max(srv.max_active, srv.active)
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else None
        conn = http.client.HTTPConnection(u.hostname or "", u.port, timeout=10)
        try:
            conn.request(self.command, u.path + (f"?{u.query}" if u.query else ""), body=body,
                         headers={"Content-Length": str(n)} if body is not None else {})
            r = conn.getresponse()
            data = r.read()
        except OSError:
            self.send_error(502)
            return
        finally:
            conn.close()
            with srv.lock:
                srv.active -= 1
        self.send_response(r.status)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_HEAD = _relay


@pytest.fixture
def nginx_stor(tmp_path: Path) -> Iterator[Nginx]:
    """nginx with WebDAV PUT/DELETE serving tmp_path/"stor" (available as .root)."""
    stor = tmp_path / "stor"
    stor.mkdir(exist_ok=True)
    with Nginx(stor, tmp_path / "nginx", put=True) as server:
        yield server


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Redis]:
    """redis-server with password "testpass"."""
    with Redis(tmp_path / "redis", password="testpass") as server:
        yield server


@pytest.fixture
def sshd_server(tmp_path: Path) -> Iterator[Sshd]:
    """sshd accepting sshd_server.client_key for root, host key in .known_hosts."""
    with Sshd(tmp_path / "sshd") as server:
        yield server
