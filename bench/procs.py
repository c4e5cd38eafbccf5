"""Processes under test: the upstream, Threadline servers, LiteLLM's proxy — started, awaited, measured, stopped."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
LITELLM_VENV = ROOT / "bench" / ".venv-litellm"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    name: str
    port: int
    popen: subprocess.Popen[bytes]
    log: Path
    samples: list[int] = field(default_factory=list)

    def pids(self) -> list[int]:
        """The process and its descendants (LiteLLM may fork)."""
        out, todo = [], [self.popen.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            try:
                with open(f"/proc/{pid}/task/{pid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
            except OSError:
                pass
        return out

    def _status_kb(self, key: str) -> int:
        total = 0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith(key):
                            total += int(line.split()[1])
            except OSError:
                pass
        return total

    def rss_mb(self) -> float:
        return self._status_kb("VmRSS:") / 1024

    def peak_rss_mb(self) -> float:
        """VmHWM: the kernel's high-water mark of resident memory since the process started."""
        return self._status_kb("VmHWM:") / 1024

    def stop(self) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
                self.popen.wait(10)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)


def start(name: str, argv: list[str], port: int, workdir: Path, env: dict[str, str] | None = None) -> Proc:
    log = workdir / f"{name}.log"
    fh = open(log, "wb")
    popen = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True,
                             env={**os.environ, **(env or {})})
    return Proc(name, port, popen, log)


async def wait_http(proc: Proc, path: str, within: float = 90.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited early; see {proc.log}:\n{proc.log.read_text()[-2000:]}")
        try:
            r, w = await asyncio.open_connection("127.0.0.1", proc.port)
            w.write(f"GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode())
            data = await asyncio.wait_for(r.readline(), 5)
            w.close()
            if data.startswith(b"HTTP/1.1 200"):
                return
        except (OSError, TimeoutError):
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{proc.name} not ready after {within}s; see {proc.log}")


def ensure_litellm() -> Path | None:
    """LiteLLM's proxy lives in its own venv (it pins its own openai); installed on first use."""
    exe = LITELLM_VENV / "bin" / "litellm"
    if exe.exists():
        return exe
    print("installing litellm[proxy] into bench/.venv-litellm (about a minute) ...", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True)
    except subprocess.CalledProcessError as exc:
        print(f"LiteLLM could not be installed ({exc}); its arm is skipped", flush=True)
        return None
    return exe if exe.exists() else None


def threadline_argv(config: Path, port: int) -> list[str]:
    return [str(VENV_BIN / "threadline"), "serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]


def create_key(config: Path) -> str:
    out = subprocess.run([str(VENV_BIN / "threadline"), "keys", "create", "--config", str(config), "--app", "default"],
                         check=True, capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1].strip()
