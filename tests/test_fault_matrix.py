"""The fault matrix (issue 12): every way an upstream fails × blocking and streaming × both chat routes
× the three engine kinds, against one live server with one app per engine (`max_retries: 0`, a
short `timeout`), each engine behind its strict double put into the fault for the case.

What every case checks:
- the HTTP status and error code the client gets, in its route's shape. A failure before the engine
  accepted the request (a 429, a 500, and anything in blocking mode) is the error's own status; one
  after a stream started is a 200 stream that ends in an error event carrying the code;
- `Retry-After` on a 429 when the upstream said how long to wait;
- the turn as stored: `failed` (never `completed` or `streaming`), the question kept, the partial
  answer kept exactly as the client saw it, and the error JSON with the same code and status;
- no engine's API key anywhere in what the server said.
"""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.doubles.dify_double import DifyDouble
from tests.doubles.gemini_double import GeminiDouble
from tests.doubles.live import LiveServer
from tests.doubles.openai_double import FAULTS, OpenAIDouble
from threadline.config import Settings
from threadline.server.app import create_app
from threadline.server.keys import create_key

MODES = ("blocking", "streaming")
ROUTES = ("dify", "openai")
ENGINES = ("openai", "gemini", "dify")
APP = {"openai": "oai-app", "gemini": "gem-app", "dify": "dfy-app"}
KEYS = {"openai": "sk-test-double-key", "gemini": "AIza-test-double-key-0000", "dify": "app-dify-double-key"}
TIMEOUT = 0.5  # the engines' read timeout; a double in `timeout` stays silent for STALL
STALL = 2.0
AFTER = 2  # answer chunks a stream sends before its fault
REPLY = "one two three four five six"  # the stateless doubles' answer, in 4-character chunks
QUERY = "hello"
OPENAI_RETRY_AFTER = "2"  # seconds, as OpenAI's retry-after header
GEMINI_RETRY_DELAY = "1.5s"  # Gemini's RetryInfo.retryDelay: the client is told ceil() = 2

# A failure before the engine accepted the request: the same status and code in both modes.
BEFORE_ACCEPT = {"429": (429, "rate_limit_error"), "500": (502, "upstream_unavailable")}
# Once accepted, blocking still answers with the error's status ...
BLOCKING = {
    "timeout": (504, "upstream_timeout"),
    "reset": (502, "upstream_unavailable"),
    "cut": (502, "upstream_bad_response"),  # a JSON body cut short does not parse
    "malformed": (502, "upstream_bad_response"),
    "error_event": (400, "completion_request_error"),  # the provider's own 4xx for the request
}
# ... and a stream that started ends in an error event with the error's code (and status, on Dify's route).
STREAMING = {
    "timeout": (504, "upstream_timeout"),
    "reset": (502, "upstream_unavailable"),
    "cut": (502, "upstream_truncated"),
    "malformed": (502, "upstream_bad_response"),
    "error_event": (502, "upstream_stream_error"),
}
# Dify's own codes where a Dify engine reports the failure in Dify's words.
DIFY_ENGINE = {
    ("error_event", "blocking"): (400, "invalid_param"),  # fixture 076: 400 "Run failed: ..."
    ("error_event", "streaming"): (400, "invalid_param"),  # fixture 075: failed workflow_finished
}
OPENAI_TYPES = {400: "invalid_request_error", 429: "rate_limit_error"}  # anything else: api_error


def expected(fault: str, mode: str, engine: str) -> tuple[int, str, bool]:
    """(status, code, in_stream): in_stream means a 200 stream that ends in an error event."""
    if engine == "dify" and (fault, mode) in DIFY_ENGINE:
        status, code = DIFY_ENGINE[fault, mode]
        return status, code, mode == "streaming" and fault not in BEFORE_ACCEPT
    if fault in BEFORE_ACCEPT:
        return (*BEFORE_ACCEPT[fault], False)
    if mode == "blocking":
        return (*BLOCKING[fault], False)
    return (*STREAMING[fault], True)


def expected_partial(fault: str, mode: str, engine: str) -> str:
    """The answer text that came before the fault: only a stream that started has any."""
    if mode == "blocking" or fault in BEFORE_ACCEPT:
        return ""
    if engine == "dify":  # the echo chatflow streams its answer a line per message event
        return f"echo: {QUERY}\nturn: 0\n"
    return REPLY[:AFTER * 4]


@dataclass
class Matrix:
    url: str
    keys: dict[str, str]  # engine → Threadline app key
    doubles: dict[str, Any]
    db: Path
    http: httpx.Client  # one for the module: making a client costs more than a case


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory):
    doubles = {"openai": OpenAIDouble(), "gemini": GeminiDouble(), "dify": DifyDouble()}
    servers = {name: LiveServer(d.app()).start() for name, d in doubles.items()}
    db = tmp_path_factory.mktemp("faults") / "faults.db"
    common = {"max_retries": 0, "timeout": TIMEOUT}
    settings = Settings.build(
        database_url=f"sqlite+aiosqlite:///{db}",
        engines={
            "oai": {"kind": "openai", "base_url": f"{servers['openai'].url}/v1", "api_key": KEYS["openai"], "model": "m",
                    **common},
            "gem": {"kind": "gemini", "base_url": f"{servers['gemini'].url}/v1beta", "api_key": KEYS["gemini"],
                    "model": "gemini-2.0-flash", **common},
            "dfy": {"kind": "dify", "base_url": f"{servers['dify'].url}/v1", "api_key": KEYS["dify"], **common},
        },
        apps={APP["openai"]: {"engine": "oai"}, APP["gemini"]: {"engine": "gem"}, APP["dify"]: {"engine": "dfy"}},
        include_presets=False,
    )
    keys = {engine: asyncio.run(create_key(settings, app)) for engine, app in APP.items()}
    srv = LiveServer(create_app(settings)).start()
    with httpx.Client(base_url=srv.url, timeout=30) as http:
        m = Matrix(srv.url, keys, doubles, db, http)
        for engine in ENGINES:  # without a fault each app answers (and every connection is warm)
            put_in_fault(m, engine, None)
            r = http.post("/v1/chat-messages", headers={"Authorization": f"Bearer {keys[engine]}"},
                          json={"inputs": {}, "query": QUERY, "user": "warm-up", "response_mode": "blocking"})
            assert r.status_code == 200 and r.json()["answer"] in (REPLY, f"echo: {QUERY}\nturn: 0\nprevious: \nnickname: \n")
        yield m
    srv.stop()
    for s in servers.values():
        s.stop()


def put_in_fault(m: Matrix, engine: str, fault: str | None, **extra: Any) -> Any:
    d = m.doubles[engine]
    kw: dict[str, Any] = {"fault": fault, "fault_after": AFTER, "stall": STALL, **extra}
    if engine == "openai":
        kw = {"reply": REPLY, "chunk_size": 4, "retry_after": OPENAI_RETRY_AFTER, **kw}
    elif engine == "gemini":
        kw = {"reply": REPLY, "chunk_size": 4, "retry_delay": GEMINI_RETRY_DELAY, **kw}
    return d.reset(**kw)


def data_lines(raw: str) -> list[str]:
    return [line[6:] for block in raw.split("\n\n") for line in block.split("\n") if line.startswith("data: ")]


@dataclass
class Outcome:
    status: int
    code: str | None
    frame_status: int | None  # the status inside a Dify-route error event or error body
    retry_after: str | None
    streamed: str  # answer text the client received
    conversation_id: str | None
    said: str  # everything the server said: headers and body


def ask(m: Matrix, engine: str, route: str, mode: str, user: str) -> Outcome:
    h = {"Authorization": f"Bearer {m.keys[engine]}"}
    streaming = mode == "streaming"
    if route == "dify":
        path, body = "/v1/chat-messages", {"inputs": {}, "query": QUERY, "user": user, "response_mode": mode,
                                           "conversation_id": ""}
    else:
        path, body = "/v1/chat/completions", {"model": APP[engine], "messages": [{"role": "user", "content": QUERY}],
                                              "stream": streaming, "user": user}
    with m.http.stream("POST", path, json=body, headers=h) as r:
        raw = r.read().decode()
    said = json.dumps(dict(r.headers)) + raw
    cid = r.headers.get("x-threadline-conversation-id")
    out = Outcome(r.status_code, None, None, r.headers.get("retry-after"), "", cid, said)
    if r.status_code != 200:
        err = r.json()
        if route == "dify":
            assert set(err) == {"code", "message", "status"}, err
            out.code, out.frame_status = err["code"], err["status"]
        else:
            e = err["error"]
            assert set(e) == {"message", "type", "param", "code"}, err
            assert e["type"] == OPENAI_TYPES.get(r.status_code, "api_error")
            out.code = e["code"]
        assert cid, "a failed turn names the conversation that keeps the question"
        return out
    assert streaming, f"a blocking turn that failed answered 200: {raw[:300]}"
    assert r.headers["content-type"].startswith("text/event-stream")
    payloads = data_lines(raw)
    if route == "dify":
        events = [json.loads(p) for p in payloads]
        assert not [e for e in events if e["event"] == "message_end"], "a failed stream must not end as completed"
        errors = [e for e in events if e["event"] == "error"]
        assert len(errors) == 1 and events[-1] is errors[0], events[-3:]
        out.code, out.frame_status = errors[0]["code"], errors[0]["status"]
        assert set(errors[0]) >= {"conversation_id", "message_id", "code", "status", "message"}
        out.conversation_id = errors[0]["conversation_id"]
        out.streamed = "".join(e["answer"] for e in events if e["event"] == "message")
    else:
        assert payloads[-1] == "[DONE]"
        chunks = [json.loads(p) for p in payloads[:-1]]
        errors = [c for c in chunks if "error" in c]
        assert len(errors) == 1 and chunks[-1] is errors[0], chunks[-3:]
        assert set(errors[0]["error"]) == {"message", "type", "param", "code"}
        out.code = errors[0]["error"]["code"]
        assert not [c for c in chunks if c.get("choices") and c["choices"][0]["finish_reason"]], \
            "a failed stream must not carry a finish_reason"
        out.streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    return out


def stored_turn(m: Matrix, engine: str, cid: str, user: str) -> tuple[dict[str, Any], str]:
    r = m.http.get("/v1/messages", params={"conversation_id": cid, "user": user},
                   headers={"Authorization": f"Bearer {m.keys[engine]}"})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert len(data) == 1, data
    return data[0], r.text


def stored_row(m: Matrix, message_id: str) -> tuple[str, str, dict[str, Any]]:
    con = sqlite3.connect(m.db)
    try:
        status, content, error = con.execute("SELECT status, content, error FROM messages WHERE id = ?",
                                             (message_id,)).fetchone()
    finally:
        con.close()
    return status, content, json.loads(error)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fault", FAULTS)
def test_fault(matrix: Matrix, fault: str, mode: str, route: str, engine: str) -> None:
    d = put_in_fault(matrix, engine, fault)
    user = f"u-{uuid.uuid4().hex[:8]}"
    got = ask(matrix, engine, route, mode, user)
    status, code, in_stream = expected(fault, mode, engine)
    partial = expected_partial(fault, mode, engine)

    assert len(d.requests) == 1  # max_retries 0: one upstream call, whatever failed
    assert (got.status, got.code) == ((200, code) if in_stream else (status, code)), got.said[-600:]
    if route == "dify":
        assert got.frame_status == status
    if fault == "429":
        # The upstream's own delay; Dify's 429 names none (external_api.py sets no Retry-After), and a
        # 429 from Threadline always carries one: the least a rate limit asks, 1 s.
        want = {"openai": OPENAI_RETRY_AFTER, "gemini": str(math.ceil(float(GEMINI_RETRY_DELAY[:-1]))),
                "dify": "1"}[engine]
        assert got.retry_after == want
    else:  # nothing else is a 429
        assert got.retry_after is None
    assert got.streamed == partial

    turn, listing = stored_turn(matrix, engine, got.conversation_id, user)
    assert turn["query"] == QUERY
    assert turn["threadline_status"] == "failed"
    assert turn["status"] == "error" and turn["error"]
    assert turn["answer"] == partial
    row_status, row_content, row_error = stored_row(matrix, turn["id"])
    assert (row_status, row_content) == ("failed", partial)
    assert (row_error["code"], row_error["status"]) == (code, status)
    assert row_error["message"] == turn["error"]

    for key in KEYS.values():
        assert key not in got.said and key not in listing


@pytest.mark.parametrize("route", ROUTES)
def test_dify_error_event_mid_stream(matrix: Matrix, route: str) -> None:
    """Dify's other in-stream failure, the `error` event (code, status, message), keeps its code and
    status inside the stream and fails the turn with the partial answer."""
    put_in_fault(matrix, "dify", "error_event", error_kind="error", error_message="[openai] Rate limit reached")
    user = f"u-{uuid.uuid4().hex[:8]}"
    got = ask(matrix, "dify", route, "streaming", user)
    assert (got.status, got.code) == (200, "completion_request_error")
    if route == "dify":
        assert got.frame_status == 400
    assert got.streamed == f"echo: {QUERY}\nturn: 0\n"
    turn, _ = stored_turn(matrix, "dify", got.conversation_id, user)
    assert (turn["threadline_status"], turn["answer"]) == ("failed", got.streamed)
    assert turn["error"] == "[openai] Rate limit reached"
