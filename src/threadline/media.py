"""Images and files: data: URIs, uploads, and an SSRF-safe fetch of remote URLs.

When Threadline downloads a URL on a user's behalf (Gemini needs inline bytes), the URL must not be
able to reach the gateway's own networks. Two things make that hold:

**Which addresses are refused.** Every address that is not globally routable (`address_refused`):
loopback, RFC 1918, shared address space 100.64/10 (carrier-grade NAT, and Alibaba's metadata at
100.100.100.200), link-local 169.254/16 (most clouds' metadata), 0/8, 192.0.0.0/24, TEST-NETs,
benchmarking 198.18/15, multicast, 240/4 and broadcast; in IPv6 everything outside global unicast
2000::/3 (ULA fc00::/7, fe80::/10, site-local fec0::/10, multicast, ...), documentation 2001:db8::/32
and 3fff::/20, and the IETF protocol block 2001::/23 (Teredo included). An IPv6 address that carries an
IPv4 address is judged by that IPv4 address: IPv4-mapped ::ffff:0:0/96, NAT64 64:ff9b::/96 and 6to4
2002::/16; the forms nobody should be fetching from (IPv4-compatible ::/96, IPv4-translated
::ffff:0:0:0/96, local-use NAT64 64:ff9b:1::/48, Teredo) are refused outright. This is an explicit
table rather than `ipaddress`'s `is_global` alone because, on Python 3.11, `is_global` is True for
multicast, 192.0.0.9, 192.88.99/24, `::127.0.0.1`, `64:ff9b::127.0.0.1`, `2002:7f00:1::`, fec0::/10
and 3fff::/20; `is_global` still applies on top, so a newer Python can only refuse more.

**Connecting to the address that was checked.** Checking one DNS answer and letting the HTTP client
resolve the name again lets a rebinding name answer "public" to the check and "127.0.0.1" to the
connection. So the check lives where the connection is made: `GuardedBackend` is an httpcore network
backend whose `connect_tcp` resolves the name once, refuses it unless every address is acceptable, and
opens the socket to exactly those addresses. The alternative, rewriting each URL to the IP with a `Host`
header and the `sni_hostname` extension, was not chosen: httpcore pools connections by the (rewritten)
origin, so two hostnames on one CDN address would share a TLS connection verified for only one of them,
and every caller (redirects, error messages, IPv6 brackets, default ports) has to undo the rewrite.
With the backend, httpcore still sees the real hostname: SNI, certificate verification and `Host`
stay correct with no extra code, pooled connections are keyed by hostname, and every connection (each
redirect hop, retries, reconnects) passes through the same check. httpx has no public parameter for
httpcore's `network_backend`, so `_GuardedTransport` swaps the connection pool httpx built for one with
the backend; it fails closed at construction if httpx stops keeping a pool in `_pool`, and the
DNS-rebinding test in tests/test_media_ssrf.py fails if httpx stops sending requests through it. Existing SSRF
packages were not used: safehttpx tests addresses with `is_private`/`is_reserved` (100.64/10 passes on
3.11), accepts a name when any one of its answers is public, and asks dns.google over the network;
advocate is for requests and unmaintained since 2020; drawbridge is a months-old 0.1.

Consequences: the image client never uses a proxy from the environment (a proxy resolves the name
itself, so the guard could not pin it), and it keeps no cookies (it serves every user of the engine).
An engine's `allow_hosts` lists host names (or `host:port`) whose addresses are not checked, and IP
addresses that are accepted where they would be refused; every redirect hop is checked on its own.
Error messages name the URL and a reason, never the address a name resolved to.
"""

from __future__ import annotations

import asyncio
import base64
import http.cookiejar
import ipaddress
import mimetypes
import socket
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpcore
import httpx

from .errors import BlockedURLError, FileTooLargeError, InvalidParamError, UnsupportedFileTypeError

IMAGE_TYPES = {"image/png", "image/jpeg", "image/gif", "image/webp", "image/heic", "image/heif"}
IMAGE_EXTENSIONS = {"png", "jpg", "jpeg", "gif", "webp", "svg", "heic", "heif"}
_METADATA_HOSTS = {"metadata.google.internal", "metadata", "instance-data"}
FETCH_TIMEOUT = 20.0


def split_data_uri(uri: str) -> tuple[str, str]:
    """`data:image/png;base64,XXXX` → ("image/png", "XXXX") without decoding the payload."""
    head, sep, payload = uri.partition(",")
    if not sep or not head.startswith("data:") or ";base64" not in head:
        raise InvalidParamError("image data URIs must be base64: data:<mime>;base64,<data>")
    mime = head[5:].split(";", 1)[0] or "application/octet-stream"
    return mime, payload


def sniff_image_type(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


# ---- which addresses are refused -------------------------------------------------------------------

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _nets(*pairs: tuple[str, str]) -> tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...]:
    return tuple((ipaddress.ip_network(n), reason) for n, reason in pairs)


# IANA's IPv4 and IPv6 special-purpose registries, minus the few entries IANA marks globally reachable
# that an image is never served from (kept refused: refusing more is the safe side). Most specific first.
_V4_REFUSED = _nets(
    ("255.255.255.255/32", "broadcast"),
    ("0.0.0.0/8", "this-network"),
    ("10.0.0.0/8", "private network"),
    ("100.64.0.0/10", "shared address space (carrier-grade NAT, cloud metadata)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local (cloud metadata)"),
    ("172.16.0.0/12", "private network"),
    ("192.0.0.0/24", "IETF protocol assignment"),
    ("192.0.2.0/24", "documentation (TEST-NET-1)"),
    ("192.88.99.0/24", "reserved (6to4 relay anycast)"),
    ("192.168.0.0/16", "private network"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation (TEST-NET-2)"),
    ("203.0.113.0/24", "documentation (TEST-NET-3)"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
)
_V6_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_V6_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_V6_6TO4 = ipaddress.ip_network("2002::/16")
_V6_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")
_V6_REFUSED = _nets(
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::ffff:0:0:0/96", "reserved (IPv4-translated)"),
    ("::/96", "reserved (IPv4-compatible)"),
    ("64:ff9b:1::/48", "reserved (local-use NAT64)"),
    ("100::/64", "reserved (discard-only)"),
    ("2001::/32", "reserved (Teredo)"),
    ("2001::/23", "IETF protocol assignment"),
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
    ("fc00::/7", "private network (unique local)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
)


def _match(ip: IPAddress, table: Iterable[tuple[Any, str]]) -> str | None:
    for net, reason in table:
        if ip in net:
            return reason
    return None


def address_refused(ip: IPAddress) -> str | None:
    """Why a connection to `ip` is refused (a short reason), or None when the address is globally routable."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded, form = None, ""
        if ip in _V6_MAPPED:
            embedded, form = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "IPv4-mapped"
        elif ip in _V6_NAT64:
            embedded, form = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "NAT64"
        elif ip in _V6_6TO4:
            embedded, form = ip.sixtofour, "6to4"
        if embedded is not None:
            reason = address_refused(embedded)
            if reason:
                return f"{reason} (in {form} form)"
            if form != "6to4":  # the IPv4 address is where the packets go; 6to4 is also judged as IPv6 below
                return None
        reason = _match(ip, _V6_REFUSED)
        if reason:
            return reason
        if ip not in _V6_GLOBAL_UNICAST:
            return "reserved"
    else:
        reason = _match(ip, _V4_REFUSED)
        if reason:
            return reason
    if not ip.is_global:
        return "non-global"
    return None


def _host_allowed(host: str, port: int | None, allow_hosts: Iterable[str]) -> bool:
    allow = set(allow_hosts)
    if host in allow:
        return True
    if port is None:
        return False
    return f"{host}:{port}" in allow or (":" in host and f"[{host}]:{port}" in allow)


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


async def check_url(url: str, allow_hosts: list[str]) -> None:
    """Refuse what can be refused from the URL alone: a scheme other than http(s), no host, a metadata
    host name, or an IP literal that `address_refused` refuses. Names are checked where they are
    connected to (`GuardedBackend`), so the address checked is the address used."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise BlockedURLError(f"only http(s) image URLs can be fetched, not {parts.scheme!r}")
    try:
        port = parts.port
    except ValueError:
        raise BlockedURLError("image URL has an invalid port") from None
    host = (parts.hostname or "").lower()
    if not host:
        raise BlockedURLError("image URL has no host")
    if _host_allowed(host, port, allow_hosts):
        return
    if host.rstrip(".") in _METADATA_HOSTS:
        raise BlockedURLError(f"image URL host {host!r} is a metadata service")
    ip = _literal(host)
    if ip is not None and str(ip) not in allow_hosts:
        reason = address_refused(ip)
        if reason:
            raise BlockedURLError(f"image URL {url!r} is a {reason} address; refused")


# ---- connecting to the address that was checked ------------------------------------------------------


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend with the SSRF check inside `connect_tcp`: one resolution per
    connection, every address checked, and the socket opened to those addresses only."""

    def __init__(self, allow_hosts: Iterable[str]) -> None:
        self.allow_hosts = list(allow_hosts)
        self._inner = httpcore.AnyIOBackend()

    async def _resolve(self, host: str, port: int) -> list[str]:
        """The addresses to check and connect to: an IP literal as it is, a name looked up once."""
        if _literal(host) is not None:
            return [host]
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            raise BlockedURLError(f"image URL host {host!r} does not resolve") from None
        addresses: list[str] = []
        for info in infos:
            a = str(info[4][0])
            if a not in addresses:
                addresses.append(a)
        if not addresses:
            raise BlockedURLError(f"image URL host {host!r} does not resolve")
        return addresses

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,  # noqa: ASYNC109 (httpcore's signature)
                          local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        host = host.lower()
        if _host_allowed(host, port, self.allow_hosts):
            return await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        if host.rstrip(".") in _METADATA_HOSTS:
            raise BlockedURLError(f"image URL host {host!r} is a metadata service")
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            async with asyncio.timeout(timeout):
                addresses = await self._resolve(host, port)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host!r} timed out") from None
        for a in addresses:  # all of them, before any is connected to
            ip = _literal(a)
            if ip is None:
                raise BlockedURLError(f"image URL host {host!r} resolves to an unparseable address; refused")
            reason = address_refused(ip)
            if reason and str(ip) not in self.allow_hosts:
                raise BlockedURLError(f"image URL host {host!r} resolves to a {reason} address; refused")
        last: Exception | None = None
        for a in addresses:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            try:
                return await self._inner.connect_tcp(a, port, left, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(self, path: str, timeout: float | None = None,  # noqa: ASYNC109
                                  socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        raise BlockedURLError("image fetches never use a unix socket")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport with its connection pool rebuilt around `GuardedBackend` (no public knob for it)."""

    def __init__(self, backend: GuardedBackend, ssl_context: Any) -> None:
        super().__init__(verify=ssl_context, trust_env=False)
        if not isinstance(getattr(self, "_pool", None), httpcore.AsyncConnectionPool):
            raise RuntimeError("this httpx keeps no connection pool in _pool; the SSRF guard cannot be installed")
        self._pool = httpcore.AsyncConnectionPool(ssl_context=ssl_context, network_backend=backend,
                                                  max_connections=50, max_keepalive_connections=10)


class _NoCookies(http.cookiejar.DefaultCookiePolicy):
    """The image client serves every user of an engine: a cookie one URL sets must not go to the next."""

    def set_ok(self, cookie: Any, request: Any) -> bool:
        return False

    def return_ok(self, cookie: Any, request: Any) -> bool:
        return False


class ImageFetcher:
    """Downloads images for one engine: every connection through `GuardedBackend`, every redirect hop
    checked, a hard size cap, and only image content types. The client is made on first use."""

    def __init__(self, allow_hosts: Iterable[str], *, timeout: float = FETCH_TIMEOUT) -> None:
        self.allow_hosts = [h.lower() for h in allow_hosts]
        self.timeout = timeout
        self._client: httpx.AsyncClient | None = None

    def _open(self) -> httpx.AsyncClient:
        from .engines.http import tls_context  # the certificates every other outbound call trusts

        transport = _GuardedTransport(GuardedBackend(self.allow_hosts), tls_context())
        self._client = httpx.AsyncClient(transport=transport, trust_env=False, follow_redirects=False,
                                         timeout=self.timeout, cookies=http.cookiejar.CookieJar(_NoCookies()))
        return self._client

    async def fetch(self, url: str, *, max_bytes: int, max_redirects: int = 3) -> tuple[str, bytes]:
        client = self._client or self._open()
        for _ in range(max_redirects + 1):
            await check_url(url, self.allow_hosts)
            try:
                async with client.stream("GET", url) as resp:
                    if resp.is_redirect and "location" in resp.headers:
                        url = urljoin(url, resp.headers["location"])
                        continue
                    return await _read_image(resp, url, max_bytes)
            except httpx.TransportError as exc:  # the type only: its text may name the address connected to
                raise InvalidParamError(f"image URL {url!r} could not be fetched ({type(exc).__name__})") from None
            except httpx.InvalidURL:
                raise InvalidParamError(f"image URL {url!r} is not a valid URL") from None
        raise BlockedURLError(f"too many redirects fetching {url}")

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


async def _read_image(resp: httpx.Response, url: str, max_bytes: int) -> tuple[str, bytes]:
    if resp.status_code >= 400:
        raise InvalidParamError(f"image URL answered HTTP {resp.status_code}: {url}")
    declared = int(resp.headers.get("content-length") or 0)
    if declared > max_bytes:
        raise FileTooLargeError(f"image at {url} is {declared} bytes; the limit is {max_bytes}")
    buf = bytearray()
    async for chunk in resp.aiter_bytes():
        buf.extend(chunk)
        if len(buf) > max_bytes:
            raise FileTooLargeError(f"image at {url} is larger than the limit of {max_bytes} bytes")
    data = bytes(buf)
    mime = (resp.headers.get("content-type") or "").split(";", 1)[0].strip().lower()
    if mime not in IMAGE_TYPES:
        mime = sniff_image_type(data) or mimetypes.guess_type(urlsplit(url).path)[0] or ""
    if mime not in IMAGE_TYPES:
        raise UnsupportedFileTypeError(f"{url} is not an image Threadline can send ({mime or 'unknown'})")
    return mime, data


async def fetch_image(url: str, *, allow_hosts: list[str], max_bytes: int, max_redirects: int = 3) -> tuple[str, bytes]:
    """One guarded download with a client of its own (engines keep an `ImageFetcher` instead)."""
    fetcher = ImageFetcher(allow_hosts)
    try:
        return await fetcher.fetch(url, max_bytes=max_bytes, max_redirects=max_redirects)
    finally:
        await fetcher.aclose()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def guess_extension(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""
