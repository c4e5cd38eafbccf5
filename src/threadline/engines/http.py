"""The one call an engine makes per turn: POST a JSON body, get back a status, headers and a body.

Why not httpx's client for it: measured on the benchmark's 23 KB history request, httpx's
`AsyncClient` (auth and redirect flows, cookie jar, URL and header models) costs about 280 µs of CPU
per call even on aiohttp's transport, and aiohttp's own client about 100 µs; at hundreds of turns a
second on one core that difference is a fifth of the gateway. So the hot call goes through
`AiohttpPoster`, while everything else an engine does (Dify uploads, image fetches, listing) stays on
httpx, and `HttpxPoster` serves any `httpx.AsyncClient` a caller hands an engine, which is how engine
tests replay recorded traffic through `httpx.MockTransport`.

Both raise httpx's transport exceptions, so retries and the gateway speak one error vocabulary.
"""

from __future__ import annotations

import codecs
import os
import re
import ssl
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Mapping
from typing import Protocol

import aiohttp
import certifi
import httpx

CONNECT_TIMEOUT = 10.0


class UpstreamResponse(Protocol):
    """What engines read from an answer; `httpx.Response` already is one."""

    status_code: int

    @property
    def headers(self) -> Mapping[str, str]: ...  # case-insensitive

    async def aread(self) -> bytes: ...

    def aiter_bytes(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class Poster(Protocol):
    async def post(self, url: str, content: bytes, headers: Mapping[str, str], *,
                   read_timeout: float) -> UpstreamResponse: ...

    async def aclose(self) -> None: ...


class HttpxPoster:
    """Posts through an httpx client (its transport decides where the request really goes)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def post(self, url: str, content: bytes, headers: Mapping[str, str], *,
                   read_timeout: float) -> UpstreamResponse:
        req = self.client.build_request("POST", url, content=content, headers=headers,
                                        timeout=httpx.Timeout(read_timeout, connect=CONNECT_TIMEOUT))
        return await self.client.send(req, stream=True)

    async def aclose(self) -> None:
        """The client belongs to whoever passed it in."""


def tls_context() -> ssl.SSLContext:
    """The certificates httpx would trust, so moving the turn request off httpx trusts no more and
    no less: SSL_CERT_FILE or SSL_CERT_DIR when set (a corporate CA), else certifi's bundle."""
    if os.environ.get("SSL_CERT_FILE"):
        return ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    if os.environ.get("SSL_CERT_DIR"):
        return ssl.create_default_context(capath=os.environ["SSL_CERT_DIR"])
    return ssl.create_default_context(cafile=certifi.where())


def _transport_error(exc: BaseException) -> httpx.TransportError:
    """aiohttp's failure, as the httpx exception a caller already handles (retry.send, the gateway)."""
    name = type(exc).__name__
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(name)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(name)
    if isinstance(exc, TimeoutError):
        return httpx.ReadTimeout(name)
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return httpx.RemoteProtocolError(name)
    return httpx.ReadError(name)


class _AiohttpResponse:
    __slots__ = ("_resp", "headers", "status_code")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status_code = resp.status
        self.headers = resp.headers

    async def aread(self) -> bytes:
        try:
            return await self._resp.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _transport_error(exc) from None

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._resp.content.iter_any():
                yield chunk
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _transport_error(exc) from None

    async def aclose(self) -> None:
        # A body read to the end hands the connection back to the pool; one cut short (a stop, a
        # failure) closes it, which is also how the provider learns to stop generating.
        if self._resp.content.at_eof():
            self._resp.release()
        else:
            self._resp.close()


class AiohttpPoster:
    """One aiohttp session (keep-alive pool, C HTTP parser) for every engine of a gateway. It is
    created on first use, inside the event loop that will run it."""

    def __init__(self, *, max_connections: int = 1000) -> None:
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}
        self._proxies: dict[str, str | None] = {}

    def _open(self) -> aiohttp.ClientSession:
        from .. import __version__  # here: the package is fully loaded by the first request

        connector = aiohttp.TCPConnector(limit=self.max_connections, ttl_dns_cache=300, ssl=tls_context())
        self._session = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                              headers={"User-Agent": f"threadline/{__version__}"})
        return self._session

    def _proxy(self, url: str) -> str | None:
        """The environment's proxy for this URL (HTTPS_PROXY, HTTP_PROXY or ALL_PROXY, unless NO_PROXY
        names the host), as httpx picks it; looked up once per URL, since engines send to the same few
        (aiohttp's trust_env would read the environment again on every request)."""
        if url not in self._proxies:
            parts = urllib.parse.urlsplit(url)
            proxies = urllib.request.getproxies()
            proxy = proxies.get(parts.scheme) or proxies.get("all")
            host = parts.hostname or ""
            # Loopback never goes through a proxy (the embedded local engine, a local vLLM/Ollama): a
            # proxy elsewhere cannot reach this machine's 127.0.0.1.
            loopback = host == "localhost" or host.startswith("127.") or host == "::1"
            self._proxies[url] = None if not proxy or loopback or urllib.request.proxy_bypass(host) else proxy
        return self._proxies[url]

    async def post(self, url: str, content: bytes, headers: Mapping[str, str], *,
                   read_timeout: float) -> UpstreamResponse:
        session = self._session or self._open()
        t = self._timeouts.get(read_timeout)
        if t is None:  # read timeout between bytes, as httpx's; no limit on the whole (streams are long)
            t = self._timeouts[read_timeout] = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT,
                                                                     sock_read=read_timeout)
        try:
            resp = await session.post(url, data=content, headers=headers, timeout=t, proxy=self._proxy(url))
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _transport_error(exc) from None
        return _AiohttpResponse(resp)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


_EOL = re.compile(r"\r\n|\r|\n")


async def iter_lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """Text lines of a byte stream, split on CRLF, LF or CR (also across chunk boundaries), without
    their line ends; only those three, since JSON payloads may carry U+2028 and friends raw."""
    decode = codecs.getincrementaldecoder("utf-8")("replace").decode
    pending = ""
    async for chunk in chunks:
        text = pending + decode(chunk)
        held = text.endswith("\r")  # maybe the first half of a CRLF split across chunks
        if held:
            text = text[:-1]
        *lines, pending = _EOL.split(text)
        if held:
            pending += "\r"
        for line in lines:
            yield line
    rest = _EOL.split(pending + decode(b"", True))
    if rest[-1] == "":
        rest.pop()
    for line in rest:
        yield line
