"""Images and files: data: URIs, uploads, and an SSRF-safe fetch of remote URLs.

When Threadline downloads a URL on a user's behalf (Gemini needs inline bytes), the URL must not be
able to reach the gateway's own network: loopback, private ranges, link-local and cloud metadata
addresses are refused unless the engine config allow-lists the host. Every redirect hop is checked.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import mimetypes
import socket
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


def _address_refused(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local (cloud metadata)"
    if ip.is_private:
        return "private network"
    if ip.is_multicast or ip.is_reserved or ip.is_unspecified:
        return "reserved"
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
        reason = _address_refused(ip)
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
