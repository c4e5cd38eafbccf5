"""Stateful turn overhead, tree against tree, and a tool-call turn against a text turn (issue 13's "Done when").

Starts the fast fake upstream (bench/upstream.py) and one `threadline serve` per source tree — each served
from its own code (`PYTHONPATH=<tree>/src`) on its own fresh database — then runs, interleaved in rounds so
machine noise hits every arm alike, at concurrency 1:

- text (openai): stateful turns on /v1/chat/completions continuing the same conversations, every turn
  resending the growing history as an OpenAI client does (Threadline finds the stored conversation);
- text (dify):   stateful turns on /v1/chat-messages carrying the conversation_id;
- tool (openai): on every tree that accepts `tools`, a tool loop per turn pair: the user's message with
  tools -> a tool_call answer; then the tool's result -> a text answer;
- direct:        the text (openai) pattern against the upstream itself: the floor under client latency.

Every conversation runs --turns requests and then a new one starts, so all arms see the same history
lengths. "overhead" is the server's own X-Threadline-Overhead-Ms (time in Threadline up to the response
headers, not waiting on the engine; for --stream that leaves out the work after the first byte, so the
default blocking run is the complete measure); "latency" is the client's whole request.

    /work/main/.venv/bin/python bench/turn_compare.py --tree old=/work/wt-prev --tree new=/work/main \\
        [--rounds 6] [--seconds 5] [--warmup 2] [--turns 8] [--stream] [--postgres] [--out FILE.json]

Ratios compare every tree with the first --tree, and each tree's tool requests with its own text turns.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen
import procs
import seed
from report import pct, table
from run import write_config

CID = re.compile(rb'"conversation_id":\s*"([0-9a-f-]{36})"')
RESP_ID = re.compile(rb'"id":\s*"(resp_[0-9a-f]{32})"')
PY = sys.executable
TOOLS = [{"type": "function", "function": {
    "name": "lookup", "description": "Looks a word up.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}]


@dataclass
class Samples:
    client_ms: list[float] = field(default_factory=list)
    overhead_ms: list[float] = field(default_factory=list)


@dataclass
class Tree:
    name: str
    path: Path
    rev: str = ""
    port: int = 0
    key: str = ""
    proc: procs.Proc | None = None


class Arm:
    """One kind of stateful exchange against one server; `step` does one unit of it and records samples."""

    kinds: tuple[str, ...] = ("turn",)

    def __init__(self, name: str, port: int, key: str | None, turns: int, stream: bool) -> None:
        self.name, self.port, self.turns, self.stream = name, port, turns, stream
        self.headers = {"content-type": "application/json"}
        if key:
            self.headers["authorization"] = f"Bearer {key}"
        self.samples: dict[str, Samples] = {k: Samples() for k in self.kinds}
        self.failures: dict[str, int] = {}
        self.first_error = ""
        self.conn: loadgen._Conn | None = None
        self.conversations = 0
        self.broken = 0  # a later turn that landed in a different conversation than the one it continues
        self.record = True
        self.reset()

    def reset(self) -> None:
        self.conversations += 1
        self.turn = 0
        self.cid: str | None = None

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, bytes, dict[bytes, bytes], float]:
        raw = loadgen.build_request("POST", path, self.port, orjson.dumps(body), self.headers)
        if self.conn is None or self.conn.closed:
            self.conn = await loadgen.connect(self.port)
        t0 = time.perf_counter()
        status, data, _first, headers = await self.conn.exchange(raw)
        ms = (time.perf_counter() - t0) * 1000
        if headers.get(b"connection", b"").lower() == b"close":
            self.conn = None
        return status, data, headers, ms

    def note(self, kind: str, headers: dict[bytes, bytes], ms: float) -> None:
        if not self.record:
            return
        s = self.samples[kind]
        s.client_ms.append(ms)
        ov = headers.get(b"x-threadline-overhead-ms")
        if ov is not None:
            s.overhead_ms.append(float(ov))

    def fail(self, what: str, body: bytes = b"") -> None:
        if self.record:
            self.failures[what] = self.failures.get(what, 0) + 1
        if not self.first_error:
            self.first_error = f"{what}: {body[:300].decode(errors='replace')}"
        self.reset()

    def same_conversation(self, cid: str | None) -> None:
        if cid is None:
            return
        if self.cid is not None and cid != self.cid and self.record:
            self.broken += 1
        self.cid = cid

    async def step(self) -> None:
        raise NotImplementedError

    async def run_for(self, seconds: float) -> None:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            try:
                await self.step()
            except (OSError, ConnectionError) as exc:
                self.conn = None
                self.fail(type(exc).__name__)

    def close(self) -> None:
        if self.conn is not None and self.conn.transport is not None:
            self.conn.transport.close()


def read_answer(data: bytes, stream: bool) -> tuple[str, list[dict[str, Any]]]:
    """An OpenAI answer's text and tool calls, from a completion or its chunks."""
    if not stream:
        msg = orjson.loads(data)["choices"][0]["message"]
        return msg.get("content") or "", msg.get("tool_calls") or []
    text: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    for event in data.split(b"\n\n"):
        line = event.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = orjson.loads(line[6:])
        for ch in chunk.get("choices") or ():
            d = ch.get("delta") or {}
            text.append(d.get("content") or "")
            for tc in d.get("tool_calls") or ():
                c = calls.setdefault(tc["index"], {"id": "", "type": "function",
                                                   "function": {"name": "", "arguments": ""}})
                c["id"] = tc.get("id") or c["id"]
                fn = tc.get("function") or {}
                c["function"]["name"] += fn.get("name") or ""
                c["function"]["arguments"] += fn.get("arguments") or ""
    return "".join(text), [calls[i] for i in sorted(calls)]


class OpenAIText(Arm):
    """Text turns on /v1/chat/completions, resending the growing history."""

    def reset(self) -> None:
        super().reset()
        self.messages: list[dict[str, Any]] = []

    def body(self) -> dict[str, Any]:
        b: dict[str, Any] = {"model": "bench", "messages": self.messages, "user": f"bench-{self.name}",
                             "stream": self.stream}
        if self.stream:
            b["stream_options"] = {"include_usage": True}
        return b

    def ask(self) -> None:
        self.messages.append({"role": "user",
                              "content": f"Conversation {self.conversations}, turn {self.turn}: say hello."})

    def cid_of(self, headers: dict[bytes, bytes]) -> str | None:
        v = headers.get(b"x-threadline-conversation-id")
        return v.decode() if v else None

    async def step(self) -> None:
        self.ask()
        status, data, headers, ms = await self.post("/v1/chat/completions", self.body())
        if status != 200:
            return self.fail(f"HTTP {status}", data)
        text, _ = read_answer(data, self.stream)
        self.note("turn", headers, ms)
        self.same_conversation(self.cid_of(headers))
        self.messages.append({"role": "assistant", "content": text})
        self.turn += 1
        if self.turn >= self.turns:
            self.reset()


class DifyText(Arm):
    """Text turns on /v1/chat-messages carrying the conversation_id."""

    async def step(self) -> None:
        body = {"inputs": {}, "query": f"Conversation {self.conversations}, turn {self.turn}: say hello.",
                "user": f"bench-{self.name}", "conversation_id": self.cid or "",
                "response_mode": "streaming" if self.stream else "blocking"}
        status, data, headers, ms = await self.post("/v1/chat-messages", body)
        if status != 200:
            return self.fail(f"HTTP {status}", data)
        m = CID.search(data)
        self.note("turn", headers, ms)
        self.same_conversation(m.group(1).decode() if m else None)
        self.turn += 1
        if self.turn >= self.turns:
            self.reset()


class ResponsesText(Arm):
    """Text turns on /v1/responses, each continuing the last by previous_response_id (the stateful
    Responses path: the chain is looked up, not resent)."""

    def reset(self) -> None:
        super().reset()
        self.previous: str | None = None

    async def step(self) -> None:
        body: dict[str, Any] = {"model": "bench", "user": f"bench-{self.name}", "stream": self.stream,
                                "input": f"Conversation {self.conversations}, turn {self.turn}: say hello."}
        if self.previous:
            body["previous_response_id"] = self.previous
        status, data, headers, ms = await self.post("/v1/responses", body)
        if status != 200:
            return self.fail(f"HTTP {status}", data)
        m = RESP_ID.search(data)
        self.note("turn", headers, ms)
        v = headers.get(b"x-threadline-conversation-id")
        self.same_conversation(v.decode() if v else None)
        self.previous = m.group(1).decode() if m else None
        self.turn += 1
        if self.turn >= self.turns or self.previous is None:
            self.reset()


class OpenAITool(OpenAIText):
    """A tool loop per turn pair: the user's message with tools -> a tool call; the result -> text."""

    kinds = ("tool call", "tool result", "loop")

    def body(self) -> dict[str, Any]:
        return {**super().body(), "tools": TOOLS}

    async def step(self) -> None:
        self.ask()
        status, data, h1, ms1 = await self.post("/v1/chat/completions", self.body())
        if status != 200:
            return self.fail(f"call: HTTP {status}", data)
        text, calls = read_answer(data, self.stream)
        if not calls:
            return self.fail("call: the answer has no tool_calls (the tree ignores or refuses `tools`)")
        self.same_conversation(self.cid_of(h1))
        self.messages.append({"role": "assistant", "content": text or None, "tool_calls": calls})
        for c in calls:
            self.messages.append({"role": "tool", "tool_call_id": c["id"], "content": "lookup: 42 entries"})
        status, data, h2, ms2 = await self.post("/v1/chat/completions", self.body())
        if status != 200:
            return self.fail(f"result: HTTP {status}", data)
        text, calls = read_answer(data, self.stream)
        if calls:
            return self.fail("result: a tool call again")
        self.same_conversation(self.cid_of(h2))
        self.note("tool call", h1, ms1)
        self.note("tool result", h2, ms2)
        if self.record:
            loop = self.samples["loop"]
            loop.client_ms.append(ms1 + ms2)
            o1, o2 = h1.get(b"x-threadline-overhead-ms"), h2.get(b"x-threadline-overhead-ms")
            if o1 is not None and o2 is not None:
                loop.overhead_ms.append(float(o1) + float(o2))
        self.messages.append({"role": "assistant", "content": text})
        self.turn += 2  # two requests: the same history lengths as two text turns
        if self.turn >= self.turns:
            self.reset()


# ---- processes ---------------------------------------------------------------------------------------


def tree_env(tree: Tree) -> dict[str, str]:
    return {"PYTHONPATH": str(tree.path / "src")}


def cli() -> list[str]:
    return [PY, "-m", "threadline.cli"]


def check_tree(tree: Tree) -> None:
    """The tree's code is what a server started with its PYTHONPATH imports; records its revision."""
    where = subprocess.run([PY, "-c", "import threadline; print(threadline.__file__)"], env={
        **os.environ, **tree_env(tree)}, capture_output=True, text=True, check=True).stdout.strip()
    if not Path(where).resolve().is_relative_to((tree.path / "src").resolve()):
        raise SystemExit(f"--tree {tree.name}: PYTHONPATH={tree.path}/src imports threadline from {where}")
    rev = subprocess.run(["git", "-C", str(tree.path), "log", "-1", "--format=%h %s"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(tree.path), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    tree.rev = (rev.stdout.strip()[:70] or "?") + (" (+uncommitted changes)" if dirty else "")


def create_key(tree: Tree, cfg: Path) -> str:
    out = subprocess.run([*cli(), "keys", "create", "--config", str(cfg), "--app", "default"], check=True,
                         capture_output=True, text=True, env={**os.environ, **tree_env(tree)}).stdout
    return out.strip().splitlines()[-1].strip()


async def start_tree(tree: Tree, work: Path, upstream: int, postgres: bool) -> procs.Proc:
    cfg = work / f"{tree.name}.toml"
    url = (await seed.fresh_postgres(f"threadline_turn_compare_{tree.name}") if postgres
           else f"sqlite+aiosqlite:///{work}/{tree.name}.db")
    write_config(cfg, url, upstream, upstream)
    tree.key = create_key(tree, cfg)
    tree.port = procs.free_port()
    argv = [*cli(), "serve", "--config", str(cfg), "--host", "127.0.0.1", "--port", str(tree.port)]
    tree.proc = procs.start(f"threadline-{tree.name}", argv, tree.port, work, tree_env(tree))
    await procs.wait_http(tree.proc, "/healthz")
    return tree.proc


async def tool_probe(tree: Tree, stream: bool) -> str | None:
    """None when the tree runs a tool loop, else why not."""
    probe = OpenAITool(f"{tree.name}-probe", tree.port, tree.key, 2, stream)
    try:
        await probe.step()
    finally:
        probe.close()
    return probe.first_error or None


# ---- the run -----------------------------------------------------------------------------------------


async def measure(opts: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="threadline-turn-compare-"))
    trees = [Tree(n, p) for n, p in opts.tree]
    for t in trees:
        check_tree(t)
    started: list[procs.Proc] = []
    try:
        port = procs.free_port()
        up = procs.start("upstream", [PY, str(Path(__file__).parent / "upstream.py"), "--port", str(port)], port, work)
        started.append(up)
        await procs.wait_http(up, "/v1/models")
        for t in trees:
            started.append(await start_tree(t, work, port, opts.postgres))
        arms: list[Arm] = []
        notes: list[str] = []
        for t in trees:
            arms.append(OpenAIText(f"{t.name} text (openai)", t.port, t.key, opts.turns, opts.stream))
            if not opts.no_dify:
                arms.append(DifyText(f"{t.name} text (dify)", t.port, t.key, opts.turns, opts.stream))
            if opts.responses:
                arms.append(ResponsesText(f"{t.name} text (responses)", t.port, t.key, opts.turns, opts.stream))
            why = await tool_probe(t, opts.stream)
            if why is None:
                arms.append(OpenAITool(f"{t.name} tool (openai)", t.port, t.key, opts.turns, opts.stream))
            else:
                notes.append(f"{t.name}: no tool arm, its tool loop failed: {why[:200]}")
        arms.append(OpenAIText("direct upstream", port, "sk-upstream", opts.turns, opts.stream))

        print(f"warm-up {opts.warmup:g}s per arm, then {opts.rounds} rounds x {opts.seconds:g}s per arm "
              f"({len(arms)} arms) ...", flush=True)
        for arm in arms:
            arm.record = False
            await arm.run_for(opts.warmup)
            arm.record = True
            arm.reset()
        for r in range(opts.rounds):
            order = arms[r % len(arms):] + arms[:r % len(arms)]
            for arm in order:
                await arm.run_for(opts.seconds)
            print(f"  round {r + 1}/{opts.rounds} done", flush=True)
        for arm in arms:
            arm.close()
        return {"trees": {t.name: {"path": str(t.path), "rev": t.rev} for t in trees}, "stream": opts.stream,
                "rounds": opts.rounds, "seconds": opts.seconds, "turns": opts.turns, "notes": notes,
                "arms": {a.name: summary(a) for a in arms}, "logs": str(work)}
    finally:
        for p in reversed(started):
            p.stop()


def summary(arm: Arm) -> dict[str, Any]:
    out: dict[str, Any] = {"failures": arm.failures, "first_error": arm.first_error,
                           "broken_continuations": arm.broken, "kinds": {}}
    for kind, s in arm.samples.items():
        out["kinds"][kind] = {
            "n": len(s.client_ms),
            "client_p50_ms": pct(s.client_ms, 50), "client_p90_ms": pct(s.client_ms, 90),
            "overhead_p50_ms": pct(s.overhead_ms, 50) if s.overhead_ms else None,
            "overhead_p90_ms": pct(s.overhead_ms, 90) if s.overhead_ms else None,
        }
    return out


# ---- the report --------------------------------------------------------------------------------------


def f(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def ratio(a: float | None, b: float | None, scale: float = 1.0) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / (b * scale):.3f}"


def render(res: dict[str, Any]) -> str:
    lines = ["trees: " + "; ".join(f"{n} = {t['path']} @ {t['rev']}" for n, t in res["trees"].items()),
             f"{'streaming' if res['stream'] else 'blocking'}, concurrency 1, {res['rounds']} rounds x "
             f"{res['seconds']:g}s per arm, {res['turns']} requests per conversation", ""]
    rows = []
    for name, a in res["arms"].items():
        for kind, k in a["kinds"].items():
            label = name if kind == "turn" else f"{name}: {kind}"
            rows.append([label, str(k["n"]), f(k["overhead_p50_ms"]), f(k["overhead_p90_ms"]),
                         f(k["client_p50_ms"]), f(k["client_p90_ms"])])
        bad = sum(a["failures"].values())
        if bad or a["broken_continuations"]:
            rows.append([f"  ^ {name}: {bad} failed {a['failures'] or ''}, "
                         f"{a['broken_continuations']} turns in a new conversation", "", "", "", "", ""])
        if a["first_error"]:
            rows.append([f"  ^ first failure: {a['first_error'][:160]}", "", "", "", "", ""])
    lines.append(table(["arm", "n", "overhead p50 ms", "overhead p90 ms", "latency p50 ms", "latency p90 ms"],
                       rows))

    arms = res["arms"]
    names = list(res["trees"])
    base = names[0]

    def k(arm: str, kind: str = "turn") -> dict[str, Any] | None:
        a = arms.get(arm)
        return a["kinds"].get(kind) if a else None

    ratios = []
    for t in names[1:]:
        for route in ("openai", "dify"):
            new, old = k(f"{t} text ({route})"), k(f"{base} text ({route})")
            if new and old:
                o = ratio(new["overhead_p50_ms"], old["overhead_p50_ms"])
                ratios.append([f"{t} / {base} text ({route})", o, ratio(new["client_p50_ms"], old["client_p50_ms"]),
                               "<= 1.10", verdict(o, 1.10)])
    for t in names:
        resp, dify = k(f"{t} text (responses)"), k(f"{t} text (dify)")
        if resp and dify:
            o = ratio(resp["overhead_p50_ms"], dify["overhead_p50_ms"])
            ratios.append([f"{t}: responses / chat-messages", o, ratio(resp["client_p50_ms"], dify["client_p50_ms"]),
                           "<= 1.20", verdict(o, 1.20)])
    for t in names:
        text = k(f"{t} text (openai)")
        if not text:
            continue
        for kind, scale, label in (("tool call", 1.0, "tool-call request / text turn"),
                                   ("tool result", 1.0, "tool-result request / text turn"),
                                   ("loop", 2.0, "tool loop / 2 text turns")):
            tk = k(f"{t} tool (openai)", kind)
            if tk:
                o = ratio(tk["overhead_p50_ms"], text["overhead_p50_ms"], scale)
                ratios.append([f"{t}: {label}", o, ratio(tk["client_p50_ms"], text["client_p50_ms"], scale),
                               "<= 1.20", verdict(o, 1.20)])
    if ratios:
        lines += ["", table(["ratio of p50s", "overhead", "latency", "target (overhead)", ""], ratios)]
    lines += [f"note: {n}" for n in res["notes"]]
    lines.append(f"server logs: {res['logs']}")
    return "\n".join(lines)


def verdict(r: str, limit: float) -> str:
    return "-" if r == "-" else ("ok" if float(r) <= limit else "OVER")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", action="append", required=True, metavar="NAME=PATH",
                    type=lambda s: tuple(s.split("=", 1)) if "=" in s else ap.error(f"--tree {s}: NAME=PATH"),
                    help="a source tree to serve (repeatable); the first is the baseline of the ratios")
    ap.add_argument("--seconds", type=float, default=5.0, help="seconds per arm per round (default 5)")
    ap.add_argument("--rounds", type=int, default=6, help="rounds, arms rotated each round (default 6)")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of unrecorded warm-up per arm (default 2)")
    ap.add_argument("--turns", type=int, default=8, help="requests per conversation before a new one (default 8)")
    ap.add_argument("--stream", action="store_true", help="streamed requests instead of blocking ones")
    ap.add_argument("--no-dify", action="store_true", help="skip the /v1/chat-messages arms")
    ap.add_argument("--responses", action="store_true",
                    help="add /v1/responses arms (chained by previous_response_id) and their ratio to chat-messages")
    ap.add_argument("--postgres", action="store_true", help="fresh PostgreSQL databases instead of SQLite files")
    ap.add_argument("--out", help="also write the results as JSON here")
    opts = ap.parse_args()
    opts.tree = [(n, Path(p).resolve()) for n, p in opts.tree]
    names = [n for n, _ in opts.tree]
    if len(set(names)) != len(names) or not all(re.fullmatch(r"[A-Za-z0-9_-]+", n) for n in names):
        ap.error("--tree names must be distinct and use letters, digits, '-' or '_'")
    import uvloop

    res = uvloop.run(measure(opts))
    print(render(res))
    if opts.out:
        Path(opts.out).write_text(json.dumps(res, indent=2))
        print(f"JSON: {opts.out}")


if __name__ == "__main__":
    main()
