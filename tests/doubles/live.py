"""Run an ASGI app on 127.0.0.1 in a background thread (it stops when the test session ends), or
`threadline serve` as its own process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn


class LiveServer:
    def __init__(self, app: Any, port: int = 0) -> None:
        self.config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                                     timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0

    def _run(self) -> None:
        asyncio.run(self.server.serve())

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)


@contextlib.contextmanager
def serve_process(config: str, tmp: Path, *apps: str, args: tuple[str, ...] = ()) -> Iterator[tuple[str, dict[str, str]]]:
    """`threadline serve` in its own process on `config` (TOML text), with `args` added to its command
    line; (base url, a key per app). Its stdout and stderr go to `tmp / "serve.log"`."""
    from threadline.config import Settings
    from threadline.server.keys import create_key

    cfg = tmp / "threadline.toml"
    cfg.write_text(config)
    settings = Settings.from_file(cfg)
    keys = {app: asyncio.run(create_key(settings, app)) for app in apps}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp / "serve.log"
    with log.open("ab") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "threadline"), "serve", "--config", str(cfg),
                                 "--port", str(port), *args], stdout=out, stderr=out, cwd=tmp, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("threadline serve did not start: " + log.read_text()[-3000:])
            time.sleep(0.05)
        yield url, keys
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
