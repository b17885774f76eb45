"""A stor or grid cache on an HTTP(S) server (GET to read, WebDAV PUT to write)."""

from __future__ import annotations

from urllib.parse import quote, urlsplit

import httpx

from .base import LowSpeed, Progress, StoreError, StoreTimeout, check_rel, describe, within_low_speed
from .httpget import GetPool, Unusual, pool_for


def _client_kwargs(timeout: float, proxy: str | None) -> dict[str, object]:
    # `timeout` bounds each phase (connect, each read or write of the body), not a whole
    # transfer: many concurrent 4 MiB chunks on a slow link are slow, not dead. Waiting for a
    # pooled connection is unbounded here (the fetcher's fetch_timeout bounds it): queueing
    # behind our own requests must not mark a healthy server down.
    kw: dict[str, object] = {"timeout": httpx.Timeout(timeout, connect=min(timeout, 5.0), pool=None),
                             "follow_redirects": True, "trust_env": False}
    if proxy:
        # httpx >= 0.26 takes `proxy`; Debian 12's 0.23 only `proxies`.
        kw["proxy" if "proxy" in httpx.Client.__init__.__code__.co_varnames else "proxies"] = proxy
    return kw


def _larger_http_reads() -> None:
    """httpcore reads a response body 64 KiB at a time, each read a pass through h11 and the
    trio socket: for blobs of up to 4 MiB that caps a stor at ~430 MiB/s here, where nginx
    serves ~820. Reads of 1 MiB take it to ~690 MiB/s (bench/README.md)."""
    try:
        from httpcore._async.http11 import AsyncHTTP11Connection
    except ImportError:  # another httpcore layout: keep its default
        return
    if getattr(AsyncHTTP11Connection, "READ_NUM_BYTES", 0) < HTTP_READ_BYTES:
        AsyncHTTP11Connection.READ_NUM_BYTES = HTTP_READ_BYTES


HTTP_READ_BYTES = 1 << 20
_larger_http_reads()


def _http_error(where: str, e: httpx.HTTPError) -> StoreError:
    if isinstance(e, httpx.TimeoutException):
        return StoreTimeout(f"{where}: timed out ({type(e).__name__})")
    return StoreError(f"{where}: {describe(e)}")


class HttpStore:
    """A stor or grid cache on an HTTP(S) server: GET to read, PUT to write (WebDAV PUT)."""

    def __init__(self, url: str, timeout: float = 10.0, proxy: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.proxy = proxy
        self.low_speed = LowSpeed()
        self._kw = _client_kwargs(timeout, proxy)
        self._sync: httpx.Client | None = None
        self._async: httpx.AsyncClient | None = None
        # blob GETs of a plain http:// stor without a proxy: the lean client (see .httpget)
        self._gets: GetPool | None = None if proxy else pool_for(self.url, timeout, min(timeout, 5.0))
        self._path = urlsplit(self.url).path

    def _u(self, rel: str) -> str:
        # file names hold '%' (escaped ays ids): encode it, so the server maps the URL to that name
        return f"{self.url}/{quote(check_rel(rel), safe='/')}"

    def _no_client(self, e: ImportError) -> StoreError:
        # e.g. a socks5:// proxy without the optional socksio package
        return StoreError(f"{self.url}: cannot use proxy {self.proxy}: {e}")

    def _client(self) -> httpx.Client:
        if self._sync is None:
            try:
                self._sync = httpx.Client(**self._kw)  # type: ignore[arg-type]
            except ImportError as e:
                raise self._no_client(e) from e
        return self._sync

    def _aclient(self) -> httpx.AsyncClient:
        if self._async is None:
            limits = httpx.Limits(max_connections=32, max_keepalive_connections=16)
            try:
                self._async = httpx.AsyncClient(limits=limits, **self._kw)  # type: ignore[arg-type]
            except ImportError as e:
                raise self._no_client(e) from e
        return self._async

    def _answer(self, rel: str, r: httpx.Response) -> bytes | None:
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise StoreError(f"{self.url}: GET {rel}: HTTP {r.status_code}")
        return r.content

    def read(self, rel: str) -> bytes | None:
        try:
            return self._answer(rel, self._client().get(self._u(rel)))
        except httpx.HTTPError as e:
            raise _http_error(f"{self.url}: GET {rel}", e) from e

    def write(self, rel: str, data: bytes) -> None:
        try:
            r = self._client().put(self._u(rel), content=data)
        except httpx.HTTPError as e:
            raise _http_error(f"{self.url}: PUT {rel}", e) from e
        if r.status_code not in (200, 201, 204):
            raise StoreError(f"{self.url}: PUT {rel}: HTTP {r.status_code} (does the server accept PUT?)")

    def _head_answer(self, rel: str, r: httpx.Response) -> bool:
        if r.status_code not in (200, 404):
            raise StoreError(f"{self.url}: HEAD {rel}: HTTP {r.status_code}")
        return r.status_code == 200

    def exists(self, rel: str) -> bool:
        try:
            return self._head_answer(rel, self._client().head(self._u(rel)))
        except httpx.HTTPError as e:
            raise _http_error(f"{self.url}: HEAD {rel}", e) from e

    def close(self) -> None:
        if self._sync is not None:
            self._sync.close()
            self._sync = None

    async def fetch(self, rel: str) -> bytes | None:
        """The body, received under the low-speed limit (each read is bounded by `timeout`)."""
        where = f"{self.url}: GET {rel}"
        if self._gets is not None:
            try:  # (the lean client checks the low-speed limit itself)
                return await self._gets.get(f"{self._path}/{quote(check_rel(rel), safe='/')}", Progress(), where,
                                            self.low_speed)
            except Unusual:
                pass  # a redirect, a chunked body...: httpx handles all of HTTP
        return await within_low_speed(self.low_speed, where, lambda p: self._get_streamed(rel, p))

    async def _get_streamed(self, rel: str, p: Progress) -> bytes | None:
        try:
            async with self._aclient().stream("GET", self._u(rel)) as r:
                if r.status_code != 200:
                    return self._answer(rel, r)
                p.started = True
                parts = []
                async for part in r.aiter_bytes():
                    parts.append(part)
                    p.bytes += len(part)
                return parts[0] if len(parts) == 1 else b"".join(parts)
        except httpx.HTTPError as e:
            raise _http_error(f"{self.url}: GET {rel}", e) from e

    async def store(self, rel: str, data: bytes) -> None:
        try:
            r = await self._aclient().put(self._u(rel), content=data)
        except httpx.HTTPError as e:
            raise _http_error(f"{self.url}: PUT {rel}", e) from e
        if r.status_code not in (200, 201, 204):
            raise StoreError(f"{self.url}: PUT {rel}: HTTP {r.status_code}")

    async def contains(self, rel: str) -> bool:
        try:
            return self._head_answer(rel, await self._aclient().head(self._u(rel)))
        except httpx.HTTPError as e:
            raise _http_error(f"{self.url}: HEAD {rel}", e) from e

    async def warm(self, n: int) -> None:
        """Have `n` connections open and idle (see GetPool.warm); through a proxy, nothing."""
        if self._gets is not None:
            await self._gets.warm(n)

    async def aclose(self) -> None:
        if self._gets is not None:
            self._gets.close()
        if self._async is not None:
            await self._async.aclose()
            self._async = None
