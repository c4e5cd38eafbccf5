"""The embedded local engine on the REAL model: SmolLM2-135M-Instruct behind llama.cpp's server
(xllamacpp, the [local] extra), driven through `threadline serve`'s app like any client would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.doubles.live import LiveServer
from threadline.config import Settings, local_engine_available, local_model_path
from threadline.engines import local
from threadline.server.app import create_app

KEY_VARS = ("NVIDIA_API_KEY", "XAI_API_KEY", "DEEPSEEK_API_KEY", "OPENAI_API_KEY", "GEMINI_API_KEY", "DIFY_API_KEY")


def _helpers() -> list[int]:
    """Pids of this process's llama.cpp helpers, read from /proc (not from the registry under test)."""
    me, pids = os.getpid(), []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == me and b"llama_server.py" in cmd:
            pids.append(int(d.name))
    return pids


def _cpu_seconds(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def _wait(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def serve(tmp_path, monkeypatch) -> Iterator:
    """Start `threadline serve`'s app (open access) on a free port; every helper is gone afterwards."""
    for var in KEY_VARS:
        monkeypatch.delenv(var, raising=False)
    started: list[LiveServer] = []

    def start(engines: dict | None = None, name: str = "l") -> str:
        settings = Settings.build(database_url=f"sqlite+aiosqlite:///{tmp_path}/{name}.db", engines=engines)
        srv = LiveServer(create_app(settings, open_access=True)).start()
        started.append(srv)
        return srv.url

    yield start
    for srv in started:
        srv.stop()
    assert _wait(lambda: not _helpers()), "a llama.cpp helper outlived the gateways that used it"
    assert local.running_servers() == []


def test_local_model_is_installed_for_ci():
    # CI installs the [local] extra; without it this suite must fail, not skip.
    assert local_engine_available() is None


def test_no_keys_server_turn_answers_from_the_real_local_model(serve):
    assert Settings.build(database_url="sqlite+aiosqlite://").default_engine == "local"
    url = serve()
    with httpx.Client(base_url=url, timeout=120) as c:
        r = c.post("/v1/chat-messages", json={"query": "What is the capital of France?", "user": "u", "inputs": {}})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["answer"].strip()
        r2 = c.post("/v1/chat-messages", json={"query": "Say it again.", "user": "u", "inputs": {},
                                               "conversation_id": body["conversation_id"]})
        assert r2.status_code == 200 and r2.json()["answer"].strip()
        m = c.get("/v1/messages", params={"conversation_id": body["conversation_id"], "user": "u"}).json()
        assert len(m["data"]) == 2


def _prompt_tokens(question: str) -> int:
    """What llama.cpp itself counts for a one-message conversation, asked of the running helper."""
    (srv,) = local.running_servers()
    h = {"Authorization": f"Bearer {srv.secret}"}
    prompt = httpx.post(f"{srv.url}/apply-template", headers=h,
                        json={"messages": [{"role": "user", "content": question}]}).json()["prompt"]
    toks = httpx.post(f"{srv.url}/tokenize", headers=h, json={"content": prompt, "parse_special": True}).json()
    return len(toks["tokens"])


def test_dify_streaming_answer_with_llama_cpps_own_token_counts(serve):
    url = serve({"local": {"kind": "local", "max_output_tokens": 48}})
    q = "Name three colours."
    with httpx.Client(base_url=url, timeout=120) as c:
        pieces, end = [], None
        with c.stream("POST", "/v1/chat-messages", json={"query": q, "user": "u", "inputs": {},
                                                         "response_mode": "streaming"}) as s:
            assert s.status_code == 200
            for line in s.iter_lines():
                if line.startswith("data: "):
                    ev = json.loads(line[6:])
                    if ev["event"] == "message":
                        pieces.append(ev["answer"])
                    elif ev["event"] == "message_end":
                        end = ev
                    assert ev["event"] != "error", ev
        assert end is not None and end["metadata"]["status"] == "completed" and end["metadata"]["engine"] == "local"
        assert len(pieces) >= 3 and "".join(pieces).strip()
        usage = end["metadata"]["usage"]
        # Real counts from llama.cpp, not estimates: the prompt is exactly what its tokenizer makes of
        # the templated conversation, and every streamed piece is at least one generated token.
        assert usage["prompt_tokens"] == _prompt_tokens(q)
        assert len(pieces) <= usage["completion_tokens"] <= 48
        m = c.get("/v1/messages", params={"conversation_id": end["conversation_id"], "user": "u"}).json()["data"][-1]
        assert m["answer"] == "".join(pieces) and m["threadline_status"] == "completed"
        assert m["message_tokens"] == usage["prompt_tokens"]


def test_openai_route_streams_from_the_local_engine(serve):
    url = serve({"local": {"kind": "local", "max_output_tokens": 48}})
    q = "Say hello."
    with httpx.Client(base_url=url, timeout=120) as c:
        chunks, usage, done = [], None, False
        with c.stream("POST", "/v1/chat/completions", json={
                "model": "local", "messages": [{"role": "user", "content": q}], "stream": True,
                "stream_options": {"include_usage": True}, "user": "u"}) as s:
            assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
            for line in s.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                ev = json.loads(line[6:])
                assert ev["object"] == "chat.completion.chunk"
                for ch in ev["choices"]:
                    if ch["delta"].get("content"):
                        chunks.append(ch["delta"]["content"])
                if ev.get("usage"):
                    usage = ev["usage"]
        assert done and len(chunks) >= 3 and "".join(chunks).strip()
        assert usage is not None and usage["prompt_tokens"] == _prompt_tokens(q)
        assert len(chunks) <= usage["completion_tokens"] <= 48


def test_stop_mid_answer_keeps_the_partial_and_ends_generation_in_llama_cpp(serve):
    url = serve({"local": {"kind": "local", "max_output_tokens": 1024}})
    with httpx.Client(base_url=url, timeout=120) as c:
        got, task_id, cid, end = "", None, None, None
        with c.stream("POST", "/v1/chat-messages", json={
                "query": "Write a very long story about a dragon who learns to bake bread.", "user": "u",
                "inputs": {}, "response_mode": "streaming"}) as s:
            n = 0
            for line in s.iter_lines():
                if not line.startswith("data: "):
                    continue
                ev = json.loads(line[6:])
                if ev["event"] == "message":
                    got += ev["answer"]
                    task_id, cid = ev["task_id"], ev["conversation_id"]
                    n += 1
                    if n == 8:
                        r = c.post(f"/v1/chat-messages/{task_id}/stop", json={"user": "u"})
                        assert r.status_code == 200 and r.json() == {"result": "success"}
                elif ev["event"] in ("message_end", "workflow_finished"):
                    end = ev
        # A stopped turn ends as Dify's does: workflow_finished, status stopped (Threadline's metadata added).
        assert end is not None and end["event"] == "workflow_finished" and end["data"]["status"] == "stopped"
        assert end["metadata"]["status"] == "stopped"
        assert end["metadata"]["usage"]["completion_tokens"] < 1024
        m = c.get("/v1/messages", params={"conversation_id": cid, "user": "u"}).json()["data"][-1]
        assert m["threadline_status"] == "stopped"
        assert m["answer"] == got and got.strip()
        # Closing the upstream stream stopped llama.cpp too: its helper goes idle, not on for nobody.
        (pid,) = _helpers()
        time.sleep(0.5)
        before = _cpu_seconds(pid)
        time.sleep(1.0)
        assert _cpu_seconds(pid) - before < 0.2


IMAGE = "https://example.com/cat.png"


@pytest.mark.parametrize("mode", ["blocking", "streaming"])
def test_image_turn_is_refused_with_a_400_naming_the_engine_on_the_dify_route(serve, mode):
    url = serve()
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/chat-messages", json={
            "query": "What is in this picture?", "user": "u", "inputs": {}, "response_mode": mode,
            "files": [{"type": "image", "transfer_method": "remote_url", "url": IMAGE}]})
        assert r.status_code == 400, r.text
        body = r.json()
        assert body["code"] == "unsupported_input" and body["status"] == 400
        assert "'local'" in body["message"] and "image" in body["message"]
        # Refused before anything was stored or started.
        assert c.get("/v1/conversations", params={"user": "u"}).json()["data"] == []
    assert _helpers() == []


def test_image_turn_is_refused_with_a_400_naming_the_engine_on_the_openai_route(serve):
    url = serve()
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/chat/completions", json={"model": "local", "user": "u", "messages": [
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": {"url": IMAGE}}]}]})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "unsupported_input" and err["type"] == "invalid_request_error"
        assert "'local'" in err["message"]
        assert c.get("/v1/conversations", params={"user": "u"}).json()["data"] == []


def test_two_engines_in_two_gateways_share_one_model_load(serve):
    path = local_model_path()
    engines = {"local": {"kind": "local", "max_output_tokens": 16},
               "tiny": {"kind": "local", "model_path": path, "max_output_tokens": 16}}
    urls = [serve(engines, "a"), serve(engines, "b")]
    assert _helpers() == []  # nothing loads before the first turn
    results: list[int] = []

    def turn(url: str, engine: str) -> None:
        r = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "model": engine, "messages": [{"role": "user", "content": "hi"}], "user": f"u-{engine}"})
        results.append(r.status_code)

    # Four first turns at once, two gateways x two engines: one startup, one helper, one load.
    threads = [threading.Thread(target=turn, args=(u, e)) for u in urls for e in ("local", "tiny")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200, 200, 200, 200]
    assert len(_helpers()) == 1
    (srv,) = local.running_servers()
    assert len(srv.users) == 4 and srv.pid == _helpers()[0]


def test_cli_engines_reports_the_local_engine(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "COLUMNS": "200", "HOME": str(tmp_path)}
    run = [sys.executable, "-c", "import sys\n{hide}sys.argv = ['threadline', 'engines']\n"
           "from threadline.cli import main\nmain()"]

    def engines(hide: str) -> str:
        out = subprocess.run([*run[:2], run[2].format(hide=hide)], capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode == 0, out.stderr
        (line,) = [ln for ln in out.stdout.splitlines() if "smollm2-135m-instruct" in ln]
        return line

    assert "ready (default)" in engines("")
    # Without llama.cpp's wheel the engine is listed as unusable, with the reason and the fix.
    line = engines("sys.modules['xllamacpp'] = None\n")
    assert "unavailable" in line and "xllamacpp" in line and "threadline[local]" in line


def test_loading_the_model_does_not_block_the_server(serve):
    """The first turn starts llama.cpp; meanwhile the same server keeps answering other requests."""
    url = serve({"local": {"kind": "local", "max_output_tokens": 8}})
    done = threading.Event()
    status: list[int] = []

    def first_turn() -> None:
        r = httpx.post(f"{url}/v1/chat-messages", json={"query": "hi", "user": "u", "inputs": {}}, timeout=120)
        status.append(r.status_code)
        done.set()

    began = time.monotonic()
    threading.Thread(target=first_turn).start()
    worst, polls = 0.0, 0
    with httpx.Client(base_url=url, timeout=30) as c:
        while not done.is_set():
            t = time.monotonic()
            assert c.get("/healthz").status_code == 200
            worst, polls = max(worst, time.monotonic() - t), polls + 1
            time.sleep(0.02)
    took = time.monotonic() - began
    assert status == [200]
    # A load holding the GIL (in-process: 1.07 s of a ~1.5 s first turn on an idle machine, 8 s with
    # warmup) shows as one poll lasting most of the turn; relative, so a busy machine slows both alike.
    assert polls >= 5 and worst < 0.4 * took, (polls, worst, took)


def test_switching_to_the_local_engine_with_images_in_history_is_refused(serve, oai):
    _, oai_url = oai
    url = serve({"acc": {"kind": "openai", "base_url": f"{oai_url}/v1", "api_key": "sk-test-double-key", "model": "m"}})
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/chat-messages", json={
            "query": "What is this?", "user": "u", "inputs": {}, "engine": "acc",
            "files": [{"type": "image", "transfer_method": "remote_url", "url": IMAGE}]})
        assert r.status_code == 200, r.text
        cid = r.json()["conversation_id"]
        r = c.post("/v1/chat-messages", json={"query": "And now?", "user": "u", "inputs": {}, "engine": "local",
                                              "conversation_id": cid})
        assert r.status_code == 400 and r.json()["code"] == "unsupported_input"
        assert "'local'" in r.json()["message"] and "history" in r.json()["message"]
    assert _helpers() == []  # refused before llama.cpp was started for it


CAPITAL_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                   "country": {"type": "string", "maxLength": 24}},
                  "required": ["city", "country"], "additionalProperties": False}


async def test_json_schema_response_format_is_grammar_constrained_by_llama_cpp(sqlite_url, monkeypatch):
    """Through the Python API: the schema reaches llama.cpp's body as OpenAI's json_schema shape and
    llama.cpp constrains the answer to it. The question asks for no JSON: a 135M model answering in
    prose otherwise, only the grammar makes the answer this object."""
    from threadline import AsyncThreadline
    from threadline.messages import GenerationParams, ResponseFormat

    bodies: list[dict] = []
    build = local.LocalEngine.build_body

    def spy(self, req):  # type: ignore[no-untyped-def]
        body = build(self, req)
        bodies.append(body)
        return body

    monkeypatch.setattr(local.LocalEngine, "build_body", spy)
    tl = AsyncThreadline(database_url=sqlite_url, engines={"local": {"kind": "local", "max_output_tokens": 64}},
                         include_presets=False)
    try:
        fmt = ResponseFormat("json_schema", CAPITAL_SCHEMA, "capital", True)
        r = await tl.chat("What is the capital of France?", user="u", engine="local",
                          params=GenerationParams(response_format=fmt))
        assert bodies[-1]["response_format"] == {"type": "json_schema", "json_schema": {
            "name": "capital", "schema": CAPITAL_SCHEMA, "strict": True}}
        assert r.status == "completed" and r.finish_reason == "stop", r.answer
        answer = json.loads(r.answer)
        assert set(answer) == {"city", "country"}
        assert all(isinstance(v, str) and len(v) <= 24 for v in answer.values())
    finally:
        await tl.aclose()
    assert _wait(lambda: not _helpers())


async def test_tools_on_the_local_engine_are_refused_naming_tools(sqlite_url):
    """The local profile runs no caller-defined tools: a 400 naming `tools`, before anything starts."""
    from threadline import AsyncThreadline
    from threadline.errors import UnsupportedParameterError
    from threadline.messages import ToolSpec

    tl = AsyncThreadline(database_url=sqlite_url, engines={"local": {"kind": "local"}}, include_presets=False)
    try:
        with pytest.raises(UnsupportedParameterError) as e:
            await tl.chat("weather?", user="u", engine="local",
                          tools=[ToolSpec("get_weather", "The weather", {"type": "object", "properties": {}})])
        assert e.value.param == "tools" and e.value.status == 400 and "'local'" in e.value.message
        assert await tl.conversations(user="u") == []
    finally:
        await tl.aclose()
    assert _helpers() == []


def test_tools_on_the_local_engine_are_refused_on_the_openai_route(serve):
    url = serve()
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/chat/completions", json={
            "model": "local", "user": "u", "messages": [{"role": "user", "content": "weather?"}],
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "unsupported_parameter" and err["param"] == "tools"
    assert _helpers() == []  # refused before llama.cpp was started for it


def test_structured_output_parses_through_serve_on_the_local_model(serve):
    """The same through `threadline serve`'s OpenAI route (open mode: no key): the answer llama.cpp's
    grammar shaped parses into the caller's own pydantic model, as the SDK's `parse` would do."""
    from pydantic import BaseModel, Field

    class Capital(BaseModel):
        city: str = Field(max_length=24)
        country: str = Field(max_length=24)

    url = serve({"local": {"kind": "local", "max_output_tokens": 64}})
    fmt = {"type": "json_schema", "json_schema": {"name": "capital", "schema": CAPITAL_SCHEMA, "strict": True}}
    r = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": "local", "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "response_format": fmt, "user": "u"})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    parsed = Capital.model_validate_json(choice["message"]["content"])
    assert parsed.city and parsed.country and choice["finish_reason"] == "stop"
