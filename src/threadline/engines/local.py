"""A real small chat model on the CPU (llama-cpp-python + a GGUF), so Threadline works offline.

llama.cpp is synchronous and not thread-safe: generation runs in one worker thread at a time and
streams tokens back through a queue; stopping closes the generator between tokens.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx

from ..errors import ConfigError, UpstreamError
from ..messages import EngineEvent, Finished, TextDelta, Usage, UsageReport
from ..tokens import estimate_text
from .base import Engine, EngineRequest
from .http import Poster

_MODELS: dict[str, Any] = {}
_LOAD_LOCK = threading.Lock()


def _load(path: str, n_ctx: int) -> Any:
    with _LOAD_LOCK:
        key = f"{path}:{n_ctx}"
        if key not in _MODELS:
            try:
                from llama_cpp import Llama
            except ImportError:
                raise ConfigError('the local engine needs llama-cpp-python: pip install "threadline[local]"') from None
            _MODELS[key] = Llama(model_path=path, n_ctx=n_ctx, verbose=False)
        return _MODELS[key]


class LocalEngine(Engine):
    kind = "local"

    def __init__(self, config: Any, http: httpx.AsyncClient | None = None, poster: Poster | None = None) -> None:
        super().__init__(config, http, poster)
        path = config.extra.get("model_path")
        if not path:
            raise ConfigError(config.missing or "local engine: no model_path configured")
        self.path = path
        self.n_ctx = int(config.extra.get("n_ctx") or config.context_window)
        self._gen_lock = asyncio.Lock()

    async def events(self, req: EngineRequest) -> AsyncIterator[EngineEvent]:
        msgs: list[dict[str, str]] = []
        system_text = "\n\n".join(s for s in req.system if s)
        if system_text:
            msgs.append({"role": "system", "content": system_text})
        for m in req.messages:
            msgs.append({"role": m.role, "content": m.text})
        max_tokens = req.max_output_tokens or self.config.max_output_tokens or 256
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancel = threading.Event()

        def work() -> None:
            try:
                llm = _load(self.path, self.n_ctx)
                it = llm.create_chat_completion(messages=msgs, max_tokens=max_tokens, stream=True, temperature=0.2)
                for chunk in it:
                    if cancel.is_set():
                        break
                    choice = chunk["choices"][0]
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        loop.call_soon_threadsafe(queue.put_nowait, ("text", text))
                    if choice.get("finish_reason"):
                        loop.call_soon_threadsafe(queue.put_nowait, ("finish", choice["finish_reason"]))
            except Exception as exc:  # surfaced to the caller as an upstream error
                loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, ("end", None))

        async with self._gen_lock:
            fut = loop.run_in_executor(None, work)
            answer: list[str] = []
            finish = None
            try:
                while True:
                    kind, val = await queue.get()
                    if kind == "text":
                        answer.append(val)
                        yield TextDelta(val)
                    elif kind == "finish":
                        finish = val
                    elif kind == "error":
                        raise UpstreamError(f"local model failed: {type(val).__name__}: {val}",
                                            code="upstream_unavailable", status=502)
                    else:
                        break
            finally:
                cancel.set()
                await fut
        prompt = sum(estimate_text(m["content"]) + 4 for m in msgs)
        completion = estimate_text("".join(answer))
        yield UsageReport(Usage(prompt, completion, prompt + completion, estimated=True))
        yield Finished(finish)
