"""Load and validate the aysfsd TOML configuration.

Tables: ``[main]``, ``[[stor]]``, ``[[cache]]``, ``[[ays]]`` and ``[debug]``. Dotted keys
(``cache.local = true``) are flattened to their dotted names. Every problem found is
collected and reported at once as ``FILE:LINE: key: problem. Fix: ...``.
"""

from __future__ import annotations

import difflib
import functools
import math
import os
import posixpath
import re
import socket
import tomllib
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

from .tree.signing import check_public

GiB = 1024**3
LOW_SPEED_LIMIT = 1024  # bytes/s: the default of low_speed_limit (like CVMFS_LOW_SPEED_LIMIT)
LOW_SPEED_TIME = 10.0  # seconds: the default of low_speed_time
LOG_LEVELS = ("debug", "info", "warning", "error")
FUSE_SPIN_US = 200  # microseconds: the default of fuse_spin_us (see packaging/pyfuse3/README.md)
FUSE_SPIN_MAX = 1000


class ConfigError(Exception):
    """Unreadable or invalid configuration; ``str(e)`` lists every problem, one per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems: list[str] = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class StorConfig:
    url: str
    expiration: int = 0
    timeout: float = 10.0
    proxy: str | None = None
    ssh_key: str | None = None
    ssh_known_hosts: str | None = None
    ssh_accept_unknown_host: bool = False
    low_speed_limit: int | None = None  # None: [main]'s
    low_speed_time: float | None = None


@dataclass(frozen=True)
class GridCacheConfig:
    mnt: str
    timeout: float = 10.0
    proxy: str | None = None
    writable: bool = True
    low_speed_limit: int | None = None  # None: [main]'s
    low_speed_time: float | None = None


@dataclass(frozen=True)
class AysConfig:
    id: str
    mnt: str
    name: str
    cache_local: bool = True
    cache_grid: bool = True
    prefetch_local: bool = False
    prefetch_grid: bool = False
    debug: bool = False
    import_hints: bool = True  # follow a cold Python start's imports ahead (aysfsd.fuse.importhints)
    trusted_keys: tuple[str, ...] | None = None  # None: [main] trusted_keys apply


@dataclass(frozen=True)
class DebugConfig:
    debug_filter: tuple[str, ...] = ()
    redis_addr: str = "127.0.0.1"
    redis_port: int = 6379
    redis_passwd: str = ""
    redis_db: int = 0

    def __post_init__(self) -> None:
        _compiled(self.debug_filter)  # fail early on a bad regex

    def matches(self, path: str) -> bool:
        """True if some filter fully matches `path` (relative to the mount root, e.g. "lib/a.py")."""
        return any(p.fullmatch(path) for p in _compiled(self.debug_filter))


@functools.cache
def _compiled(patterns: tuple[str, ...]) -> tuple[re.Pattern[str], ...]:
    """Compile a filter tuple once (kept out of DebugConfig so asdict()/eq/hash stay plain)."""
    return tuple(re.compile(p) for p in patterns)


@dataclass(frozen=True)
class MinFree:
    """`cache_min_free`: a share of the cache's filesystem ("5%") or bytes ("2GiB") kept free."""

    percent: float = 5.0
    size: int = 0  # used when percent is 0

    def bytes_of(self, total: int) -> int:
        """Bytes to keep free on a filesystem of `total` bytes."""
        return int(total * self.percent / 100) if self.percent else self.size

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent else str(self.size)


def parse_min_free(value: str) -> MinFree:
    """ "5%" (0 to 90) or a size ("2GiB", see parse_size)."""
    v = value.strip()
    if v.endswith("%"):
        pct = float(Decimal(v[:-1].strip()))
        if not 0 <= pct <= 90:
            raise ValueError(f"{value!r}: a share between 0% and 90%")
        return MinFree(pct, 0)
    return MinFree(0.0, parse_size(v))


@dataclass(frozen=True)
class MainConfig:
    id: str = field(default_factory=socket.gethostname)
    cache_dir: str = "/var/cache/aysfs"
    cache_size: int = 10 * GiB
    cache_min_free: MinFree = MinFree()
    control_socket: str = "/run/aysfs/aysfsd.sock"
    fuse_root: str = "/run/aysfs/root"
    fetch_timeout: float = 30.0
    low_speed_limit: int = LOW_SPEED_LIMIT  # a transfer below it (bytes/s) for low_speed_time fails (0: off)
    low_speed_time: float = LOW_SPEED_TIME
    log_level: str = "info"
    trusted_keys: tuple[str, ...] = ()  # refs must be signed by one of these (none: unsigned accepted)
    metrics_listen: str = ""  # HOST:PORT of the Prometheus /metrics endpoint ("" = off)
    profile_idle: float = 5.0  # seconds without a new need that end a recorded start (profiles)
    fuse_spin_us: int = FUSE_SPIN_US  # the request loop reads again this long before it sleeps (0: off)


@dataclass(frozen=True)
class Config:
    path: str
    main: MainConfig
    stors: tuple[StorConfig, ...]
    caches: tuple[GridCacheConfig, ...]
    ays: tuple[AysConfig, ...]
    debug: DebugConfig


def default_name(ays_id: str) -> str:
    """Mount name for an ays id: chars outside [A-Za-z0-9._-] and leading dots become "_"."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", ays_id)
    stripped = name.lstrip(".")
    return "_" * (len(name) - len(stripped)) + stripped


_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(i)?)?(b)?\s*", re.I)


def parse_size(value: str) -> int:
    """Parse "512MiB", "10G", "1.5GB", "100k" (powers of 1024, case-insensitive) into bytes."""
    m = _SIZE_RE.fullmatch(value)
    if not m:
        raise ValueError(f"not a size: {value!r}")
    mult = 1024 ** (" kmgt".index(m.group(2).lower()) if m.group(2) else 0)
    return int(Decimal(m.group(1)) * mult)


# --- locating keys in the raw text (tomllib reports no positions) -------------------------

_PART = r"""(?:"(?:[^"\\]|\\.)*"|'[^']*'|[A-Za-z0-9_-]+)"""
_DOTTED = rf"{_PART}(?:\s*\.\s*{_PART})*"
_KEY_RE = re.compile(rf"\s*({_DOTTED})\s*=")
_HEADER_RE = re.compile(rf"\s*(\[\[?)\s*({_DOTTED})\s*(\]\]?)")
TableId = tuple[str, int | None]
_TOP: TableId = ("", None)


def _split_key(dotted: str) -> list[str]:
    parts = re.findall(_PART, dotted)
    return [p[1:-1] if p[:1] in "\"'" else p for p in parts]


class _Locator:
    """Line numbers of table headers and keys, by (table name, array index) and dotted key."""

    def __init__(self, text: str) -> None:
        self.headers: dict[TableId, int] = {}
        self.keys: dict[tuple[TableId, str], int] = {}
        self.header_list: list[tuple[int, str, bool]] = []
        counts: dict[str, int] = {}
        current, prefix, in_multiline = _TOP, "", ""
        for no, line in enumerate(text.split("\n"), 1):
            if in_multiline:
                if line.count(in_multiline) % 2:
                    in_multiline = ""
                continue
            m = _HEADER_RE.match(line)
            if m and (m.group(1) == "[[") == (m.group(3) == "]]"):
                parts = _split_key(m.group(2))
                name, array = ".".join(parts), m.group(1) == "[["
                self.header_list.append((no, name, array))
                if array:
                    counts[name] = counts.get(name, 0) + 1
                    current, prefix = (name, counts[name] - 1), ""
                else:
                    current = (parts[0], counts[parts[0]] - 1 if parts[0] in counts else None)
                    prefix = ".".join(parts[1:])
                    if prefix:
                        self.keys.setdefault((current, prefix), no)
                        self.headers.setdefault((name, None), no)
                        prefix += "."
                self.headers.setdefault(current, no)
                continue
            m = _KEY_RE.match(line)
            if m:
                self.keys.setdefault((current, prefix + ".".join(_split_key(m.group(1)))), no)
            for quote in ('"""', "'''"):
                if line.count(quote) % 2:
                    in_multiline = quote
                    break

    def line(self, tid: TableId, key: str = "") -> int:
        """Line of `key` in table `tid` (or of its closest dotted parent), else the header, else 1."""
        parts = key.split(".") if key else []
        for n in range(len(parts), 0, -1):
            if (tid, ".".join(parts[:n])) in self.keys:
                return self.keys[(tid, ".".join(parts[:n]))]
        return self.headers.get(tid, 1)

    def top(self, name: str) -> int:
        """Line where top-level key or table `name` first appears, else 1."""
        for no, hname, _ in self.header_list:
            if hname == name or hname.startswith(name + "."):
                return min(no, self.keys.get((_TOP, name), no))
        return self.keys.get((_TOP, name), 1)


# --- messages shared by the syntax and the semantic checks ---------------------------------

_REGEX_HINT = (
    "regular expressions are easiest as TOML literal strings in single quotes, e.g. '.*\\.py', "
    'or double the backslash: ".*\\\\.py"'
)
_AYS_HINT = (
    "grid caches are top-level [[cache]] and stors top-level [[stor]] "
    "(the seed's [[ays.cache]] / [[ays.stor]]); [[ays]] is only for mounts"
)


def _shape_message(name: str, array: bool) -> str | None:
    """Message for a table written with the wrong number of brackets, else None."""
    if array and name in ("main", "debug"):
        return (f"[[{name}]] declares an array of tables; write [{name}] (single brackets): "
                f"there is one {name} section")
    if not array and name in ("stor", "cache", "ays"):
        return (f"[{name}] declares a single table; write [[{name}]] (double brackets): "
                f"there can be several {name} sections")
    return None


def _syntax_hint(msg: str, src: str, loc: _Locator, lineno: int) -> str:
    if msg.startswith("Unescaped '\\'"):
        return _REGEX_HINT
    if msg.startswith(("Cannot overwrite", "Cannot declare", "Cannot mutate")):
        nested = any(name in ("ays.cache", "ays.stor") for _, name, _ in loc.header_list)
        here = [name for no, name, _ in loc.header_list if no == lineno]
        if nested and here and (here[0] == "ays" or here[0].startswith("ays.")):
            return _AYS_HINT
        return "a key or table is defined twice; keep one of them (repeated sections are written [[name]])"
    if msg.startswith(("Unterminated string", "Illegal character '\\n'")):
        return "close the string on the same line; multi-line strings use \"\"\" or '''"
    if msg.startswith("Invalid value"):
        if re.search(r"=\s*(true|false|yes|no|on|off)\b", src, re.I):
            return "booleans are lowercase true or false"
        return 'strings need quotes, e.g. key = "value"; booleans are true or false'
    if msg.startswith("Expected '=' after a key"):
        return 'write key = value; quote keys with spaces or other characters, e.g. "my key" = 1'
    if msg.startswith(("Expected ']'", "Expected newline", "Invalid statement")):
        if src.startswith("["):
            return "table headers are [name] or [[name]] alone on their line"
        return "write one key = value per line; # starts a comment"
    return "see https://toml.io/en/v1.0.0 for the TOML syntax"


def _syntax_problems(path: str, text: str, err: tomllib.TOMLDecodeError) -> list[str]:
    """Turn a tomllib error into "FILE:L:C: ..." and lint the headers that parsed before it."""
    msg, lines, loc = str(err), text.split("\n"), _Locator(text)
    m = re.search(r"\s*\(at (?:line (\d+), column (\d+)|end of document)\)$", msg)
    if m:
        msg = msg[: m.start()]
    if m and m.group(1):
        lineno, col = int(m.group(1)), int(m.group(2))
    else:
        lineno = max((i for i, s in enumerate(lines, 1) if s.strip()), default=1)
        col = len(lines[lineno - 1]) + 1
    src = lines[lineno - 1].strip() if lineno <= len(lines) else ""
    quoted = f' "{src[:100]}{"..." if len(src) > 100 else ""}":' if src else ""
    hint = _syntax_hint(msg, src, loc, lineno)
    out = [(lineno, f"{path}:{lineno}:{col}:{quoted} {msg}. Fix: {hint}")]
    seen: set[str] = set()
    for no, name, array in loc.header_list:
        shape = _shape_message(name, array)
        if no < lineno and shape and name not in seen:
            seen.add(name)
            out.append((no, f"{path}:{no}: {shape}"))
    return [p for _, p in sorted(out, key=lambda p: p[0])]


# --- semantic checks ------------------------------------------------------------------------

def _show(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(v: object) -> str:
    for typ, name in ((bool, "a boolean"), (int, "an integer"), (float, "a float"), (str, "a string"),
                      (list, "an array"), (dict, "a table")):
        if isinstance(v, typ):
            return name
    return "a date/time"


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


class _Checker:
    """Collects problems, each with the line it is about."""

    def __init__(self, path: str, text: str) -> None:
        self.path, self.loc = path, _Locator(text)
        self.problems: list[tuple[int, str]] = []

    def add(self, line: int, what: str, problem: str, fix: str = "") -> None:
        fix_text = f". Fix: {fix}" if fix else ""
        self.problems.append((line, f"{self.path}:{line}: {what}{': ' if what else ''}{problem}{fix_text}"))


class _Table:
    """One table's flattened values with typed, problem-collecting accessors."""

    def __init__(self, ck: _Checker, label: str, tid: TableId, data: dict[str, Any],
                 allowed: tuple[str, ...]) -> None:
        self.ck, self.label, self.tid = ck, label, tid
        self.values = _flatten(data)
        for key in self.values:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"did you mean {close[0]}? " if close else "remove it; "
                self.err(key, "unknown key", f"{hint}valid keys in {label}: {', '.join(allowed)}")

    def err(self, key: str, problem: str, fix: str) -> None:
        self.ck.add(self.ck.loc.line(self.tid, key), f"{self.label} {key}".strip(), problem, fix)

    def _typed(self, key: str, ok: type | tuple[type, ...], what: str, fix: str) -> Any:
        v = self.values.get(key)
        oks = ok if isinstance(ok, tuple) else (ok,)
        if v is None or (isinstance(v, oks) and (bool in oks or not isinstance(v, bool))):
            return v
        self.err(key, f"expected {what}, got {_show(v)} ({_kind(v)})", fix)
        return None

    def opt_string(self, key: str, required: bool = False) -> str | None:
        if required and key not in self.values:
            self.err(key, "missing required key", f'add {key} = "..." under this {self.label}')
        fix = f'quote it, e.g. {key} = "{self.values.get(key)}"'
        v: str | None = self._typed(key, str, "a string", fix)
        if v is not None and ("\x00" in v or "\n" in v or "\r" in v):
            self.err(key, "must not contain NUL or line breaks", "remove them")
            return None
        return v

    def string(self, key: str, default: str) -> str:
        v = self.opt_string(key)
        return default if v is None else v

    def boolean(self, key: str, default: bool) -> bool:
        v = self.values.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v in (0, 1):
            self.err(key, f"expected true or false, got {v} (an integer)",
                     f"write true or false, e.g. {key} = {_show(bool(v))}")
            return default
        got = self._typed(key, bool, "true or false", "write true or false")
        return default if got is None else bool(got)

    def integer(self, key: str, default: int, lo: int, hi: int | None = None) -> int:
        v = self._typed(key, int, "a whole number", f"write an integer without quotes, e.g. {key} = {default}")
        if v is None:
            return default
        if v < lo or (hi is not None and v > hi):
            rng = f"between {lo} and {hi}" if hi is not None else f"{lo} or more"
            self.err(key, f"must be {rng}, got {v}", f"use a whole number {rng}")
            return default
        return int(v)

    def seconds(self, key: str, default: float) -> float:
        v = self._typed(key, (int, float), "a number of seconds", f"write e.g. {key} = 10 or {key} = 2.5")
        if v is None:
            return default
        if not math.isfinite(v) or v <= 0:
            self.err(key, f"must be a positive number of seconds, got {_show(v)}",
                     f"use e.g. {key} = {default:g}")
            return default
        return float(v)

    def abs_path(self, key: str, default: str, required: bool = False) -> str:
        v = self.opt_string(key, required)
        if v is not None and not posixpath.isabs(v):
            self.err(key, f"must be an absolute path, got {v!r}", f'write the full path, e.g. {key} = "/{v.lstrip("./")}"')
            return default
        return default if v is None else v

    def location(self, key: str, allow_ssh: bool, required: bool) -> str | None:
        v = self.opt_string(key, required)
        if not v or v.startswith("/"):
            if v == "":
                self.err(key, "must not be empty", "write a URL or an absolute path")
            return v or None
        schemes = ("http", "https", "ssh", "file") if allow_ssh else ("http", "https", "file")
        fix = f"use one of {', '.join(s + '://' for s in schemes)} or an absolute path"
        try:
            u = urlsplit(v)
            problem = None
            if u.scheme not in schemes:
                problem = f"unsupported scheme {u.scheme!r}" if u.scheme else "is neither a URL nor an absolute path"
            elif u.scheme == "file" and (u.netloc not in ("", "localhost") or not u.path.startswith("/")):
                problem, fix = "is not a local file URL", "write file:///absolute/path or just /absolute/path"
            elif u.scheme != "file" and not u.hostname:
                problem, fix = "has no host", f"write {u.scheme}://HOST[:PORT]/..."
            u.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as e:
            problem, fix = f"is not a valid URL ({e})", "check the host and port"
        if problem:
            self.err(key, f"{_show(v)} {problem}", fix)
            return None
        return v

    def proxy(self) -> str | None:
        v = self.opt_string("proxy")
        if v is not None:
            try:
                u = urlsplit(v)
                ok = u.scheme in ("http", "https", "socks5", "socks5h") and bool(u.hostname)
            except ValueError:
                ok = False
            if not ok:
                self.err("proxy", f"{_show(v)} is not a proxy URL", 'write e.g. proxy = "http://proxy.example:3128"')
                return None
        return v


_MAIN_KEYS = ("id", "cache_dir", "cache_size", "cache_min_free", "control_socket", "fuse_root", "fetch_timeout",
              "low_speed_limit", "low_speed_time", "log_level", "trusted_keys", "metrics_listen", "profile_idle",
              "fuse_spin_us")


def parse_listen(value: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [ADDR]:PORT) -> (host, port); ValueError when it is not one."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("write an IPv6 address in brackets, e.g. [::1]:9477")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected HOST:PORT with a port from 1 to 65535, e.g. 127.0.0.1:9477")
    return host, int(port)
_STOR_KEYS = ("url", "cache.expiration", "timeout", "proxy", "ssh.key", "ssh.known_hosts", "ssh.accept_unknown_host",
              "low_speed_limit", "low_speed_time")
_CACHE_KEYS = ("mnt", "timeout", "proxy", "writable", "low_speed_limit", "low_speed_time")
_AYS_KEYS = ("id", "mnt", "name", "cache.local", "cache.grid", "prefetch.cache.local", "prefetch.cache.grid", "debug",
             "import_hints", "trusted_keys")
_DEBUG_KEYS = ("debug_filter", "redis.addr", "redis.port", "redis.passwd", "redis.db")
_TOP_KEYS = {"main": _MAIN_KEYS, "stor": _STOR_KEYS, "cache": _CACHE_KEYS, "ays": _AYS_KEYS, "debug": _DEBUG_KEYS}


def _main(t: _Table) -> MainConfig:
    d = MainConfig(id="")
    ident = t.opt_string("id")
    if ident == "":
        t.err("id", "must not be empty", "write a unique id for this client, or remove the key to use the hostname")
    size, raw = d.cache_size, t.values.get("cache_size")
    if isinstance(raw, str):
        try:
            size = parse_size(raw)
        except ValueError:
            t.err("cache_size", f"{raw!r} is not a size", 'write bytes or e.g. "512MiB", "10G", "1.5GB", "100k"')
    elif raw is not None:
        size = t.integer("cache_size", d.cache_size, 1)
    if size <= 0:
        t.err("cache_size", "must be greater than 0", 'use e.g. cache_size = "10GiB"')
        size = d.cache_size
    min_free, raw = d.cache_min_free, t.values.get("cache_min_free")
    if raw is not None:
        try:
            if not isinstance(raw, str):
                raise ValueError
            min_free = parse_min_free(raw)
        except (ValueError, ArithmeticError):
            t.err("cache_min_free", f"{_show(raw)} is not a share or a size",
                  'write a share of the filesystem, e.g. "5%" (0% to 90%), or a size, e.g. "2GiB"')
    level = t.string("log_level", d.log_level)
    if level.lower() not in LOG_LEVELS:
        close = difflib.get_close_matches(level.lower(), LOG_LEVELS, n=1)
        t.err("log_level", f"unknown level {level!r}",
              (f"did you mean {close[0]}? " if close else "") + f"use one of {', '.join(LOG_LEVELS)}")
        level = d.log_level
    listen = t.string("metrics_listen", d.metrics_listen)
    if listen:
        try:
            parse_listen(listen)
        except ValueError as e:
            t.err("metrics_listen", f"{listen!r} is not an address to listen on", str(e))
            listen = d.metrics_listen
    return MainConfig(
        id=ident or socket.gethostname(), cache_dir=t.abs_path("cache_dir", d.cache_dir), cache_size=size,
        cache_min_free=min_free,
        control_socket=t.abs_path("control_socket", d.control_socket),
        fuse_root=t.abs_path("fuse_root", d.fuse_root),
        fetch_timeout=t.seconds("fetch_timeout", d.fetch_timeout),
        low_speed_limit=t.integer("low_speed_limit", d.low_speed_limit, 0),
        low_speed_time=t.seconds("low_speed_time", d.low_speed_time), log_level=level.lower(),
        profile_idle=t.seconds("profile_idle", d.profile_idle),
        fuse_spin_us=t.integer("fuse_spin_us", d.fuse_spin_us, 0, FUSE_SPIN_MAX),
        trusted_keys=_trusted_keys(t) or (), metrics_listen=listen,
    )


def _trusted_keys(t: _Table) -> tuple[str, ...] | None:
    """`trusted_keys`: Ed25519 public keys (base64, as `aysctl keygen` prints) or paths of .pub files."""
    raw = t.values.get("trusted_keys")
    if raw is None:
        return None
    fix = 'write e.g. trusted_keys = ["/etc/aysfs/keys/release.pub"] or the base64 key itself'
    if not isinstance(raw, list) or not all(isinstance(k, str) for k in raw):
        t.err("trusted_keys", f"expected an array of strings, got {_show(raw)}", fix)
        return None
    keys = []
    for k in raw:
        text = k
        try:
            check_public(k)
            is_key = True  # base64 may begin with '/': a key, not a path
        except ValueError:
            is_key = False
        if k.startswith("/") and not is_key:
            try:
                with open(k) as f:
                    text = f.read()
            except OSError as e:
                t.err("trusted_keys", f"cannot read {k}: {e.strerror}", fix)
                continue
        try:
            keys.append(check_public(text))
        except ValueError:
            t.err("trusted_keys", f"{k!r:.60} is not an Ed25519 public key (base64 of 32 bytes)", fix)
    return tuple(keys)


def _stor(t: _Table) -> StorConfig | None:
    url = t.location("url", allow_ssh=True, required=True)
    s = StorConfig(
        url=url or "", expiration=t.integer("cache.expiration", 0, 0), timeout=t.seconds("timeout", 10.0),
        proxy=t.proxy(), ssh_key=t.opt_string("ssh.key"), ssh_known_hosts=t.opt_string("ssh.known_hosts"),
        ssh_accept_unknown_host=t.boolean("ssh.accept_unknown_host", False), **_low_speed(t),
    )
    return s if url else None


def _low_speed(t: _Table) -> dict[str, Any]:
    """A stor's or grid cache's own low_speed_limit/low_speed_time (None: [main]'s)."""
    out: dict[str, Any] = {"low_speed_limit": None, "low_speed_time": None}
    if "low_speed_limit" in t.values:
        out["low_speed_limit"] = t.integer("low_speed_limit", LOW_SPEED_LIMIT, 0)
    if "low_speed_time" in t.values:
        out["low_speed_time"] = t.seconds("low_speed_time", LOW_SPEED_TIME)
    return out


def _cache(t: _Table) -> GridCacheConfig | None:
    mnt = t.location("mnt", allow_ssh=False, required=True)
    c = GridCacheConfig(mnt=mnt or "", timeout=t.seconds("timeout", 10.0), proxy=t.proxy(),
                        writable=t.boolean("writable", True), **_low_speed(t))
    return c if mnt else None


def _debug(t: _Table) -> DebugConfig:
    filters: list[str] = []
    raw = t.values.get("debug_filter", [])
    if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
        t.err("debug_filter", f"expected an array of regex strings, got {_show(raw)}",
              "write e.g. debug_filter = ['.*\\.py', '.*\\.hrd']")
        raw = []
    for pattern in raw:
        try:
            re.compile(pattern)
            filters.append(pattern)
        except re.error as e:
            t.err("debug_filter", f"{pattern!r} is not a valid regular expression: {e}", "correct the regex")
    return DebugConfig(
        debug_filter=tuple(filters), redis_addr=t.string("redis.addr", "127.0.0.1"),
        redis_port=t.integer("redis.port", 6379, 1, 65535), redis_passwd=t.string("redis.passwd", ""),
        redis_db=t.integer("redis.db", 0, 0),
    )


def _ays(t: _Table) -> AysConfig | None:
    ident = t.opt_string("id", required=True)
    if ident == "":
        t.err("id", "must not be empty", 'write the ays id, e.g. id = "jumpscale|mongodb!main"')
    mnt = t.abs_path("mnt", "", required=True)
    name = t.string("name", default_name(ident or ""))
    if (ident or "name" in t.values) and (not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name in (".", "..")):
        t.err("name", f"invalid name {name!r}", "use only letters, digits, '.', '_' and '-' (not '.' or '..')")
        ident = None
    a = AysConfig(
        id=ident or "", mnt=posixpath.normpath(mnt) if mnt else "", name=name,
        cache_local=t.boolean("cache.local", True), cache_grid=t.boolean("cache.grid", True),
        prefetch_local=t.boolean("prefetch.cache.local", False),
        prefetch_grid=t.boolean("prefetch.cache.grid", False), debug=t.boolean("debug", False),
        import_hints=t.boolean("import_hints", True),
        trusted_keys=_trusted_keys(t),
    )
    return a if ident and mnt else None


def _unique_ays(ck: _Checker, items: list[tuple[_Table, AysConfig]]) -> list[AysConfig]:
    """Reject duplicate names and mnts, and mnts nested inside one another (one ays may be
    mounted twice, under two names)."""
    for i, (t, a) in enumerate(items):
        for t0, a0 in items[:i]:
            first = ck.loc.line(t0.tid)
            for key, same in (("name", a.name == a0.name), ("mnt", a.mnt == a0.mnt)):
                if same:
                    fix = f"give each [[ays]] its own {key}"
                    if key == "name":
                        fix += " (the name defaults to the id with '|' and '!' as '_'; set name = \"...\")"
                    t.err(key, f"duplicate {key} {getattr(a, key)!r}, already used by the [[ays]] at line {first}",
                          fix)
            inner, outer = (a, a0) if a.mnt.startswith(a0.mnt.rstrip("/") + "/") else (a0, a)
            if a.mnt != a0.mnt and inner.mnt.startswith(outer.mnt.rstrip("/") + "/"):
                t.err("mnt", f"{inner.mnt!r} is nested inside {outer.mnt!r} (the [[ays]] at line {first})",
                      "mount points must not contain one another; pick separate directories")
    return [a for _, a in items]


def _tables(ck: _Checker, data: dict[str, Any], name: str) -> list[tuple[TableId, dict[str, Any]]]:
    """The tables under top-level `name`, reporting a wrong bracket count or a non-table value."""
    raw, line = data.get(name), ck.loc.top(name)
    array = name in ("stor", "cache", "ays")
    if raw is None or (array and raw == []):
        return []
    found: list[tuple[TableId, dict[str, Any]]]
    if isinstance(raw, dict):
        found = [((name, None), raw)]
    elif isinstance(raw, list) and all(isinstance(x, dict) for x in raw):
        found = [((name, i), x) for i, x in enumerate(raw)]
    else:
        fix = f"write [[{name}]] tables" if array else f"write a [{name}] table"
        ck.add(line, name, f"must be a table, got {_show(raw)} ({_kind(raw)})", fix)
        return []
    if name == "ays" and any(isinstance(x.get(k), list) for _, x in found for k in ("cache", "stor")):
        nested = [ck.loc.headers[(n, 0)] for n in ("ays.cache", "ays.stor") if (n, 0) in ck.loc.headers]
        ck.add(min(nested, default=line),
               "[[ays.cache]] / [[ays.stor]]", "not a valid place for grid caches or stors", _AYS_HINT)
        found = [(tid, {k: v for k, v in x.items() if not (k in ("cache", "stor") and isinstance(v, list))})
                 for tid, x in found]
        found = [(tid, x) for tid, x in found if x or tid[1] is not None]
    if found and (found[0][0][1] is None) == array:
        ck.add(line, "", _shape_message(name, not array) or "")
    return found if array else found[:1]


def _check(ck: _Checker, data: dict[str, Any]) -> Config:
    for name in data:
        if name not in _TOP_KEYS:
            owners = [t for t, keys in _TOP_KEYS.items() if name in keys]
            close = difflib.get_close_matches(name, list(_TOP_KEYS), n=1)
            hint = (f"put it under [{owners[0]}]; " if owners and not isinstance(data[name], dict) else
                    f"did you mean {close[0]}? " if close else "remove it; ")
            ck.add(ck.loc.top(name), name, "unknown table", hint + "valid tables: [main], [[stor]], [[cache]], [[ays]], [debug]")

    def tables(name: str, label: str) -> list[_Table]:
        return [_Table(ck, label, tid, d, _TOP_KEYS[name]) for tid, d in _tables(ck, data, name)]

    mains, debugs = tables("main", "[main]"), tables("debug", "[debug]")
    stors = [s for t in tables("stor", "[[stor]]") if (s := _stor(t))]
    caches = [c for t in tables("cache", "[[cache]]") if (c := _cache(t))]
    ays = [(t, a) for t in tables("ays", "[[ays]]") if (a := _ays(t))]
    return Config(
        path=ck.path, main=_main(mains[0]) if mains else MainConfig(), stors=tuple(stors), caches=tuple(caches),
        ays=tuple(_unique_ays(ck, ays)), debug=_debug(debugs[0]) if debugs else DebugConfig(),
    )


def parse(text: str, path: str = "<string>") -> Config:
    """Parse and validate config `text`; `path` names it in messages. Raises ConfigError."""
    text = text.removeprefix("\ufeff")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(_syntax_problems(path, text, e)) from None
    except RecursionError:
        raise ConfigError([f"{path}:1: arrays or inline tables nested too deeply. Fix: flatten them"]) from None
    ck = _Checker(path, text)
    config = _check(ck, data)
    if ck.problems:
        raise ConfigError([p for _, p in sorted(ck.problems, key=lambda p: p[0])])
    return config


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate the config file at `path`. Raises ConfigError."""
    name = os.fsdecode(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError([f"{name}: cannot read the config file: {e.strerror or e}. "
                           "Fix: create it, or check the path and its permissions"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError([f"{name}:{line}: the file is not valid UTF-8 ({e.reason}). Fix: save it as UTF-8"]) from None
    return parse(text, name)


__all__ = [
    "AysConfig", "Config", "ConfigError", "DebugConfig", "GridCacheConfig", "MainConfig", "MinFree", "StorConfig",
    "default_name", "load", "parse", "parse_min_free", "parse_size",
]
