"""A closed-loop HTTP/1.1 load generator: N workers, one keep-alive connection each, raw asyncio + httptools.

Python HTTP clients (httpx, aiohttp) cost more per request than the gateway we measure, so this one
sends pre-built request bytes and parses responses with httptools only. Time to first token is the
moment the first body chunk carrying the upstream's first word (`w0`) arrives, whatever the wire format
around it (OpenAI chunks or Dify events).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httptools

MARKER = b"w0"


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)  # seconds, whole response
    ttfts: list[float] = field(default_factory=list)  # seconds, first token (streaming only)
    server_overheads: list[float] = field(default_factory=list)  # ms, from X-Threadline-Overhead-Ms
    ok: int = 0
    failed: int = 0
    elapsed: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)


class _Conn(asyncio.Protocol):
    """One connection; `exchange` sends a request and resolves when its response is complete."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[tuple[int, bytes, float, dict[bytes, bytes]]] | None = None
        self.body: list[bytes] = []
        self.headers: dict[bytes, bytes] = {}
        self.first_token = 0.0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed"))

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.waiter and not self.waiter.done():
                self.waiter.set_exception(exc)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        if not self.first_token and MARKER in body:
            self.first_token = time.perf_counter()
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.waiter and not self.waiter.done():
            self.waiter.set_result((self.parser.get_status_code(), b"".join(self.body), self.first_token,
                                    self.headers))

    async def exchange(self, request: bytes) -> tuple[int, bytes, float, dict[bytes, bytes]]:
        assert self.transport is not None
        self.body, self.headers, self.first_token = [], {}, 0.0
        self.parser = httptools.HttpResponseParser(self)
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self.waiter


async def connect(port: int) -> _Conn:
    _, proto = await asyncio.get_running_loop().create_connection(_Conn, "127.0.0.1", port)
    return proto


def build_request(method: str, path: str, port: int, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"host: 127.0.0.1:{port}", "connection: keep-alive"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if method != "GET" or body:
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# make(worker) -> request bytes; after(worker, status, body) lets an arm remember e.g. a conversation id.
MakeFn = Callable[[int], bytes]
AfterFn = Callable[[int, int, bytes], None]


async def run(port: int, make: MakeFn, *, concurrency: int, duration: float | None = None, requests: int | None = None,
              after: AfterFn | None = None, stream: bool = False) -> Result:
    """Closed loop: each worker sends its next request as soon as the previous one completes."""
    res = Result()
    deadline = time.perf_counter() + duration if duration else None
    remaining = [requests if requests is not None else 1 << 62]

    async def worker(w: int) -> None:
        conn: _Conn | None = None
        while remaining[0] > 0 and (deadline is None or time.perf_counter() < deadline):
            remaining[0] -= 1
            try:
                if conn is None or conn.closed:
                    conn = await connect(port)
                t0 = time.perf_counter()
                status, body, first, headers = await conn.exchange(make(w))
                t1 = time.perf_counter()
            except Exception as exc:  # a failed request counts; the worker reconnects
                res.failed += 1
                key = type(exc).__name__
                res.errors[key] = res.errors.get(key, 0) + 1
                conn = None
                continue
            good = 200 <= status < 300 and (not stream or first > 0)
            if good:
                res.ok += 1
                res.latencies.append(t1 - t0)
                if stream:
                    res.ttfts.append(first - t0)
                ov = headers.get(b"x-threadline-overhead-ms")
                if ov is not None:
                    res.server_overheads.append(float(ov))
            else:
                res.failed += 1
                key = f"HTTP {status}"
                res.errors[key] = res.errors.get(key, 0) + 1
            if after is not None:
                after(w, status, body)
            if headers.get(b"connection", b"").lower() == b"close":
                conn = None
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    t = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    res.elapsed = time.perf_counter() - t
    return res
