"""The local engine: a GGUF model (by default the bundled SmolLM2-135M-Instruct) behind llama.cpp's
own OpenAI-compatible HTTP server, spoken to by the same code as every other OpenAI-compatible engine.

Why this shape:
- Setup. It used to be hand-written glue around llama-cpp-python, which compiles from source: ~7 of
  the ~11 minutes `scripts/serve.sh --open` took on a fresh 2-core machine. xllamacpp ships llama.cpp
  prebuilt (a 34 MB manylinux abi3 wheel), so the whole setup now takes about a minute and a half.
- One code path. llama.cpp's server speaks Chat Completions, so streaming, stop (closing the upstream
  stream ends generation there: the helper's CPU drops to 0 within 0.3 s), real usage counts, and
  later tools and structured output behave as on every other OpenAI-compatible engine. Its server
  also batches concurrent turns (`n_parallel` slots) instead of queueing them behind one lock.
- A helper process (engines/llama_server.py), started on first use. xllamacpp's `Server(...)`
  holds the GIL while the model loads (a 10 ms ticker thread got 1 tick in 1.07 s, and in 8.2 s with
  llama.cpp's warmup), so an in-process load, even from a worker thread, would freeze the event loop
  and every other conversation. The helper listens on 127.0.0.1 on a port the kernel picks, takes a
  per-process random key (other local users and web pages get 401), and exits when this process
  closes its stdin: at gateway close, at exit, or when this process dies.
- One model load per process: every engine of this process with the same model file and context
  size shares one helper (refcounted; the last engine to close stops it), and concurrent first turns
  wait on one startup.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import logging
import os
import secrets
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import httpx
import orjson

from ..errors import ConfigError, EngineUnavailableError, UpstreamUnavailableError
from ..messages import EngineEvent
from .base import EngineRequest
from .http import Poster
from .openai_compat import OpenAICompatEngine

log = logging.getLogger("threadline.engines")

HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama_server.py")
START_TIMEOUT = 300.0  # a large GGUF from a slow disk; SmolLM2-135M takes ~1.5 s
DEFAULT_PARALLEL = 2


def default_threads() -> int:
    """Leave a core for the gateway and everything else: llama.cpp's OpenMP threads spin at their
    barriers, so on a busy 2-core machine 2 threads made 2.5–6.7 tokens/s where 1 made 18–42."""
    return max(1, (os.cpu_count() or 2) - 1)


class LlamaServer:
    """One helper process serving one model file. Startup runs in a thread of its own and resolves
    a concurrent future, so any event loop (several gateways in one process) can await it."""

    def __init__(self, model_path: str, n_ctx: int, n_parallel: int, threads: int) -> None:
        self.model_path, self.n_ctx, self.n_parallel, self.threads = model_path, n_ctx, n_parallel, threads
        self.ident = (os.path.realpath(model_path), n_ctx)
        self.secret = secrets.token_urlsafe(24)
        self.url = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self.users: set[int] = set()
        self.stopped = False
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=20)
        self.started: concurrent.futures.Future[str] = concurrent.futures.Future()
        self.started.set_running_or_notify_cancel()  # a waiter giving up must not cancel it for the others
        threading.Thread(target=self._start, name="threadline-llama-start", daemon=True).start()

    def _start(self) -> None:
        try:
            # -P: the helper's folder (engines/, with its http.py) must not shadow the standard library.
            self.proc = subprocess.Popen(
                [sys.executable, "-P", HELPER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, close_fds=True, start_new_session=True,  # Ctrl-C reaches us, not it
            )
            if self.stopped:  # stop() ran before there was a process to stop
                raise RuntimeError("stopped while starting")
            drain = threading.Thread(target=self._drain_stderr, args=(self.proc,), name="threadline-llama-stderr",
                                     daemon=True)
            drain.start()
            assert self.proc.stdin and self.proc.stdout
            self.proc.stdin.write(orjson.dumps({
                "model_path": self.model_path, "n_ctx": self.n_ctx, "n_parallel": self.n_parallel,
                "threads": self.threads, "api_key": self.secret}) + b"\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
            msg = orjson.loads(line) if line.strip() else {}
            if not msg.get("url"):
                self.proc.wait(timeout=10)
                drain.join(timeout=2)  # its last words, for the log
                raise RuntimeError(msg.get("error") or f"the helper exited with status {self.proc.returncode}")
            if self.stopped:
                raise RuntimeError("stopped while starting")
            self.url = str(msg["url"]).rstrip("/")
            self.started.set_result(self.url)
        except BaseException as exc:
            tail = " | ".join(self.stderr_tail)
            if not self.stopped:
                log.warning("local model %s failed to start: %s%s", os.path.basename(self.model_path), exc,
                            f" ({tail})" if tail else "")
            self.stop()
            self.started.set_exception(exc)

    def _drain_stderr(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr
        for raw in proc.stderr:  # llama.cpp logs errors only (verbosity 1); keep the last lines for the log
            self.stderr_tail.append(raw.decode(errors="replace").rstrip())

    @property
    def alive(self) -> bool:
        if self.stopped:
            return False
        if not self.started.done():
            return True
        return self.started.exception() is None and self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self, wait: float = 5.0) -> None:
        """Close the helper's stdin (it stops llama.cpp's server and exits); kill it if it lingers."""
        self.stopped = True
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            if proc.stdin:
                proc.stdin.close()
            proc.wait(timeout=wait)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()


_SERVERS: dict[tuple[str, int], LlamaServer] = {}
_LOCK = threading.Lock()


def register(user: object, model_path: str, n_ctx: int, n_parallel: int, threads: int) -> LlamaServer:
    """The helper for this model file and context size, started if none is alive, with `user` counted
    among its users until `release`. Callers then await `started` (shared by everyone)."""
    if not os.path.isfile(model_path):
        raise EngineUnavailableError(f"model file not found: {model_path}")
    key = (os.path.realpath(model_path), n_ctx)
    with _LOCK:
        srv = _SERVERS.get(key)
        if srv is None or not srv.alive:
            if srv is not None:
                srv.stop(wait=0)
            srv = _SERVERS[key] = LlamaServer(model_path, n_ctx, n_parallel, threads)
        srv.users.add(id(user))
    return srv


async def release(user: object, srv: LlamaServer) -> None:
    """`user` is done with `srv`; the last one out stops it (in a thread: it waits for the exit)."""
    with _LOCK:
        srv.users.discard(id(user))
        last = not srv.users
        if last and _SERVERS.get(srv.ident) is srv:
            del _SERVERS[srv.ident]
    if last:
        await asyncio.to_thread(srv.stop)


def running_servers() -> list[LlamaServer]:
    """The helpers this process runs now (one per model file and context size)."""
    with _LOCK:
        return [s for s in _SERVERS.values() if s.alive]


@atexit.register
def _stop_all() -> None:
    with _LOCK:
        servers = list(_SERVERS.values())
        _SERVERS.clear()
    for srv in servers:
        srv.stop(wait=2.0)


class LocalEngine(OpenAICompatEngine):
    """An OpenAI-compatible engine whose upstream is the helper, started on the first turn."""

    kind = "local"

    def __init__(self, config: Any, http: httpx.AsyncClient | None = None, poster: Poster | None = None) -> None:
        path = config.extra.get("model_path")
        if not path:
            raise ConfigError(config.missing or "local engine: no model_path configured")
        super().__init__(replace(config, profile=config.profile or "local"), http, poster)
        self.model_path = str(path)
        self.n_ctx = int(config.extra.get("n_ctx") or config.context_window)
        self.n_parallel = int(config.extra.get("n_parallel") or DEFAULT_PARALLEL)
        self.threads = int(config.extra.get("threads") or default_threads())
        self.server: LlamaServer | None = None

    async def _ensure_server(self) -> None:
        srv = self.server
        if srv is not None and not srv.alive:  # it failed to start or died: let it go, start another
            self.server = None
            await release(self, srv)
            srv = None
        if srv is None:
            try:
                srv = self.server = register(self, self.model_path, self.n_ctx, self.n_parallel, self.threads)
            except ConfigError as exc:
                raise ConfigError(f"Engine {self.name!r}: {exc.message}", code=exc.code, status=exc.status) from None
        if not srv.started.done():
            try:
                # A turn stopped meanwhile leaves the startup running for the next one.
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(srv.started)), START_TIMEOUT)
            except TimeoutError:
                srv.stop(wait=0)
            except Exception:
                pass  # the reason is in the server log; the caller gets the error below
        if not srv.alive:
            raise UpstreamUnavailableError(
                f"Engine {self.name!r} could not load its model {os.path.basename(self.model_path)}; "
                "the server log has llama.cpp's reason.")
        self.url = f"{srv.url}/v1/chat/completions"
        self.headers["Authorization"] = f"Bearer {srv.secret}"

    async def events(self, req: EngineRequest) -> AsyncIterator[EngineEvent]:
        self.refuse_unsupported(req)  # before starting anything for a request the model cannot take
        await self._ensure_server()
        async for ev in super().events(req):
            yield ev

    async def aclose(self) -> None:
        if self.server is not None:
            srv, self.server = self.server, None
            await release(self, srv)
        await super().aclose()
