"""What every request must pass before a route sees it: body size, and in open mode where it comes from.

Body size: a request's `Content-Length` over the limit is refused before a byte of the body is
read, and a body without one (chunked) is counted as it arrives and refused as soon as it passes
the limit; nothing of it reaches a route, the store or the engine. Before this a 60 MB JSON body was
read, parsed and stored whole, and the process kept the memory (RSS 107 -> 474 MB).

Open mode (`serve --open`, no key needed) trusts whoever can reach the port, so it must only be
reachable by the person at the machine:
- `Host` must name the listen address, a loopback name, or a configured host: a web page on an
  attacker's domain that re-resolves its own name to 127.0.0.1 (DNS rebinding) sends its own name
  as `Host` and is refused.
- `Origin`, when a browser sends one, must be such a host too (or a configured origin): any other
  web page's requests are refused, whatever their method.
- JSON bodies must say so in `Content-Type` (read_json), so a cross-site `text/plain` or form POST,
  which browsers send without a CORS preflight, never reaches a route.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from urllib.parse import urlsplit

from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import ServerSettings
from .common import HTTPError

# After a request body this large, freed memory is handed back to the system: glibc keeps freed heap
# pages for reuse, so ten 15 MB bodies left the process 14 MB larger for good (RSS 101 -> 115 MB;
# with the trim it stays at 101). A trim costs about a millisecond, so small requests skip it.
TRIM_AFTER_BYTES = 1024 * 1024


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


_TRIM = _malloc_trim()


def give_back_memory() -> None:
    if _TRIM is not None:
        _TRIM(0)


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "[::]", ""})
UPLOAD_PATHS = ("/v1/files/upload",)


def _hostname(value: str) -> str:
    """`example.com:8080` / `[::1]:8080` / `::1` -> the host part, lower case, brackets kept for IPv6."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[: end + 1] if end > 0 else value
    if value.count(":") > 1:  # a bare IPv6 address
        return f"[{value}]"
    return value.split(":", 1)[0]


async def deny_upgrade(scope: Scope, receive: Receive, send: Send, response: Response) -> None:
    """Refuse a WebSocket upgrade with an HTTP answer (its status and error body), or, on a server
    without the denial-response extension, with a close before accept (which it sends as a 403)."""
    if "websocket.http.response" in scope.get("extensions", {}):
        await response(scope, receive, send)  # Starlette sends it as websocket.http.response.*
    else:
        await send({"type": "websocket.close", "code": 1008})


class RequestGuard:
    def __init__(self, app: ASGIApp, *, server: ServerSettings, open_access: bool, listen_host: str | None,
                 render: Callable[[HTTPConnection, Exception], Response]) -> None:
        self.app = app
        self.server = server
        self.open_access = open_access
        self.render = render
        hosts = set(LOOPBACK_HOSTS) | {h.lower() for h in server.allowed_hosts}
        if listen_host and listen_host not in WILDCARD_HOSTS:
            hosts.add(listen_host.lower())
        self.hosts = frozenset(_hostname(h) for h in hosts)
        self.origins = frozenset(o.rstrip("/").lower() for o in server.allowed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            # A browser opens a WebSocket to any site without asking (no CORS), so in open mode the
            # upgrade passes the same Host and Origin checks; each message's size is the route's.
            if self.open_access:
                try:
                    self._check_origin(scope)
                except HTTPError as exc:
                    await deny_upgrade(scope, receive, send, self.render(HTTPConnection(scope), exc))
                    return
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        size = [0]
        try:
            if self.open_access:
                self._check_origin(scope)
            upload = scope["path"] in UPLOAD_PATHS
            limit = self.server.max_upload_bytes if upload else self.server.max_body_bytes
            receive = self._limited(scope, receive, limit, "file_too_large" if upload else "request_too_large", size)
        except HTTPError as exc:
            await self.render(Request(scope), exc)(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            if size[0] >= TRIM_AFTER_BYTES:
                give_back_memory()

    def _check_origin(self, scope: Scope) -> None:
        host = origin = None
        for k, v in scope["headers"]:
            if k == b"host":
                host = v.decode("latin-1")
            elif k == b"origin":
                origin = v.decode("latin-1")
        if host is None or _hostname(host) not in self.hosts:
            raise HTTPError(403, "host_not_allowed",
                            "This server runs in open mode and answers only requests addressed to its own host; "
                            "add the host to [server] allowed_hosts to allow it.")
        if origin is not None:
            o = origin.rstrip("/").lower()
            parts = urlsplit(o)
            if o not in self.origins and not (parts.scheme in ("http", "https") and parts.hostname is not None
                                              and _hostname(parts.netloc) in self.hosts):
                raise HTTPError(403, "origin_not_allowed",
                                "This server runs in open mode and answers no other web site's pages; "
                                "add the origin to [server] allowed_origins to allow it.")

    @staticmethod
    def _too_large(limit: int, code: str) -> HTTPError:
        return HTTPError(413, code, f"The request body is larger than the limit of {limit} bytes.")

    def _limited(self, scope: Scope, receive: Receive, limit: int, code: str, size: list[int]) -> Receive:
        for k, v in scope["headers"]:
            if k == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    raise HTTPError(400, "bad_request", "Content-Length is not a number.") from None
                if declared > limit:
                    raise self._too_large(limit, code)
                size[0] = declared
                return receive  # the server never delivers more than the declared length
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                size[0] = seen
                if seen > limit:
                    raise self._too_large(limit, code)
            return message

        return counted
