"""The local engine's row: first-token latency and generation speed of the bundled SmolLM2-135M.

    .venv/bin/python bench/local_engine.py [--turns 10] [--max-tokens 128]

It imports whichever `threadline` the interpreter has installed, so the same script measures any
implementation of the local engine (run it with another checkout's venv to compare). Each turn is a
new conversation with one of five fixed questions, streamed through `AsyncThreadline`:

- cold: the first turn in a fresh process, model load included, and the longest the event loop
  stalled meanwhile (a 5 ms ticker; a load that holds the GIL shows up here);
- c=1: first-token latency p50/p90 and tokens/s (streamed pieces per second after the first,
  one piece per token on both llama.cpp bindings) over N turns one after another;
- c=2: two turns at once, N in all: the same, plus the aggregate tokens/s of the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import pct, table

QUESTIONS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Explain what a cloud is in two sentences.",
    "Write a haiku about the sea.",
    "Why do cats purr?",
]


async def one_turn(tl, i: int, max_tokens: int) -> tuple[float, float, int]:
    """(first-token latency s, tokens/s after the first, pieces) of one streamed turn."""
    from threadline.messages import TextDelta

    start = time.perf_counter()
    first = last = 0.0
    pieces = 0
    async for ev in tl.stream(QUESTIONS[i % len(QUESTIONS)], user=f"bench-{i}", app="bench"):
        if isinstance(ev, TextDelta) and ev.text:
            last = time.perf_counter()
            if not first:
                first = last
            pieces += 1
    rate = (pieces - 1) / (last - first) if pieces > 1 and last > first else 0.0
    return first - start, rate, pieces


async def main(opts: argparse.Namespace) -> None:
    import threadline
    from threadline import AsyncThreadline

    work = Path(tempfile.mkdtemp(prefix="threadline-local-bench-"))
    tl = AsyncThreadline(database_url=f"sqlite+aiosqlite:///{work}/b.db",
                         engines={"local": {"kind": "local", "max_output_tokens": opts.max_tokens}},
                         apps={"bench": {"engine": "local", "memory": False}}, include_presets=False)
    stall = 0.0

    async def ticker() -> None:
        nonlocal stall
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.005)
            stall = max(stall, time.perf_counter() - t - 0.005)

    tick = asyncio.create_task(ticker())
    cold_start = time.perf_counter()
    cold_ttft, _, _ = await one_turn(tl, 0, opts.max_tokens)
    cold_total = time.perf_counter() - cold_start
    tick.cancel()

    rows = []
    c1 = [await one_turn(tl, i, opts.max_tokens) for i in range(opts.turns)]
    c2: list[tuple[float, float, int]] = []
    t0 = time.perf_counter()
    for i in range(0, opts.turns, 2):
        c2 += await asyncio.gather(*(one_turn(tl, i + k, opts.max_tokens) for k in range(2)))
    c2_wall = time.perf_counter() - t0

    for label, res, agg in (("c=1", c1, None), ("c=2", c2, sum(p for _, _, p in c2) / c2_wall)):
        ttfts = [r[0] * 1000 for r in res]
        rates = [r[1] for r in res]
        rows.append([label, str(len(res)), f"{pct(ttfts, 50):.0f}", f"{pct(ttfts, 90):.0f}", f"{pct(rates, 50):.1f}",
                     f"{agg:.1f}" if agg else f"{pct(rates, 50):.1f}",
                     f"{sum(r[2] for r in res) / len(res):.0f}"])
    engine = type(tl.gateway.engine("local"))
    print(f"threadline from {Path(threadline.__file__).parent}; engine {engine.__module__}.{engine.__name__}"
          f"({', '.join(b.__name__ for b in engine.__bases__)})")
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, load average {os.getloadavg()[0]:.1f}; max_tokens {opts.max_tokens}\n")
    print(table(["cold first turn", "first token ms", "whole turn ms", "max event-loop stall ms"],
                [["model load + answer", f"{cold_ttft * 1000:.0f}", f"{cold_total * 1000:.0f}", f"{stall * 1000:.0f}"]]))
    print()
    print(table(["concurrency", "turns", "first token p50 ms", "first token p90 ms", "tokens/s per turn p50",
                 "tokens/s all turns", "tokens per turn"], rows))
    await tl.aclose()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=128)
    asyncio.run(main(ap.parse_args()))
