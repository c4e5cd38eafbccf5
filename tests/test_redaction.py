"""No engine key leaves Threadline (issue 12): upstreams that echo secrets, in a Dify `error` event, a
failed `workflow_finished`, Dify's blocking "Run failed" 400, an OpenAI-compatible 4xx body or
in-stream error, and an answer that spells out the engine's own key across stream chunks. The keys
must appear in none of: the client's response (both routes, headers and body), `/v1/messages`, the
`content` and `error` columns in the SQLite file, and the logs at DEBUG.

The engine keys here are deliberately not shaped like any provider's keys, so only the exact-key
redaction can catch them; the stray `sk-…` string is configured nowhere, so only the key-shape rule can.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.doubles.dify_double import DifyDouble
from tests.doubles.live import LiveServer
from tests.doubles.openai_double import OpenAIDouble
from threadline.config import Settings
from threadline.server.app import create_app
from threadline.server.keys import create_key

DIFY_KEY = "dfy-own-Secret-9Qx7Lm2Pz4"
OAI_KEY = "vllm-token-3Hv8Kd1Ws6Zq"
GEM_KEY = "AIzaSyD-unused-engine-key-77"  # a third engine's, never called
STRAY = "sk-proj-Zm9vYmFyYmF6cXV4MTIzNDU2"  # configured nowhere: only its shape gives it away
SECRETS = (DIFY_KEY, OAI_KEY, GEM_KEY, STRAY)
# A leak that is only partly masked still leaks: the distinctive tail of each must not appear either.
FRAGMENTS = tuple(s[-10:] for s in SECRETS)

ECHO = f"Invalid credentials: {DIFY_KEY} (fallback {OAI_KEY}, upstream {STRAY})"
ECHO_CLEAN = "Invalid credentials: *** (fallback ***, upstream ***)"
OAI_ECHO = f"Incorrect API key provided: {OAI_KEY}. Also tried {DIFY_KEY} and {STRAY}."
OAI_ECHO_CLEAN = "Incorrect API key provided: ***. Also tried *** and ***."
ANSWER = f"Your token is {OAI_KEY}, keep it safe."  # streamed in 5-character chunks: the key spans five
ANSWER_CLEAN = "Your token is ***, keep it safe."
MODERATED = f"Withheld: the reply quoted {DIFY_KEY}."  # Dify output moderation's replacement answer
MODERATED_CLEAN = "Withheld: the reply quoted ***."


@dataclass
class Env:
    http: httpx.Client
    keys: dict[str, str]  # app → Threadline app key
    oai: OpenAIDouble
    dify: DifyDouble
    db: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    oai, dify = OpenAIDouble(api_key=OAI_KEY), DifyDouble(api_key=DIFY_KEY)
    oai_srv, dify_srv = LiveServer(oai.app()).start(), LiveServer(dify.app()).start()
    db = tmp_path_factory.mktemp("redaction") / "r.db"
    settings = Settings.build(
        database_url=f"sqlite+aiosqlite:///{db}",
        engines={"dfy": {"kind": "dify", "base_url": f"{dify_srv.url}/v1", "api_key": DIFY_KEY, "max_retries": 0},
                 "oai": {"kind": "openai", "base_url": f"{oai_srv.url}/v1", "api_key": OAI_KEY, "model": "m",
                         "max_retries": 0},
                 "r1": {"kind": "openai", "base_url": f"{oai_srv.url}/v1", "api_key": OAI_KEY, "model": "m",
                        "profile": "deepseek-r1", "max_retries": 0},
                 "gem": {"kind": "gemini", "base_url": "http://127.0.0.1:9/v1beta", "api_key": GEM_KEY,
                         "model": "gemini-2.0-flash"}},
        apps={"d": {"engine": "dfy"}, "o": {"engine": "oai"}, "r": {"engine": "r1"}},
        include_presets=False,
    )
    keys = {app: asyncio.run(create_key(settings, app)) for app in ("d", "o", "r")}
    srv = LiveServer(create_app(settings)).start()
    with httpx.Client(base_url=srv.url, timeout=30) as http:
        yield Env(http, keys, oai, dify, db)
    srv.stop()
    oai_srv.stop()
    dify_srv.stop()


# case → (app, mode, double setup, what the client is told: the error message or the answer)
CASES: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "dify-error-event": ("d", "streaming", {"fault": "error_event", "error_kind": "error", "error_message": ECHO},
                         ECHO_CLEAN),
    "dify-workflow-failed": ("d", "streaming", {"fault": "error_event", "error_kind": "workflow",
                                                "error_message": ECHO}, f"Run failed: {ECHO_CLEAN}"),
    "dify-blocking-run-failed": ("d", "blocking", {"fault": "error_event", "error_message": ECHO},
                                 f"Run failed: {ECHO_CLEAN}"),
    "openai-4xx": ("o", "blocking", {"fault": "error_event", "error_message": OAI_ECHO}, OAI_ECHO_CLEAN),
    "openai-stream-error": ("o", "streaming", {"fault": "error_event", "error_message": OAI_ECHO}, OAI_ECHO_CLEAN),
    "openai-streamed-answer": ("o", "streaming", {"reply": ANSWER, "chunk_size": 5}, ANSWER_CLEAN),
    "openai-blocking-answer": ("o", "blocking", {"reply": ANSWER}, ANSWER_CLEAN),
    "dify-replaced-answer": ("d", "streaming", {"replace_with": MODERATED}, MODERATED_CLEAN),
    "dify-blocking-replaced-answer": ("d", "blocking", {"replace_with": MODERATED}, MODERATED_CLEAN),
}


def leaks(text: str) -> list[str]:
    return [s for s in (*SECRETS, *FRAGMENTS) if s in text]


@pytest.mark.parametrize("route", ["dify", "openai"])
@pytest.mark.parametrize("case", list(CASES))
def test_no_engine_key_leaves_threadline(env: Env, caplog: pytest.LogCaptureFixture, case: str, route: str) -> None:
    caplog.set_level(logging.DEBUG)
    app, mode, setup, told = CASES[case]
    env.dify.reset(api_key=DIFY_KEY, fault_after=2, **(setup if app == "d" else {}))
    env.oai.reset(api_key=OAI_KEY, fault_after=2, **(setup if app == "o" else {}))
    user = f"u-{uuid.uuid4().hex[:8]}"
    h = {"Authorization": f"Bearer {env.keys[app]}"}
    if route == "dify":
        path, body = "/v1/chat-messages", {"inputs": {}, "query": "hi", "user": user, "response_mode": mode,
                                           "conversation_id": ""}
    else:
        path, body = "/v1/chat/completions", {"model": app, "messages": [{"role": "user", "content": "hi"}],
                                              "stream": mode == "streaming", "user": user}
    with env.http.stream("POST", path, json=body, headers=h) as r:
        raw = r.read().decode()
    said = json.dumps(dict(r.headers)) + raw
    assert leaks(said) == [], said

    # The redaction masks the secrets and keeps the rest of what the upstream said.
    answered = "answer" in case
    if answered:
        assert r.status_code == 200
        if mode == "blocking":
            text = r.json()["answer"] if route == "dify" else r.json()["choices"][0]["message"]["content"]
        elif route == "dify":
            text = ""
            for e in (json.loads(x[6:]) for x in raw.split("\n\n") if x.startswith("data: {")):
                text = text + e["answer"] if e["event"] == "message" else e["answer"] if e["event"] == "message_replace" else text
        else:
            text = "".join(c["choices"][0]["delta"].get("content") or "" for x in raw.split("\n\n")
                           if x.startswith("data: {") and (c := json.loads(x[6:])).get("choices"))
        assert leaks(text) == [], text  # the raw stream never holds the key whole: reassembled, it might
        if not (case == "dify-replaced-answer" and route == "openai"):  # Chat Completions has no "replace"
            assert text == told
    else:
        assert told in raw.replace("\\/", "/"), raw
    if r.headers.get("x-threadline-conversation-id"):  # the OpenAI route, and any failed answer
        cid = r.headers["x-threadline-conversation-id"]
    elif mode == "blocking":
        cid = r.json()["conversation_id"]
    else:
        cid = next(json.loads(x[6:])["conversation_id"] for x in raw.split("\n\n") if x.startswith("data: {"))

    listing = env.http.get("/v1/messages", params={"conversation_id": cid, "user": user},
                           headers={"Authorization": f"Bearer {env.keys[app]}"})
    assert listing.status_code == 200
    assert leaks(listing.text) == [], listing.text
    turn = listing.json()["data"][-1]
    if answered:
        assert (turn["threadline_status"], turn["answer"]) == ("completed", told)
    else:
        assert turn["threadline_status"] == "failed" and told in turn["error"]

    con = sqlite3.connect(env.db)
    try:
        rows = con.execute("SELECT m.content, m.error, m.reasoning FROM messages m WHERE m.conversation_id = ?",
                           (cid,)).fetchall()
    finally:
        con.close()
    assert len(rows) == 2  # the question and the answer
    for content, error, reasoning in rows:
        assert leaks(f"{content}\n{error}\n{reasoning}") == [], (content, error)
    stored = [(content, json.loads(error) if error else None) for content, error, _ in rows]
    assert [1 for content, error in stored if content == told or (error and told in error["message"])]

    assert [rec for rec in caplog.records if rec.name == "threadline.access"], "the server's logs were not captured"
    assert leaks(caplog.text) == [], caplog.text
    assert leaks("\n".join(str(rec.args) for rec in caplog.records)) == []


@pytest.mark.parametrize("route", ["dify", "openai"])
@pytest.mark.parametrize("mode", ["blocking", "streaming"])
def test_redaction_costs_no_answer_text(env: Env, route: str, mode: str) -> None:
    """An R1-style engine streams text before any `</think>` as reasoning; with no tags at all it is
    answer after all. An answer that ends in what could be the start of the engine's key ("dev" ends in
    the "v" of "vllm-…") is held back by the redaction until the stream ends: it must come back as
    answer, whole, not as a stray piece of reasoning."""
    env.oai.reset(api_key=OAI_KEY, provider="nim", reply="Ask the dev", chunk_size=4)
    user = f"u-{uuid.uuid4().hex[:8]}"
    h = {"Authorization": f"Bearer {env.keys['r']}"}
    if route == "dify":
        path, body = "/v1/chat-messages", {"inputs": {}, "query": "who?", "user": user, "response_mode": mode}
    else:
        path, body = "/v1/chat/completions", {"model": "r", "messages": [{"role": "user", "content": "who?"}],
                                              "stream": mode == "streaming", "user": user}
    r = env.http.post(path, json=body, headers=h)
    assert r.status_code == 200, r.text
    if route == "dify" and mode == "blocking":
        assert r.json()["answer"] == "Ask the dev"
    cid = r.headers.get("x-threadline-conversation-id") or (
        r.json()["conversation_id"] if mode == "blocking" else
        next(json.loads(x[6:])["conversation_id"] for x in r.text.split("\n\n") if x.startswith("data: {")))
    turn = env.http.get("/v1/messages", params={"conversation_id": cid, "user": user}, headers=h).json()["data"][-1]
    assert (turn["threadline_status"], turn["answer"], turn["reasoning"] or "") == ("completed", "Ask the dev", "")


def test_stream_redactor_keeps_text_whole_around_replacements() -> None:
    from threadline.errors import StreamRedactor

    key = "sk-abcdef123456"
    r = StreamRedactor(key)
    assert r.text("the answer is yes") == "the answer is ye"  # the "s" could be the key's start: held
    assert r.replaced(f"Withheld ({key}).") == "Withheld (***)."
    assert r.flush() == ("", "")  # the held "s" went with the answer it belonged to
    r = StreamRedactor(key)
    assert r.reasoning("I gues") == "I gue" and r.text("s") == ""
    assert r.reclassified("I gue", "") == "I gues"  # the held reasoning tail is answer, in its place
    assert r.flush() == ("s", "")  # the answer's own tail, still at its end
    assert r.reasoning(f"a {key[:6]}") == "a " and r.reclassified("a ", "") == f"a {key[:6]}"
