"""Debug mode's store: a mount's edited files in Redis, with the seed's keys.

    debug:paths:$mountname   hash  path -> "md5,size"   ("deleted" for a removed path)
    debug:files:$mountname   hash  md5  -> content
    debug:log:$mountname     list  JSON [epoch, "path", "md5"] appended per change
                                   ("" as md5 for a removal)

Paths are relative to the mount root, without a leading slash. Every change is one
MULTI/EXEC transaction, so a reader of Redis never sees a half-recorded change. The
Redis client is synchronous (redis-py): callers run it through `trio.to_thread`.
Shared by the daemon (writes) and `aysctl debug pull` (reads).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import DebugConfig

if TYPE_CHECKING:
    import redis  # imported when first used: only debug mode needs it (saves ~50 ms at start)

DELETED = "deleted"
TIMEOUT = 3.0


class DebugStoreError(Exception):
    """Redis is unreachable, refused us, or holds something malformed."""


@dataclass(frozen=True)
class PathState:
    path: str
    md5: str  # "" when deleted
    size: int

    @property
    def deleted(self) -> bool:
        return not self.md5


def keys(mount: str) -> tuple[str, str, str]:
    return f"debug:paths:{mount}", f"debug:files:{mount}", f"debug:log:{mount}"


def parse_state(path: str, value: bytes | str) -> PathState:
    v = value.decode() if isinstance(value, bytes) else value
    if v == DELETED:
        return PathState(path, "", 0)
    md5, _, size = v.partition(",")
    if len(md5) != 32 or not size.isdigit():
        raise DebugStoreError(f"malformed debug:paths value for {path!r}: {v!r:.80}")
    return PathState(path, md5, int(size))


def connect(host: str, port: int, password: str = "", db: int = 0) -> redis.Redis:
    """A client that fails fast (no retries) so a dead Redis costs a read at most TIMEOUT."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis(host=host, port=port, password=password or None, db=db, socket_timeout=TIMEOUT,
                       socket_connect_timeout=TIMEOUT, retry=Retry(NoBackoff(), 0), decode_responses=False)


def from_config(cfg: DebugConfig) -> redis.Redis:
    return connect(cfg.redis_addr, cfg.redis_port, cfg.redis_passwd, cfg.redis_db)


class DebugStore:
    """One mount's debug records in Redis (blocking calls: run them in a worker thread)."""

    def __init__(self, client: redis.Redis, mount: str) -> None:
        self.r = client
        self.mount = mount
        self.paths_key, self.files_key, self.log_key = keys(mount)

    def _do(self, what: str, fn, *args):  # type: ignore[no-untyped-def]
        try:
            return fn(*args)
        except Exception as e:
            import redis

            if not isinstance(e, redis.RedisError):
                raise
            raise DebugStoreError(f"redis {what} for mount {self.mount!r}: {e}") from e

    def all_paths(self) -> dict[str, PathState]:
        raw = self._do("HGETALL", self.r.hgetall, self.paths_key)
        out = {}
        for k, v in raw.items():
            path = k.decode("utf-8", "surrogateescape")
            out[path] = parse_state(path, v)
        return out

    def content(self, md5: str) -> bytes:
        data = self._do("HGET", self.r.hget, self.files_key, md5)
        if data is None:
            raise DebugStoreError(f"debug:files:{self.mount} has no content {md5}")
        if hashlib.md5(data).hexdigest() != md5:
            raise DebugStoreError(f"debug:files:{self.mount} content {md5} does not match its md5")
        return bytes(data)

    def record(self, path: str, data: bytes) -> PathState:
        """Store new content of `path` and log it, in one transaction."""
        md5 = hashlib.md5(data).hexdigest()
        entry = json.dumps([int(time.time()), path, md5])

        def tx() -> None:
            p = self.r.pipeline(transaction=True)
            p.hset(self.files_key, md5, data)
            p.hset(self.paths_key, path, f"{md5},{len(data)}")
            p.rpush(self.log_key, entry)
            p.execute()

        self._do("MULTI/EXEC", tx)
        return PathState(path, md5, len(data))

    def remove(self, path: str) -> None:
        entry = json.dumps([int(time.time()), path, ""])

        def tx() -> None:
            p = self.r.pipeline(transaction=True)
            p.hset(self.paths_key, path, DELETED)
            p.rpush(self.log_key, entry)
            p.execute()

        self._do("MULTI/EXEC", tx)

    def log_length(self) -> int:
        return int(self._do("LLEN", self.r.llen, self.log_key))

    def log_entries(self, start: int, end: int = -1) -> list[tuple[int, str, str]]:
        """Log entries [start, end]; malformed ones come back with path "" (callers refuse them)."""
        out = []
        for raw in self._do("LRANGE", self.r.lrange, self.log_key, start, end):
            try:
                epoch, path, md5 = json.loads(raw)
                out.append((int(epoch), str(path), str(md5)))
            except (ValueError, TypeError):
                out.append((0, "", ""))
        return out
