"""The pinned CLI commands, run as a user would run them."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.doubles.live import LiveServer
from threadline.config import Settings
from threadline.server.app import create_app

EXE = str(Path(sys.executable).with_name("threadline"))


def _config(tmp_path: Path, oai_url: str) -> Path:
    cfg = tmp_path / "threadline.toml"
    cfg.write_text(f'''database_url = "sqlite+aiosqlite:///./cli.db"
[engines.acc]
kind = "openai"
base_url = "{oai_url}/v1"
api_key = "env:TL_TEST_KEY"
model = "m"
[apps.demo]
engine = "acc"
system = ["You are terse."]
''')
    return cfg


def test_keys_create_prints_key_last_and_it_authenticates(tmp_path, oai, monkeypatch):
    _, url = oai
    cfg = _config(tmp_path, url)
    env = {"TL_TEST_KEY": "sk-test-double-key", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([EXE, "keys", "create", "--config", str(cfg), "--app", "demo"], capture_output=True,
                         text=True, env=env, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip().splitlines()[-1]
    assert key.startswith("app-") and len(key) > 20
    assert (tmp_path / "cli.db").exists()  # relative to the config file
    listed = subprocess.run([EXE, "keys", "list", "--config", str(cfg)], capture_output=True, text=True, env=env,
                            timeout=60)
    assert key[:10] in listed.stdout and key not in listed.stdout  # only the prefix is ever shown again
    monkeypatch.setenv("TL_TEST_KEY", "sk-test-double-key")
    srv = LiveServer(create_app(Settings.from_file(cfg))).start()
    try:
        r = httpx.post(f"{srv.url}/v1/chat-messages", headers={"Authorization": f"Bearer {key}"},
                       json={"query": "hi", "user": "u", "inputs": {}})
        assert r.status_code == 200 and r.json()["answer"] == "Answer to: hi"
    finally:
        srv.stop()
    revoked = subprocess.run([EXE, "keys", "revoke", key[:10], "--config", str(cfg)], capture_output=True, text=True,
                             env=env, timeout=60)
    assert revoked.returncode == 0


def test_engines_lists_why_an_engine_is_unusable(tmp_path, oai):
    _, url = oai
    cfg = _config(tmp_path, url)
    out = subprocess.run([EXE, "engines", "--config", str(cfg)], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "COLUMNS": "200"}, timeout=60)
    assert out.returncode == 0
    assert "acc" in out.stdout and "nim" in out.stdout and "no API key" in out.stdout


def test_serve_workers_share_one_port_and_every_conversation(tmp_path, oai):
    """`serve --workers 2`: two processes on one port (each its own SO_REUSEPORT socket); turns sent
    on fresh connections land on either, and each still carries the whole history. Stopping the
    parent stops the workers."""
    d, url = oai
    cfg = _config(tmp_path, url)
    env = {"TL_TEST_KEY": "sk-test-double-key", "PATH": "/usr/bin:/bin"}
    key = subprocess.run([EXE, "keys", "create", "--config", str(cfg), "--app", "demo"], capture_output=True,
                         text=True, env=env, timeout=60, cwd=tmp_path).stdout.strip().splitlines()[-1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([EXE, "serve", "--config", str(cfg), "--port", str(port), "--workers", "2"], env=env,
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    children: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "server did not start"
            time.sleep(0.2)
        children = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        assert len(children) == 2
        d.reset()
        cid = ""
        for i in range(6):
            with httpx.Client(timeout=30) as c:  # a new connection every turn
                r = c.post(f"{base}/v1/chat-messages", headers={"Authorization": f"Bearer {key}"},
                           json={"query": f"q{i}", "user": "u", "inputs": {}, "conversation_id": cid})
            assert r.status_code == 200, r.text
            cid = r.json()["conversation_id"]
        sent = [(m["role"], m["content"]) for m in d.requests[-1]["messages"] if m["role"] != "system"]
        assert sent == [x for i in range(5) for x in (("user", f"q{i}"), ("assistant", f"Answer to: q{i}"))] + \
            [("user", "q5")]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_show_prints_a_conversations_api_conversation_with_its_tool_items(tmp_path, oai, monkeypatch):
    """`threadline show conv_…` takes the Conversations API's id and prints function calls and outputs."""
    import asyncio

    import openai
    from typer.testing import CliRunner

    from threadline.cli import app as cli
    from threadline.server.keys import create_key

    _, url = oai
    cfg = _config(tmp_path, url)
    monkeypatch.setenv("TL_TEST_KEY", "sk-test-double-key")
    monkeypatch.chdir(tmp_path)
    settings = Settings.from_file(str(cfg))
    key = asyncio.run(create_key(settings, "demo"))
    srv = LiveServer(create_app(settings)).start()
    try:
        c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=key, max_retries=0)
        conv = c.conversations.create(items=[
            {"role": "user", "content": "weather in Oslo?"},
            {"type": "function_call", "call_id": "call_9", "name": "get_weather", "arguments": '{"q":"Oslo"}'},
            {"type": "function_call_output", "call_id": "call_9", "output": "cold"},
            {"role": "assistant", "content": "It is cold [really]."}])
    finally:
        srv.stop()
    out = CliRunner().invoke(cli, ["show", conv.id, "--user", "openai-user", "--config", str(cfg)])
    assert out.exit_code == 0, out.output
    lines = [ln.strip() for ln in out.output.splitlines() if ln.strip()]
    assert lines[0].startswith("user") and lines[0].endswith("weather in Oslo?")
    assert lines[1] == 'assistant calls get_weather({"q":"Oslo"}) call_9'
    assert lines[2] == "tool call_9 → cold"
    assert lines[3].endswith("It is cold [really].")
