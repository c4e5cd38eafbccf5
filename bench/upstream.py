"""A fast OpenAI-compatible upstream for the benchmark: raw asyncio + httptools, keep-alive, no framework.

It must cost far less than anything it measures, so responses are built from templates and the request
body is only parsed to learn `stream`, `stream_options`, `tools` and the last message's role. `--latency-ms`
adds a fixed think time before the first byte; `--chunks` and `--chunk-delay-ms` shape a streamed answer.

Tool calls: a request offering `tools` whose last message is the user's is answered with one call of the
first tool (finish_reason "tool_calls"), blocking or streamed in OpenAI's shape; after a `tool` message, or
without tools, the answer is text.

Run: python bench/upstream.py --port 9100 [--latency-ms 0] [--chunks 8] [--chunk-delay-ms 0]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import httptools
import orjson

TEXT_TOKENS = ["w0 ", "quick ", "brown ", "fox ", "jumps ", "over ", "the ", "dog"]


def _completion(model: str, n_prompt: int, chunks: int) -> bytes:
    text = "".join(TEXT_TOKENS[i % len(TEXT_TOKENS)] for i in range(chunks))
    return orjson.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                     "logprobs": None}],
        "usage": {"prompt_tokens": n_prompt, "completion_tokens": chunks, "total_tokens": n_prompt + chunks},
        "system_fingerprint": "fp_bench",
    })


def _chunk(model: str, delta: dict[str, object], finish: str | None = None, usage: object = None) -> bytes:
    body: dict[str, object] = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": int(time.time()),
                               "model": model, "system_fingerprint": "fp_bench",
                               "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
    if usage is not None:
        body["usage"] = usage
    data = b"data: " + orjson.dumps(body) + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


def _usage_chunk(model: str, n_prompt: int, chunks: int) -> bytes:
    body = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [], "usage": {"prompt_tokens": n_prompt, "completion_tokens": chunks,
                                     "total_tokens": n_prompt + chunks}}
    data = b"data: " + orjson.dumps(body) + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


TOOL_ARGS = ['{"query": ', '"bench', 'mark"}']


def _tool_name(req: dict[str, object]) -> str | None:
    """The first offered tool's name when this turn should be answered with a call, else None."""
    tools, msgs = req.get("tools"), req.get("messages")
    if not tools or not isinstance(tools, list) or not isinstance(msgs, list) or not msgs:
        return None
    if msgs[-1].get("role") != "user":
        return None
    fn = tools[0].get("function") or {}
    return str(fn.get("name") or "tool")


def _call_completion(model: str, n_prompt: int, name: str, call_id: str) -> bytes:
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": "".join(TOOL_ARGS)}}
    return orjson.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                     "finish_reason": "tool_calls", "logprobs": None}],
        "usage": {"prompt_tokens": n_prompt, "completion_tokens": 12, "total_tokens": n_prompt + 12},
        "system_fingerprint": "fp_bench",
    })


def _call_chunks(model: str, name: str, call_id: str) -> list[bytes]:
    first = {"role": "assistant", "content": None, "tool_calls": [
        {"index": 0, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}]}
    out = [_chunk(model, first)]
    for piece in TOOL_ARGS:
        out.append(_chunk(model, {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}))
    out.append(_chunk(model, {}, "tool_calls"))
    return out


DONE = b"%x\r\n%s\r\n" % (len(b"data: [DONE]\n\n"), b"data: [DONE]\n\n") + b"0\r\n\r\n"


class Upstream(asyncio.Protocol):
    calls = 0  # call ids, unique per upstream process

    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.parser = httptools.HttpRequestParser(self)
        self.body: list[bytes] = []
        self.url = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport:
                self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        raw, url = b"".join(self.body), self.url
        self.body, self.url = [], b""
        asyncio.get_running_loop().create_task(self.respond(url, raw))

    async def respond(self, url: bytes, raw: bytes) -> None:
        t = self.transport
        if t is None:
            return
        if not url.endswith(b"/chat/completions"):
            body = b'{"object":"list","data":[{"id":"bench","object":"model","owned_by":"bench"}]}'
            t.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            return
        try:
            req = orjson.loads(raw)
            model = str(req.get("model") or "bench")
            n_prompt = sum(len(str(m.get("content", ""))) // 4 + 4 for m in req["messages"])
        except Exception:
            body = b'{"error":{"message":"invalid JSON body","type":"invalid_request_error","code":null}}'
            t.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                    % (len(body), body))
            return
        if self.opts.latency_ms:
            await asyncio.sleep(self.opts.latency_ms / 1000)
        chunks = self.opts.chunks
        tool = _tool_name(req)
        call_id = ""
        if tool is not None:
            Upstream.calls += 1
            call_id = f"call_bench{Upstream.calls}"
            chunks = 12
        if not req.get("stream"):
            body = _completion(model, n_prompt, chunks) if tool is None else _call_completion(model, n_prompt, tool,
                                                                                              call_id)
            t.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            return
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        if tool is not None:
            parts = [head, *_call_chunks(model, tool, call_id)]
            if (req.get("stream_options") or {}).get("include_usage"):
                parts.append(_usage_chunk(model, n_prompt, chunks))
            parts.append(DONE)
            t.write(b"".join(parts))
            return
        parts = [head, _chunk(model, {"role": "assistant", "content": ""})]
        delay = self.opts.chunk_delay_ms / 1000
        for i in range(chunks):
            parts.append(_chunk(model, {"content": TEXT_TOKENS[i % len(TEXT_TOKENS)]}))
            if delay:
                t.write(b"".join(parts))
                parts = []
                await asyncio.sleep(delay)
                if t.is_closing():
                    return
        parts.append(_chunk(model, {}, "stop"))
        if (req.get("stream_options") or {}).get("include_usage"):
            parts.append(_usage_chunk(model, n_prompt, chunks))
        parts.append(DONE)
        t.write(b"".join(parts))


async def serve(opts: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Upstream(opts), "127.0.0.1", opts.port, backlog=4096)
    print(f"upstream ready on {opts.port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--latency-ms", type=float, default=0.0)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--chunk-delay-ms", type=float, default=0.0)
    opts = ap.parse_args()
    import uvloop

    uvloop.run(serve(opts))


if __name__ == "__main__":
    main()
