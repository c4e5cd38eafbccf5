"""The pinned CLI commands, run as a user would run them."""

from __future__ import annotations

import subprocess
import sys
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
