"""Images and files: data: URIs, uploads, and an SSRF-safe fetch of remote URLs.

When Threadline downloads a URL on a user's behalf (Gemini needs inline bytes), the URL must not be
able to reach the gateway's own networks: every address that is not globally routable is refused
unless the engine config allow-lists the host. Every redirect hop is checked.

`address_refused` is an explicit table (IANA's special-purpose registries) rather than `ipaddress`'s
`is_private`/`is_global` alone: on Python 3.11 `is_private` is False for 100.64/10 (Alibaba's metadata
is 100.100.100.200), and `is_global` is True for multicast, 192.0.0.9, 192.88.99/24, `::127.0.0.1`,
`64:ff9b::127.0.0.1`, `2002:7f00:1::`, fec0::/10 and 3fff::/20. An IPv6 address that carries an IPv4
address (IPv4-mapped, NAT64 64:ff9b::/96, 6to4) is judged by that IPv4 address; the forms nobody
fetches from (IPv4-compatible, IPv4-translated, local-use NAT64, Teredo) are refused outright.
`is_global` still applies on top, so a newer Python can only refuse more.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import mimetypes
import socket
from collections.abc import Iterable
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from .errors import BlockedURLError, FileTooLargeError, InvalidParamError, UnsupportedFileTypeError

IMAGE_TYPES = {"image/png", "image/jpeg", "image/gif", "image/webp", "image/heic", "image/heif"}
IMAGE_EXTENSIONS = {"png", "jpg", "jpeg", "gif", "webp", "svg", "heic", "heif"}
_METADATA_HOSTS = {"metadata.google.internal", "metadata", "instance-data"}


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


async def check_url(url: str, allow_hosts: list[str]) -> None:
    """Raise BlockedURLError unless every address the host resolves to is public (or allow-listed)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise BlockedURLError(f"only http(s) image URLs can be fetched, not {parts.scheme!r}")
    host = (parts.hostname or "").lower()
    if not host:
        raise BlockedURLError("image URL has no host")
    if host in allow_hosts or (parts.port and f"{host}:{parts.port}" in allow_hosts):
        return
    if host in _METADATA_HOSTS:
        raise BlockedURLError(f"image URL host {host!r} is a metadata service")
    try:
        ips = [ipaddress.ip_address(host)]
    except ValueError:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, parts.port or (443 if parts.scheme == "https" else 80),
                                           type=socket.SOCK_STREAM)
        except socket.gaierror:
            raise BlockedURLError(f"image URL host {host!r} does not resolve") from None
        ips = [ipaddress.ip_address(i[4][0].split("%", 1)[0]) for i in infos]
    for ip in ips:
        reason = address_refused(ip)
        if reason and str(ip) not in allow_hosts:
            raise BlockedURLError(f"image URL {url!r} resolves to a {reason} address; refused")


async def fetch_image(
    http: httpx.AsyncClient, url: str, *, allow_hosts: list[str], max_bytes: int, max_redirects: int = 3,
) -> tuple[str, bytes]:
    """Download an image with the SSRF guard on every hop and a hard size cap."""
    for _ in range(max_redirects + 1):
        await check_url(url, allow_hosts)
        async with http.stream("GET", url, follow_redirects=False, timeout=20.0) as resp:
            if resp.is_redirect and "location" in resp.headers:
                url = urljoin(url, resp.headers["location"])
                continue
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
    raise BlockedURLError(f"too many redirects fetching {url}")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def guess_extension(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""
