"""Profile the server while it serves stateful turns: py-spy samples it, and this prints where the
time goes (inclusive share per function), the view used to decide what to optimise.

    .venv/bin/pip install py-spy && .venv/bin/python bench/profile_turn.py [--seconds 10] [--concurrency 1]
        [--route chat-messages|responses] [--stream]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen
import procs
from report import pct
from run import dify_arm, responses_arm, write_config


async def main(opts: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="threadline-profile-"))
    fast = procs.free_port()
    up = procs.start("upstream", [sys.executable, str(Path(__file__).parent / "upstream.py"), "--port", str(fast)], fast, work)
    cfg = work / "tl.toml"
    url = opts.database or f"sqlite+aiosqlite:///{work}/p.db"
    write_config(cfg, url, fast, fast)
    key = procs.create_key(cfg)
    port = procs.free_port()
    tl = procs.start("threadline", procs.threadline_argv(cfg, port), port, work)
    try:
        await procs.wait_http(up, "/v1/models")
        await procs.wait_http(tl, "/healthz")
        arm = responses_arm("tl", port, key, tl) if opts.route == "responses" else dify_arm("tl", port, key, tl)
        await loadgen.run(port, arm.maker(opts.stream), concurrency=opts.concurrency, duration=1, after=arm.after,
                          stream=opts.stream)
        raw = work / "profile.txt"
        spy = start_spy(tl.popen.pid, opts.seconds, raw)
        res = await loadgen.run(port, arm.maker(opts.stream), concurrency=opts.concurrency, duration=opts.seconds,
                                after=arm.after, stream=opts.stream)
        spy.wait(30)
        print(f"{res.ok / res.elapsed:.0f} turns/s, p50 {pct(res.latencies, 50) * 1000:.2f} ms")
        report(raw, opts.top)
    finally:
        tl.stop()
        up.stop()


def start_spy(pid: int, seconds: int, out: Path) -> subprocess.Popen[bytes]:
    exe = shutil.which("py-spy") or str(procs.VENV_BIN / "py-spy")
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--format", "raw", "--rate", "500", "--duration",
                             str(seconds), "--output", str(out), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def report(raw: Path, top: int) -> None:
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        total += int(n)
        seen = set()
        for frame in stack.split(";"):
            name = frame.split(" (")[0] + " " + frame.split("/")[-1].split(":")[0].rstrip(")") if "(" in frame else frame
            if name not in seen:
                seen.add(name)
                incl[name] += int(n)
    print(f"{total} samples; inclusive share:")
    for name, n in incl.most_common(top):
        print(f"{n / total * 100:6.1f}%  {name}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--route", choices=["chat-messages", "responses"], default="chat-messages",
                    help="chat-messages continuing a conversation, or /v1/responses chained by previous_response_id")
    ap.add_argument("--database", help="database_url (default: a fresh SQLite file)")
    ap.add_argument("--top", type=int, default=60)
    asyncio.run(main(ap.parse_args()))
