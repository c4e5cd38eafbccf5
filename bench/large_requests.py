"""Server memory around large request bodies: does RSS come back after them?

    .venv/bin/python bench/large_requests.py

Starts `threadline serve --open` on a temporary SQLite store (no engine reachable: the turns fail
fast, which is fine — this measures what the body costs, not an answer), sends large bodies, and
prints the server's RSS after each step. Not part of the test suite."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import procs


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="threadline-mem-"))
    cfg = work / "tl.toml"
    cfg.write_text('database_url = "sqlite+aiosqlite:///./m.db"\n'
                   '[engines.acc]\nkind = "openai"\nbase_url = "http://127.0.0.1:9/v1"\nmodel = "m"\nmax_retries = 0\n')
    port = procs.free_port()
    exe = Path(sys.executable).parent / "threadline"
    p = subprocess.Popen([str(exe), "serve", "--config", str(cfg), "--open", "--port", str(port)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def rss() -> int:
        time.sleep(0.3)  # the trim runs once the response is out
        for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS"):
                return int(line.split()[1]) // 1024
        return 0

    rows: list[tuple[str, str, int]] = []
    try:
        for _ in range(200):
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz")
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        rows.append(("idle", "", rss()))
        url = f"http://127.0.0.1:{port}/v1"
        h = {"Content-Type": "application/json"}
        with httpx.Client(timeout=120) as c:
            big = json.dumps({"query": "x" * 15_000_000, "user": "u", "inputs": {}})
            for _ in range(10):
                r = c.post(f"{url}/chat-messages", content=big, headers=h)
            rows.append(("10 x 15 MB chat-messages (query over the text limit)", str(r.status_code), rss()))
            r = c.post(f"{url}/chat-messages", content=b"{" + b" " * 60_000_000 + b"}", headers=h)
            rows.append(("60 MB body (over the body limit)", str(r.status_code), rss()))
            msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": "y" * 900_000} for i in range(17)]
            big2 = json.dumps({"model": "default", "messages": msgs})
            for _ in range(3):
                r = c.post(f"{url}/chat/completions", content=big2, headers=h)
            rows.append(("3 x 15 MB chat/completions (history stored, engine down)", str(r.status_code), rss()))
        time.sleep(3)
        rows.append(("3 s later", "", rss()))
    finally:
        p.terminate()
        p.wait()
    print(f"{'step':60} {'status':>6} {'RSS MB':>7}")
    for step, status, mb in rows:
        print(f"{step:60} {status:>6} {mb:>7}")


if __name__ == "__main__":
    main()
