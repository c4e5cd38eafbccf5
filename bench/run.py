"""Threadline's benchmark: gateway overhead, throughput, history and store scaling, open streams —
side by side with LiteLLM's proxy, against one fast local upstream, arms interleaved in one run.

    .venv/bin/python bench/run.py [--quick] [--no-litellm]

Prints tables and writes bench/results/latest.json. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen
import procs
import report
import seed
from report import pct, render

CID = re.compile(rb'"conversation_id":\s*"([0-9a-f-]{36})"')
RID = re.compile(rb'"id":"(resp_[A-Za-z0-9_=-]+)"')
MASTER = "sk-bench-master"
TURNS_PER_CONVERSATION = 4


class Arm:
    """One way of asking for a chat turn: where to send it and how to build the next request."""

    def __init__(self, name: str, port: int, make: Callable[[int, bool], bytes],
                 after: Callable[[int, int, bytes], None] | None = None, proc: procs.Proc | None = None) -> None:
        self.name, self.port, self._make, self.after, self.proc = name, port, make, after, proc

    def maker(self, stream: bool) -> loadgen.MakeFn:
        return lambda w: self._make(w, stream)


def openai_arm(name: str, port: int, path: str, key: str | None, proc: procs.Proc | None, model: str = "bench") -> Arm:
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    bodies = {s: orjson.dumps({"model": model, "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
                               "stream": s, **({"stream_options": {"include_usage": True}} if s else {})})
              for s in (False, True)}
    reqs = {s: loadgen.build_request("POST", path, port, bodies[s], headers) for s in (False, True)}
    return Arm(name, port, lambda w, s: reqs[s], proc=proc)


def dify_arm(name: str, port: int, key: str, proc: procs.Proc | None, user: str = "bench") -> Arm:
    """Continues one conversation per worker: the first turn creates it, every later turn carries its id."""
    convs: dict[int, str] = {}
    headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}

    def make(w: int, stream: bool) -> bytes:
        body = orjson.dumps({"inputs": {}, "query": "Say hello to the benchmark.", "user": user,
                             "conversation_id": convs.get(w, ""), "response_mode": "streaming" if stream else "blocking"})
        return loadgen.build_request("POST", "/v1/chat-messages", port, body, headers)

    def after(w: int, status: int, body: bytes) -> None:
        if status == 200 and w not in convs:
            m = CID.search(body)
            if m:
                convs[w] = m.group(1).decode()

    return Arm(name, port, make, after, proc)


def responses_arm(name: str, port: int, key: str, proc: procs.Proc | None, model: str = "default",
                  chain: bool = True) -> Arm:
    """`POST /v1/responses`, each worker continuing its own chain with `previous_response_id` (the
    stateful path: the history is the server's); `chain=False` sends each request alone."""
    prev: dict[int, str] = {}
    headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}

    def make(w: int, stream: bool) -> bytes:
        body: dict[str, Any] = {"model": model, "input": "Say hello to the benchmark.", "stream": stream}
        if w in prev:
            body["previous_response_id"] = prev[w]
        return loadgen.build_request("POST", "/v1/responses", port, orjson.dumps(body), headers)

    def after(w: int, status: int, body: bytes) -> None:
        if chain and status == 200 and (m := RID.search(body)):  # the first id of a body or stream is the response's
            prev[w] = m.group(1).decode()

    return Arm(name, port, make, after, proc)


def summarize(res: loadgen.Result, direct: dict[str, float] | None, stream: bool) -> dict[str, Any]:
    lat = res.latencies
    out: dict[str, Any] = {
        "requests": res.ok + res.failed, "ok": res.ok, "success": res.ok / max(1, res.ok + res.failed),
        "rps": res.ok / res.elapsed if res.elapsed else 0.0,
        "p50_ms": pct(lat, 50) * 1000, "p99_ms": pct(lat, 99) * 1000, "errors": res.errors,
    }
    if stream:
        out["ttft_p50_ms"] = pct(res.ttfts, 50) * 1000
        out["ttft_p99_ms"] = pct(res.ttfts, 99) * 1000
    if res.server_overheads:
        out["server_overhead_p50_ms"] = pct(res.server_overheads, 50)
        out["server_overhead_p99_ms"] = pct(res.server_overheads, 99)
    if direct is not None:
        key50, key99 = ("ttft_p50_ms", "ttft_p99_ms") if stream else ("p50_ms", "p99_ms")
        out["overhead_p50_ms"] = out[key50] - direct[key50]
        out["overhead_p99_ms"] = out[key99] - direct[key99]
    return out


def merge(results: list[loadgen.Result]) -> loadgen.Result:
    m = loadgen.Result()
    for r in results:
        m.latencies += r.latencies
        m.ttfts += r.ttfts
        m.server_overheads += r.server_overheads
        m.ok += r.ok
        m.failed += r.failed
        m.elapsed += r.elapsed
        for k, v in r.errors.items():
            m.errors[k] = m.errors.get(k, 0) + v
    return m


async def interleaved(arms: list[Arm], *, stream: bool, concurrency: int, rounds: int, seconds: float) -> dict[str, Any]:
    """Every round runs every arm for `seconds`, in a rotated order, so drift hits all arms alike."""
    for arm in arms:  # warm-up: connections, caches, first conversation per worker
        await loadgen.run(arm.port, arm.maker(stream), concurrency=concurrency, duration=min(0.5, seconds),
                          after=arm.after, stream=stream)
    collected: dict[str, list[loadgen.Result]] = {a.name: [] for a in arms}
    for r in range(rounds):
        order = arms[r % len(arms):] + arms[:r % len(arms)]
        for arm in order:
            collected[arm.name].append(await loadgen.run(arm.port, arm.maker(stream), concurrency=concurrency,
                                                         duration=seconds, after=arm.after, stream=stream))
    direct = summarize(merge(collected[arms[0].name]), None, stream)
    out = {arms[0].name: direct}
    for arm in arms[1:]:
        out[arm.name] = summarize(merge(collected[arm.name]), direct, stream)
    return out


def write_config(path: Path, database_url: str, fast_port: int, slow_port: int) -> None:
    # A 4k-token window: histories longer than the window are the case packing exists for.
    path.write_text(f"""database_url = "{database_url}"

[engines.bench]
kind = "openai"
base_url = "http://127.0.0.1:{fast_port}/v1"
api_key = "sk-upstream"
model = "bench"
context_window = 4096
max_output_tokens = 1024
max_retries = 0

[engines.slow]
kind = "openai"
base_url = "http://127.0.0.1:{slow_port}/v1"
api_key = "sk-upstream"
model = "bench"
max_retries = 0

[apps.default]
engine = "bench"
system = ["You are the benchmark's assistant."]
# Packing measured as packing: with the default "auto", turns on the seeded long histories would also
# wait on summary requests to the upstream (the rolling summary, README "Compaction"), a cost of the
# engine's, not of the gateway's. bench/turn_compare.py and tests/test_compaction.py cover "auto".
compaction = "off"
""")


def litellm_config(path: Path, fast_port: int, slow_port: int) -> None:
    path.write_text(f"""model_list:
  - model_name: bench
    litellm_params: {{model: openai/bench, api_base: "http://127.0.0.1:{fast_port}/v1", api_key: sk-upstream}}
  - model_name: slow
    litellm_params: {{model: openai/bench, api_base: "http://127.0.0.1:{slow_port}/v1", api_key: sk-upstream}}
  # /v1/responses: an `openai/` model is sent to the upstream's own /v1/responses, which the upstream (a Chat
  # Completions server, as most engines are) does not have; `custom_openai/` makes LiteLLM bridge it onto
  # /v1/chat/completions, its path for every non-OpenAI engine
  - model_name: bench-responses
    litellm_params: {{model: custom_openai/bench, api_base: "http://127.0.0.1:{fast_port}/v1", api_key: sk-upstream}}
litellm_settings: {{telemetry: false, drop_params: true}}
""")


class Bench:
    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.work = Path(tempfile.mkdtemp(prefix="threadline-bench-"))
        self.procs: list[procs.Proc] = []
        self.results: dict[str, Any] = {"machine": machine(), "quick": opts.quick, "started": time.time()}

    def start(self, name: str, argv: list[str], port: int, env: dict[str, str] | None = None) -> procs.Proc:
        p = procs.start(name, argv, port, self.work, env)
        self.procs.append(p)
        return p

    async def threadline(self, name: str, database_url: str, fast: int, slow: int,
                         workers: int = 1) -> tuple[procs.Proc, str]:
        cfg = self.work / f"{name}.toml"
        write_config(cfg, database_url, fast, slow)
        key = procs.create_key(cfg)
        port = procs.free_port()
        p = self.start(name, [*procs.threadline_argv(cfg, port), "--workers", str(workers)], port)
        await procs.wait_http(p, "/healthz")
        return p, key

    async def run(self) -> dict[str, Any]:
        o = self.opts
        py = sys.executable
        fast, slow = procs.free_port(), procs.free_port()
        up = self.start("upstream", [py, str(Path(__file__).parent / "upstream.py"), "--port", str(fast)], fast)
        self.start("upstream-slow", [py, str(Path(__file__).parent / "upstream.py"), "--port", str(slow),
                                     "--chunks", "20", "--chunk-delay-ms", "250"], slow)
        await procs.wait_http(up, "/v1/models")

        sqlite_url = f"sqlite+aiosqlite:///{self.work}/bench.db"
        pg_url = await seed.fresh_postgres("threadline_bench")
        hist = self.history_plan()
        t = time.perf_counter()
        await seed.seed(sqlite_url, [(cid, "hist", n) for n, ids in hist.items() for cid in ids])
        print(f"seeded history conversations in {time.perf_counter() - t:.1f}s", flush=True)
        tl_sqlite, key_s = await self.threadline("threadline-sqlite", sqlite_url, fast, slow)
        tl_pg, key_p = await self.threadline("threadline-pg", pg_url, fast, slow)
        # Both servers also as two processes (one per core), to compare like with like.
        tl_sqlite2, key_s2 = await self.threadline("threadline-sqlite-2", f"sqlite+aiosqlite:///{self.work}/bench2.db",
                                                   fast, slow, workers=2)

        lite = None
        if not o.no_litellm and (exe := procs.ensure_litellm()):
            cfg = self.work / "litellm.yaml"
            litellm_config(cfg, fast, slow)
            port = procs.free_port()
            lite = self.start("litellm", [str(exe), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port),
                                          "--num_workers", "1"], port,
                              {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_MASTER_KEY": MASTER,
                               "LITELLM_LOG": "ERROR"})
            await procs.wait_http(lite, "/health/liveliness", within=180)
            port2 = procs.free_port()
            lite2 = self.start("litellm-2", [str(exe), "--config", str(cfg), "--host", "127.0.0.1", "--port",
                                             str(port2), "--num_workers", "2"], port2,
                               {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_MASTER_KEY": MASTER,
                                "LITELLM_LOG": "ERROR"})
            await procs.wait_http(lite2, "/health/liveliness", within=180)

        arms = [openai_arm("direct (upstream)", fast, "/v1/chat/completions", "sk-upstream", up),
                dify_arm("threadline chat-messages sqlite", tl_sqlite.port, key_s, tl_sqlite),
                dify_arm("threadline chat-messages postgres", tl_pg.port, key_p, tl_pg),
                openai_arm("threadline chat/completions sqlite", tl_sqlite.port, "/v1/chat/completions", key_s, tl_sqlite),
                responses_arm(report.TL_RESP, tl_sqlite.port, key_s, tl_sqlite),
                dify_arm(report.TL2, tl_sqlite2.port, key_s2, tl_sqlite2)]
        if lite:
            arms.append(openai_arm(report.LITE, lite.port, "/v1/chat/completions", MASTER, lite))
            arms.append(openai_arm(report.LITE2, lite2.port, "/v1/chat/completions", MASTER, lite2))
            # Chained like Threadline's arm; without its spend-log database LiteLLM accepts
            # previous_response_id but sends the engine only the new input (it does less work).
            arms.append(responses_arm(report.LITE_RESP, lite.port, MASTER, lite, model="bench-responses"))

        rounds, secs = (2, 1.0) if o.quick else (3, 2.0)
        thr: dict[str, Any] = {}
        for stream in (False, True):
            for c in (1, 16, 64):
                label = f"{'streaming' if stream else 'blocking'} c={c}"
                print(f"running {label} ...", flush=True)
                thr[label] = await interleaved(arms, stream=stream, concurrency=c, rounds=rounds, seconds=secs)
        self.results["throughput"] = thr
        self.results["peak_rss_mb"] = {a.name: a.proc.peak_rss_mb() for a in arms if a.proc}

        print("running history scaling ...", flush=True)
        self.results["history"] = await self.history(hist, tl_sqlite.port, key_s, fast)

        print("running 1,000 open streams ...", flush=True)
        self.results["streams"] = await self.open_streams(slow, lite)

        print("seeding 100k conversations / 1M messages (SQLite and PostgreSQL) ...", flush=True)
        self.results["store"] = await self.store_scale(fast, slow)
        self.results["finished"] = time.time()
        return self.results

    # ---- history scaling -------------------------------------------------------------------------

    def history_plan(self) -> dict[int, list[str]]:
        """The same pattern for every size — TURNS_PER_CONVERSATION turns on each of N conversations — so
        each size sees the same mix of first turns (history read from the store) and later turns (history
        already in the process's cache), and each conversation stays near its size."""
        turns = 160 if self.opts.quick else 400
        n = turns // TURNS_PER_CONVERSATION
        self.history_turns = turns
        return {size: [str(uuid.uuid4()) for _ in range(n)] for size in (10, 100, 1000, 10_000)}

    async def history(self, plan: dict[int, list[str]], port: int, key: str, fast: int) -> dict[str, Any]:
        headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
        direct = openai_arm("direct", fast, "/v1/chat/completions", "sk-upstream", None)
        rounds = 4
        per_round = self.history_turns // rounds
        counters = dict.fromkeys(plan, 0)

        def maker(size: int) -> loadgen.MakeFn:
            ids = plan[size]

            def make(_w: int) -> bytes:
                cid = ids[counters[size] // TURNS_PER_CONVERSATION % len(ids)]
                counters[size] += 1
                body = orjson.dumps({"inputs": {}, "query": "Say hello to the benchmark.", "user": "hist",
                                     "conversation_id": cid, "response_mode": "blocking"})
                return loadgen.build_request("POST", "/v1/chat-messages", port, body, headers)
            return make

        got: dict[str, list[loadgen.Result]] = {"direct": [], **{str(s): [] for s in plan}}
        await loadgen.run(fast, direct.maker(False), concurrency=1, requests=50)
        for r in range(rounds):
            sizes = list(plan)
            sizes = sizes[r % len(sizes):] + sizes[:r % len(sizes)]
            got["direct"].append(await loadgen.run(fast, direct.maker(False), concurrency=1, requests=per_round))
            for s in sizes:
                got[str(s)].append(await loadgen.run(port, maker(s), concurrency=1, requests=per_round))
        d = summarize(merge(got["direct"]), None, False)
        out = {"direct": d}
        for s in plan:
            out[str(s)] = summarize(merge(got[str(s)]), d, False)
        return out

    # ---- open streams ----------------------------------------------------------------------------

    async def open_streams(self, slow: int, lite: procs.Proc | None) -> dict[str, Any]:
        n = 1000
        out: dict[str, Any] = {}
        db = f"sqlite+aiosqlite:///{self.work}/streams.db"
        tl, key = await self.threadline("threadline-streams", db, procs.free_port(), slow)
        # Every turn here is a new conversation on the slow engine (Threadline's per-request `engine`).
        headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}

        def make_tl(w: int, stream: bool) -> bytes:
            body = orjson.dumps({"inputs": {}, "query": "Stream slowly.", "user": f"s{w}", "response_mode": "streaming",
                                 "engine": "slow"})
            return loadgen.build_request("POST", "/v1/chat-messages", tl.port, body, headers)

        targets: list[tuple[str, procs.Proc, Arm]] = [("threadline", tl, Arm("tl", tl.port, make_tl, proc=tl))]
        if lite:
            targets.append(("litellm proxy", lite, openai_arm("litellm", lite.port, "/v1/chat/completions", MASTER,
                                                             lite, model="slow")))
        for name, proc, arm in targets:
            before = proc.rss_mb()
            peak = [before]

            async def sample(p: procs.Proc = proc, pk: list[float] = peak) -> None:
                while True:
                    pk[0] = max(pk[0], p.rss_mb())
                    await asyncio.sleep(0.1)

            sampler = asyncio.create_task(sample())
            t = time.perf_counter()
            res = await loadgen.run(arm.port, arm.maker(True), concurrency=n, requests=n, stream=True)
            sampler.cancel()
            out[name] = {"streams": n, "ok": res.ok, "rss_before_mb": before, "rss_peak_mb": peak[0],
                         "seconds": time.perf_counter() - t, "ttft_p50_ms": pct(res.ttfts, 50) * 1000,
                         "errors": res.errors}
        tl.stop()
        return out

    # ---- store scaling ---------------------------------------------------------------------------

    async def store_scale(self, fast: int, slow: int) -> dict[str, Any]:
        n_conv, n_msg = 100_000, 1_000_000
        plan = seed.plan_store_scale(n_conv, n_msg, users=100)
        long_id = plan[-1][0]
        u0 = [cid for cid, user, _ in plan if user == "u0"]
        deep_conv = u0[len(u0) // 2]
        dbs = {"sqlite": f"sqlite+aiosqlite:///{self.work}/big.db",
               "postgres": await seed.fresh_postgres("threadline_bench_big")}
        servers = {}
        for name, url in dbs.items():
            t = time.perf_counter()
            await seed.seed(url, plan)
            print(f"  {name}: seeded in {time.perf_counter() - t:.1f}s", flush=True)
            servers[name] = await self.threadline(f"threadline-big-{name}", url, fast, slow)
        out: dict[str, Any] = {"conversations": n_conv, "messages": n_msg}
        reqs = {
            "conversations page 1": "/v1/conversations?user=u0&limit=20",
            "conversations page deep": f"/v1/conversations?user=u0&limit=20&last_id={deep_conv}",
            "messages page 1 (100k-msg thread)": f"/v1/messages?user=u0&conversation_id={long_id}&limit=20",
            "messages page deep": f"/v1/messages?user=u0&conversation_id={long_id}&limit=20&first_id={{mid}}",
        }
        n = 100 if self.opts.quick else 300
        for label, path in reqs.items():
            out[label] = {}
            for name, (proc, key) in servers.items():
                mid = await middle_answer_id(dbs[name], long_id)
                raw = loadgen.build_request("GET", path.replace("{mid}", mid), proc.port,
                                            headers={"authorization": f"Bearer {key}"})
                await loadgen.run(proc.port, lambda _w, r=raw: r, concurrency=1, requests=20)
                res = await loadgen.run(proc.port, lambda _w, r=raw: r, concurrency=1, requests=n)
                out[label][name] = {"p50_ms": pct(res.latencies, 50) * 1000, "p99_ms": pct(res.latencies, 99) * 1000,
                                    "ok": res.ok, "requests": res.ok + res.failed}
        return out

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()


async def middle_answer_id(database_url: str, cid: str) -> str:
    """An answer halfway down a long thread: `first_id` for a deep messages page."""
    if database_url.startswith("sqlite"):
        db = sqlite3.connect(database_url.split(":///", 1)[1])
        try:
            n = db.execute("SELECT last_seq FROM conversations WHERE id=?", (cid,)).fetchone()[0]
            return db.execute("SELECT id FROM messages WHERE conversation_id=? AND seq=?", (cid, n // 4 * 2)).fetchone()[0]
        finally:
            db.close()
    import asyncpg

    conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        n = await conn.fetchval("SELECT last_seq FROM conversations WHERE id=$1", cid)
        return await conn.fetchval("SELECT id FROM messages WHERE conversation_id=$1 AND seq=$2", cid, n // 4 * 2)
    finally:
        await conn.close()


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rounds and shorter runs (~3 min)")
    ap.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM proxy arm")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "latest.json"))
    opts = ap.parse_args()
    import uvloop

    bench = Bench(opts)
    try:
        results = uvloop.run(bench.run())
    finally:
        bench.close()
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(render(results))
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    main()
