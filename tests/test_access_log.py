"""`threadline serve` writes an access log by default (issue 17, item 8): one line per request with
method, path, status, duration and app, through both lanes (the chat POSTs' fast lane and the full
stack), and never a key, a body or a query string. `--no-access-log` and `[server] access_log = false`
turn it off."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest

from tests.doubles.live import serve_process

SECRET_USER = "alice-query-secret-4711"
SECRET_TEXT = "body-secret-text-0815"


def config(tmp: Path, url: str, server: str = "") -> str:
    return f'''database_url = "sqlite+aiosqlite:///{tmp}/serve.db"
{server}
[engines.acc]
kind = "openai"
base_url = "{url}/v1"
api_key = "sk-test-double-key"
model = "m"
[apps.demo]
engine = "acc"
'''


def access_lines(tmp: Path) -> list[dict]:
    """The access log's records: `<time> {json}` lines of serve.log."""
    out = []
    for line in (tmp / "serve.log").read_text().splitlines():
        m = re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (\{.*\})$", line)
        if m:
            rec = json.loads(m.group(1))
            if "method" in rec and "path" in rec:
                out.append(rec)
    return out


def calls(url: str, key: str) -> None:
    h = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, headers=h, timeout=30) as c:
        r = c.post("/v1/chat-messages", json={"query": SECRET_TEXT, "user": SECRET_USER, "inputs": {}})  # fast lane
        assert r.status_code == 200, r.text
        r = c.get("/v1/conversations", params={"user": SECRET_USER, "limit": 5})  # full stack, query string
        assert r.status_code == 200, r.text
        r = c.get("/v1/messages", params={"user": SECRET_USER})  # an error: conversation_id missing
        assert r.status_code == 400, r.text
    r = httpx.get(f"{url}/v1/conversations", params={"user": SECRET_USER},
                  headers={"Authorization": "Bearer app-not-a-real-key-1234"})
    assert r.status_code == 401


def wait_for(tmp: Path, n: int) -> list[dict]:
    deadline = time.monotonic() + 5
    while True:
        lines = access_lines(tmp)
        if len(lines) >= n or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_serve_logs_each_request_with_status_and_app_and_no_secret(openai_double, tmp_path) -> None:
    openai_double[0].reset()
    with serve_process(config(tmp_path, openai_double[1]), tmp_path, "demo") as (url, keys):
        calls(url, keys["demo"])
        lines = wait_for(tmp_path, 5)
    got = [(r["method"], r["path"], r["status"], r["app"]) for r in lines if r["path"] != "/healthz"]
    assert got == [("POST", "/v1/chat-messages", 200, "demo"), ("GET", "/v1/conversations", 200, "demo"),
                   ("GET", "/v1/messages", 400, "demo"), ("GET", "/v1/conversations", 401, None)], lines
    assert all(isinstance(r["ms"], float | int) and r["ms"] >= 0 for r in lines)
    log = (tmp_path / "serve.log").read_text()
    for secret in (keys["demo"], "app-not-a-real-key", SECRET_USER, SECRET_TEXT, "limit=", "Bearer"):
        assert secret not in log, secret
    assert "uvicorn.access" not in log and '" 200' not in log  # uvicorn's own access log stays off


@pytest.mark.parametrize("how", ["flag", "setting"])
def test_access_log_can_be_turned_off(openai_double, tmp_path, how: str) -> None:
    openai_double[0].reset()
    server = "[server]\naccess_log = false" if how == "setting" else ""
    args = ("--no-access-log",) if how == "flag" else ()
    with serve_process(config(tmp_path, openai_double[1], server), tmp_path, "demo", args=args) as (url, keys):
        calls(url, keys["demo"])
        time.sleep(0.3)
    assert access_lines(tmp_path) == []
    assert "Threadline on http://" in (tmp_path / "serve.log").read_text()  # the log was written, just not this


def test_flag_overrides_the_setting(openai_double, tmp_path) -> None:
    openai_double[0].reset()
    server = "[server]\naccess_log = false"
    with serve_process(config(tmp_path, openai_double[1], server), tmp_path, "demo",
                       args=("--access-log",)) as (url, keys):
        calls(url, keys["demo"])
        lines = wait_for(tmp_path, 5)
    assert ("POST", "/v1/chat-messages", 200, "demo") in [(r["method"], r["path"], r["status"], r["app"])
                                                          for r in lines]
