"""The engines' turn request over aiohttp (engines/http.py): bodies, streams, line splitting, and
every transport failure surfacing as the httpx error the retry layer and the gateway handle."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import orjson
import pytest

from threadline.engines.http import AiohttpPoster, HttpxPoster, iter_lines

HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer sk-test-double-key"}


@contextlib.asynccontextmanager
async def _poster() -> AsyncIterator[AiohttpPoster]:
    poster = AiohttpPoster()
    try:
        yield poster
    finally:
        await poster.aclose()


async def _chunks(parts: list[bytes]) -> AsyncIterator[bytes]:
    for p in parts:
        yield p


async def _lines(parts: list[bytes]) -> list[str]:
    return [line async for line in iter_lines(_chunks(parts))]


async def test_lines_split_on_crlf_lf_and_cr_across_any_chunking() -> None:
    text = "data: {\"a\": \"x\u2028y\"}\r\n\r\nevent: ping\n\ndata: é\rdata: last".encode()
    expected = ['data: {"a": "x\u2028y"}', "", "event: ping", "", "data: é", "data: last"]
    assert await _lines([text]) == expected
    rng = random.Random(7)
    for _ in range(200):  # every way of cutting it: CRLF halves, UTF-8 sequences split mid-character
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 12)))
        parts = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert await _lines(parts) == expected, parts


async def test_lines_keep_a_trailing_cr_and_a_last_line_without_end() -> None:
    assert await _lines([b"a\r", b"\r", b"b"]) == ["a", "", "b"]
    assert await _lines([b"a\n"]) == ["a"]
    assert await _lines([b""]) == []


async def test_posts_a_body_and_reads_the_answer(oai) -> None:  # type: ignore[no-untyped-def]
    double, url = oai
    async with _poster() as poster:
        body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": False})
        resp = await poster.post(f"{url}/v1/chat/completions", body, HEADERS, read_timeout=10)
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("application/json")
        data = orjson.loads(await resp.aread())
        await resp.aclose()
        assert data["choices"][0]["message"]["content"]
        assert double.requests[-1]["messages"] == [{"role": "user", "content": "hi"}]
        # An error status is an answer too, for retry.send to map: the strict double's 400.
        resp = await poster.post(f"{url}/v1/chat/completions", orjson.dumps({"model": "m", "messages": [],
                                                                             "conversation_id": "x"}),
                                 HEADERS, read_timeout=10)
        assert resp.status_code == 400
        assert "conversation_id" in (await resp.aread()).decode()
        await resp.aclose()


async def _with_server(handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
                       test: Callable[[str], Awaitable[None]]) -> None:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await test(f"http://127.0.0.1:{port}")
    finally:
        server.close()


async def _read_request(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
    await reader.readexactly(length)


async def test_refused_connection_is_a_connect_error() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    async with _poster() as poster:
        with pytest.raises(httpx.ConnectError):
            await poster.post(f"http://127.0.0.1:{port}/v1/chat/completions", b"{}", HEADERS, read_timeout=5)


async def test_silent_upstream_is_a_read_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        await asyncio.sleep(5)
        writer.close()

    async def check(url: str) -> None:
        async with _poster() as poster:
            with pytest.raises(httpx.ReadTimeout):
                await poster.post(f"{url}/v1/chat/completions", b"{}", HEADERS, read_timeout=0.3)

    await _with_server(silent, check)


async def test_cut_stream_is_a_transport_error_and_a_stopped_read_closes_the_connection() -> None:
    closed = asyncio.Event()

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                     b"f\r\ndata: {\"a\": 1}\n\r\n")
        await writer.drain()
        if reader.at_eof() is False:
            await reader.read()  # returns when the client closes its side
        closed.set()
        writer.close()

    async def stop_reading(url: str) -> None:
        async with _poster() as poster:
            resp = await poster.post(f"{url}/x", b"{}", HEADERS, read_timeout=5)
            it = resp.aiter_bytes()
            assert b"data:" in await it.__anext__()
            await resp.aclose()  # a stop: the upstream must see the connection go
            await asyncio.wait_for(closed.wait(), 5)

    await _with_server(cut, stop_reading)

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                     b"f\r\ndata: {\"a\": 1}\n\r\n")
        await writer.drain()
        writer.transport.abort()

    async def read_to_the_cut(url: str) -> None:
        async with _poster() as poster:
            resp = await poster.post(f"{url}/x", b"{}", HEADERS, read_timeout=5)
            with pytest.raises(httpx.TransportError):
                async for _ in resp.aiter_bytes():
                    pass
            await resp.aclose()

    await _with_server(drop, read_to_the_cut)


def test_proxy_comes_from_the_environment_once_per_origin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("https_proxy", "http://proxy.internal:3128")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    poster = AiohttpPoster()
    assert poster._proxy("https://api.example.test/v1/chat/completions") == "http://proxy.internal:3128"
    assert poster._proxy("http://127.0.0.1:8000/v1/chat/completions") is None
    monkeypatch.setenv("https_proxy", "http://other:1")
    assert poster._proxy("https://api.example.test/v1/chat/completions") == "http://proxy.internal:3128"  # once
    monkeypatch.delenv("https_proxy")
    monkeypatch.setenv("all_proxy", "http://everything:8080")
    assert AiohttpPoster()._proxy("https://api.example.test/v1/x") == "http://everything:8080"
    assert AiohttpPoster()._proxy("http://10.0.0.5:8000/v1/x") == "http://everything:8080"
    # Loopback (the embedded local engine, a local vLLM) is never proxied, NO_PROXY or not.
    monkeypatch.delenv("no_proxy")
    for url in ("http://[::1]:8000/v1/x", "http://127.0.0.1:8000/v1/x", "http://127.1.2.3:9/v1", "http://localhost:1/v1"):
        assert AiohttpPoster()._proxy(url) is None


async def test_httpx_poster_serves_any_httpx_client() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"data: 1\r\n\r\n", headers={"content-type": "text/event-stream"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        resp = await HttpxPoster(client).post("http://x/v1/chat/completions", b'{"a":1}', HEADERS, read_timeout=3)
        assert [line async for line in iter_lines(resp.aiter_bytes())] == ["data: 1", ""]
        await resp.aclose()
    assert seen[0].content == b'{"a":1}'
    assert seen[0].headers["authorization"] == "Bearer sk-test-double-key"
    assert seen[0].extensions["timeout"]["read"] == 3


async def test_tls_trusts_what_httpx_trusts(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An upstream behind a private CA: refused (as a connect error) until SSL_CERT_FILE names that
    CA, as httpx behaves, and then answered."""
    import ssl

    import trustme

    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass  # the refused handshake
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_ctx)
    url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/chat/completions"
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    try:
        async with _poster() as poster:
            with pytest.raises(httpx.ConnectError):
                await poster.post(url, b"{}", HEADERS, read_timeout=5)
        pem = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(pem))
        monkeypatch.setenv("SSL_CERT_FILE", str(pem))
        async with _poster() as poster:
            resp = await poster.post(url, b"{}", HEADERS, read_timeout=5)
            assert resp.status_code == 200 and await resp.aread() == b"{}"
            await resp.aclose()
    finally:
        server.close()
