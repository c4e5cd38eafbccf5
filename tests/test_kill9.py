"""`kill -9` of a real `threadline serve` mid-stream, again and again, restarting it each time.

After every kill: no user message is lost, the killed answer keeps the text flushed before the kill
and ends as failed (`interrupted`), no answer is left `streaming`, and a new turn on the same
conversation completes within 5 s of the restarted server answering. On SQLite (one process, and
`--workers 2` with every process killed) and on PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

EXE = str(Path(sys.executable).with_name("threadline"))
USABLE_WITHIN = 5.0  # seconds from the restarted server answering to a new turn on the conversation completing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`threadline serve` in its own process group, so one SIGKILL takes the parent and its workers."""

    def __init__(self, cfg: Path, workers: int, log: Path) -> None:
        self.cfg, self.workers, self.log = cfg, workers, log
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.killed_at = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> float:
        """Start and wait until it answers; returns the moment it did."""
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([EXE, "serve", "--config", str(self.cfg), "--port", str(self.port), "--open",
                                          "--workers", str(self.workers)], stdout=out, stderr=out,
                                         cwd=self.cfg.parent, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return time.monotonic()
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and self.proc.poll() is None, self.log.read_text()[-3000:]
            time.sleep(0.05)

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.killed_at = time.monotonic()
        self.proc.wait(10)
        # The workers of --workers N are in the group too: wait until none is left holding the port.
        deadline = time.monotonic() + 10
        while _group_alive(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _rows(url: str, cid: str) -> list[dict[str, Any]]:
    """The stored messages, read straight from the database (no Threadline code in between)."""
    sql = "SELECT seq, role, content, status, error FROM messages WHERE conversation_id = {} ORDER BY seq"
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.split(":///", 1)[1], timeout=10)
        try:
            rows = conn.execute(sql.format("?"), (cid,)).fetchall()
        finally:
            conn.close()
    else:
        async def fetch() -> list[Any]:
            conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
            try:
                return [tuple(r) for r in await conn.fetch(sql.format("$1"), cid)]
            finally:
                await conn.close()

        rows = asyncio.run(fetch())
    out = []
    for seq, role, content, status, error in rows:
        if isinstance(error, str):
            error = json.loads(error)
        out.append({"seq": seq, "role": role, "content": content, "status": status, "error": error})
    return out


def _streaming_anywhere(url: str) -> int:
    sql = "SELECT count(*) FROM messages WHERE status = 'streaming'"
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.split(":///", 1)[1], timeout=10)
        try:
            return conn.execute(sql).fetchone()[0]
        finally:
            conn.close()

    async def fetch() -> int:
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    return asyncio.run(fetch())


def _reset_pg(url: str) -> None:
    async def reset() -> None:
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")
        finally:
            await conn.close()

    asyncio.run(reset())


def _stream_until_flushed(srv: Server, db: str, cid: str, query: str) -> tuple[str, str]:
    """Start a slow streamed answer and read it until part of it is stored (the flushes run every
    0.5 s), leaving it mid-stream. Returns the conversation id and the text received so far."""
    body = {"inputs": {}, "query": query, "user": "u", "response_mode": "streaming", "conversation_id": cid}
    client = httpx.Client(timeout=30)
    received = ""
    with client.stream("POST", f"{srv.url}/v1/chat-messages", json=body) as r:
        assert r.status_code == 200, r.read()
        deadline = time.monotonic() + 20
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            ev = json.loads(line[6:])
            assert ev["event"] == "message", ev  # still mid-answer: it never ends before the kill
            cid = ev["conversation_id"]
            received += ev["answer"]
            if len(received) > 40:
                rows = _rows(db, cid)
                if rows and rows[-1]["role"] == "assistant" and rows[-1]["content"]:
                    srv.kill9()  # with the stream open and the answer half written
                    break
            assert time.monotonic() < deadline, "no partial answer was stored"
    client.close()
    return cid, received


@pytest.mark.parametrize(("store", "workers", "kills"), [("sqlite", 1, 10), ("sqlite", 2, 1), ("postgresql", 1, 2)],
                         ids=["sqlite", "sqlite-2-workers", "postgresql"])
def test_kill_9_mid_stream_loses_nothing_and_frees_the_conversation(tmp_path, oai, request, store, workers, kills):
    d, oai_url = oai
    if store == "sqlite":
        db = f"sqlite+aiosqlite:///{tmp_path}/crash.db"
    else:
        db = request.getfixturevalue("pg_database")
        _reset_pg(db)
    cfg = tmp_path / "threadline.toml"
    cfg.write_text(f'''database_url = "{db}"
[engines.acc]
kind = "openai"
base_url = "{oai_url}/v1"
api_key = "sk-test-double-key"
model = "m"
[apps.default]
engine = "acc"
''')
    srv = Server(cfg, workers, tmp_path / "serve.log")
    srv.start()
    cid = ""
    asked: list[str] = []
    waits: list[float] = []
    outages: list[float] = []
    try:
        for i in range(kills):
            answer = "w " * 1000
            d.reset(reply=answer, chunk_size=2, slow=0.02)  # 20 s of answer: the kill lands mid-stream
            asked.append(f"q{i}")
            cid, received = _stream_until_flushed(srv, db, cid, f"q{i}")
            ready = srv.start()
            d.reset()
            asked.append(f"check{i}")
            r = httpx.post(f"{srv.url}/v1/chat-messages", timeout=60, json={
                "inputs": {}, "query": f"check{i}", "user": "u", "response_mode": "blocking", "conversation_id": cid})
            waits.append(time.monotonic() - ready)
            outages.append(time.monotonic() - srv.killed_at)
            assert r.status_code == 200, (i, r.text)
            assert r.json()["answer"] == f"Answer to: check{i}"
            rows = _rows(db, cid)
            assert [m["content"] for m in rows if m["role"] == "user"] == asked  # no user message lost
            killed = rows[-3]
            assert killed["role"] == "assistant" and killed["status"] == "failed", killed
            assert killed["error"]["code"] == "interrupted"
            # What was flushed before the kill is kept; it may run ahead of what reached the client.
            assert killed["content"] and answer.startswith(killed["content"]) and answer.startswith(received)
            assert [m["status"] for m in rows[-2:]] == ["completed", "completed"]
            assert _streaming_anywhere(db) == 0
            assert waits[-1] < USABLE_WITHIN, waits
    finally:
        srv.stop()
    print(f"\n{store} x{workers}: conversation usable {', '.join(f'{w:.2f}' for w in waits)} s after each restart "
          f"answered; {', '.join(f'{w:.1f}' for w in outages)} s after each kill (restart included)")


def test_kill_9_of_the_parent_stops_its_workers(tmp_path, oai):
    """`serve --workers 2` whose parent is killed: its workers stop too (they would otherwise go on
    serving the port beside the workers of the next server started on it)."""
    _, oai_url = oai
    cfg = tmp_path / "threadline.toml"
    cfg.write_text(f'''database_url = "sqlite+aiosqlite:///{tmp_path}/w.db"
[engines.acc]
kind = "openai"
base_url = "{oai_url}/v1"
api_key = "sk-test-double-key"
model = "m"
[apps.default]
engine = "acc"
''')
    srv = Server(cfg, 2, tmp_path / "serve.log")
    srv.start()
    assert srv.proc is not None
    try:
        workers = [int(p) for p in Path(f"/proc/{srv.proc.pid}/task/{srv.proc.pid}/children").read_text().split()]
        assert len(workers) == 2
        os.kill(srv.proc.pid, signal.SIGKILL)  # the parent only
        srv.proc.wait(10)
        deadline = time.monotonic() + 20
        while any(_running(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_running(w) for w in workers)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{srv.url}/healthz", timeout=2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(srv.proc.pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
