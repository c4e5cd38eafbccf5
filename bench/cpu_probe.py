"""CPU seconds per turn of each process under a closed-loop load: where the machine's cores go.

    .venv/bin/python bench/cpu_probe.py [--concurrency 16] [--seconds 8] [--database URL]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen
import procs
from report import pct
from run import dify_arm, write_config


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def main(opts: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="threadline-cpu-"))
    fast = procs.free_port()
    up = procs.start("upstream", [sys.executable, str(Path(__file__).parent / "upstream.py"), "--port", str(fast)], fast, work)
    cfg = work / "tl.toml"
    write_config(cfg, opts.database or f"sqlite+aiosqlite:///{work}/p.db", fast, fast)
    key = procs.create_key(cfg)
    port = procs.free_port()
    argv = procs.threadline_argv(cfg, port) + (["--workers", str(opts.workers)] if opts.workers > 1 else [])
    tl = procs.start("threadline", argv, port, work)
    try:
        await procs.wait_http(up, "/v1/models")
        await procs.wait_http(tl, "/healthz")
        arm = dify_arm("tl", port, key, tl)
        await loadgen.run(port, arm.maker(False), concurrency=opts.concurrency, duration=1, after=arm.after)
        pids = {"threadline": tl.pids(), "upstream": [up.popen.pid], "load generator": [os.getpid()]}
        before = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
        res = await loadgen.run(port, arm.maker(False), concurrency=opts.concurrency, duration=opts.seconds,
                                after=arm.after)
        after = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
        n = res.ok
        print(f"{n / res.elapsed:.0f} turns/s, p50 {pct(res.latencies, 50) * 1000:.2f} ms, "
              f"p99 {pct(res.latencies, 99) * 1000:.2f} ms, failed {res.failed}")
        for k in pids:
            used = after[k] - before[k]
            print(f"  {k:15s} {used / res.elapsed * 100:5.1f}% of a core, {used / max(1, n) * 1e6:7.0f} us per turn")
    finally:
        tl.stop()
        up.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--database", help="database_url (default: a fresh SQLite file)")
    asyncio.run(main(ap.parse_args()))
