"""The Responses API's WebSocket mode against a live server: the official `openai` SDK's
`responses.connect()` where it fits, a plain `websockets` client where a test needs the raw frames or
a misbehaving client. Each test checks what the client reads and what the engine behind was sent."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests.conftest import engines_for
from tests.doubles.live import LiveServer
from threadline.config import Settings
from threadline.server import responses_ws
from threadline.server.app import create_app
from threadline.server.keys import create_key

TERMINAL = ("response.completed", "response.failed", "response.incomplete")


@pytest.fixture(scope="module")
def live(openai_double, tmp_path_factory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("responses_ws")
    settings = Settings.build(database_url=f"sqlite+aiosqlite:///{tmp}/w.db", include_presets=False,
                              engines=engines_for(openai_double[1]),
                              apps={"demo": {"engine": "acc"}, "other": {"engine": "acc"}},
                              server={"max_body_bytes": 200_000})
    keys = {app: asyncio.run(create_key(settings, app)) for app in ("demo", "other")}
    srv = LiveServer(create_app(settings)).start()
    try:
        yield {"url": srv.url, "ws": srv.url.replace("http://", "ws://") + "/v1/responses", "keys": keys,
               "oai": openai_double[0], "oai_url": openai_double[1]}
    finally:
        srv.stop()


@pytest.fixture
def env(live) -> dict[str, Any]:
    live["oai"].reset()
    return live


def client(env: dict[str, Any], app: str = "demo", key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{env['url']}/v1", api_key=key or env["keys"][app], max_retries=0)


def sent_texts(req: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(m["role"], m.get("content")) for m in req["messages"] if m["role"] != "system"]


def one_response(conn: Any, **params: Any) -> list[Any]:
    """Send one response.create on an SDK connection and read its events to the terminal one."""
    conn.response.create(**params)
    events = []
    for ev in conn:
        events.append(ev)
        if ev.type in TERMINAL or (ev.type == "error" and ev.sequence_number is None):
            return events
    raise AssertionError(f"connection closed after {[e.type for e in events]}")


def raw(env: dict[str, Any], app: str = "demo", **kw: Any) -> ClientConnection:
    return connect(env["ws"], additional_headers={"Authorization": f"Bearer {env['keys'][app]}"}, open_timeout=10,
                   **kw)


def raw_response(ws: ClientConnection, body: dict[str, Any]) -> list[dict[str, Any]]:
    """Send one message and read frames to its terminal event (or its error frame)."""
    ws.send(json.dumps({"type": "response.create", **body}))
    out = []
    while True:
        frame = ws.recv(timeout=20)
        assert isinstance(frame, str)  # text frames, one JSON event each (no SSE framing)
        ev = json.loads(frame)
        out.append(ev)
        if ev["type"] in TERMINAL or (ev["type"] == "error" and "sequence_number" not in ev):
            return out


def not_found(ev: dict[str, Any], rid: str) -> None:
    assert ev == {"type": "error", "status": 400, "error": {
        "type": "invalid_request_error", "code": "previous_response_not_found", "param": "previous_response_id",
        "message": f"Previous response with id '{rid}' not found."}}


# ---- chains ----------------------------------------------------------------------------------------

def test_three_responses_chained_on_one_socket_send_the_whole_history(env):
    c = client(env)
    with c.responses.connect() as conn:
        e1 = one_response(conn, model="demo", input="first", instructions="Be brief.")
        r1 = e1[-1].response
        assert e1[0].type == "response.created" and e1[0].response.id == r1.id
        assert r1.status == "completed" and r1.output_text == "Answer to: first" and r1.id.startswith("resp_")
        r2 = one_response(conn, model="demo", input="second", previous_response_id=r1.id)[-1].response
        r3 = one_response(conn, model="demo", input=[{"role": "user", "content": "third"}],
                          previous_response_id=r2.id)[-1].response
    assert r3.previous_response_id == r2.id and r3.output_text == "Answer to: third"
    req = env["oai"].requests[-1]
    assert sent_texts(req) == [("user", "first"), ("assistant", "Answer to: first"), ("user", "second"),
                               ("assistant", "Answer to: second"), ("user", "third")]
    assert not any("Be brief." in (m.get("content") or "") for m in req["messages"])
    # stored as any HTTP response is: retrieve and continue it over HTTP
    assert c.responses.retrieve(r3.id).output_text == "Answer to: third"
    c.responses.create(model="demo", input="fourth", previous_response_id=r3.id)
    assert sent_texts(env["oai"].requests[-1])[-2:] == [("assistant", "Answer to: third"), ("user", "fourth")]


def test_events_are_ordered_with_rising_sequence_numbers_and_deltas_that_add_up(env):
    env["oai"].reset(answer_mode="reasoning_content", chunk_size=3)
    with raw(env) as ws:
        events = raw_response(ws, {"model": "demo", "input": "stream me"})
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert kinds.count("response.completed") == 1 and "error" not in kinds
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]["response"]
    assert final["id"] == events[0]["response"]["id"] and final["status"] == "completed"
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    reasoning = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
    assert text == "Answer to: stream me" and reasoning
    assert env["oai"].requests[-1]["stream"] is True  # streamed from the engine, not sent in one piece
    assert sum(e["type"] == "response.output_text.delta" for e in events) > 3
    assert next(o for o in final["output"] if o["type"] == "message")["content"][0]["text"] == text
    assert next(o for o in final["output"] if o["type"] == "reasoning")["content"][0]["text"] == reasoning
    added = {e["output_index"]: e["item"]["id"] for e in events if e["type"] == "response.output_item.added"}
    for e in events:
        if "item_id" in e:
            assert added[e["output_index"]] == e["item_id"], e
    assert [o["id"] for o in final["output"]] == [added[i] for i in sorted(added)]


def test_messages_sent_together_are_answered_one_after_the_other(env):
    env["oai"].reset(slow=0.02, chunk_size=2)
    with raw(env) as ws:
        for word in ("one", "two", "three"):  # all three before reading anything
            ws.send(json.dumps({"type": "response.create", "model": "demo", "input": word}))
        frames = []
        while sum(f["type"] == "response.completed" for f in frames) < 3:
            frames.append(json.loads(ws.recv(timeout=20)))
    starts = [i for i, f in enumerate(frames) if f["type"] == "response.created"]
    ends = [i for i, f in enumerate(frames) if f["type"] == "response.completed"]
    assert len(starts) == 3 and starts[0] < ends[0] < starts[1] < ends[1] < starts[2] < ends[2]
    assert [frames[i]["response"]["output"][0]["content"][0]["text"] for i in ends] == [
        "Answer to: one", "Answer to: two", "Answer to: three"]
    for s, e in zip(starts, ends, strict=True):  # each response numbers its own events from 0
        assert [f["sequence_number"] for f in frames[s:e + 1]] == list(range(e - s + 1))


# ---- store: false ----------------------------------------------------------------------------------

def _conversations(env: dict[str, Any]) -> int:
    r = httpx.get(f"{env['url']}/v1/conversations", params={"user": "openai-user", "limit": 100},
                  headers={"Authorization": f"Bearer {env['keys']['demo']}"})
    assert r.status_code == 200, r.text
    return len(r.json()["data"])


def test_store_false_continues_on_its_socket_and_nowhere_else(env):
    c = client(env)
    before = _conversations(env)
    with c.responses.connect() as conn:
        r1 = one_response(conn, model="demo", input="secret one", store=False)[-1].response
        r2 = one_response(conn, model="demo", input="secret two", store=False,
                          previous_response_id=r1.id)[-1].response
        assert r2.status == "completed" and r2.store is False
        assert sent_texts(env["oai"].requests[-1]) == [("user", "secret one"), ("assistant", "Answer to: secret one"),
                                                       ("user", "secret two")]
        # only the most recent response is cached: r1 is gone now
        [err] = one_response(conn, model="demo", input="x", store=False, previous_response_id=r1.id)
        assert err.type == "error" and err.status == 400 and err.error.code == "previous_response_not_found"
        # meanwhile nobody else can reach r2: not HTTP, not retrieve, not another socket
        with pytest.raises(openai.BadRequestError) as e:
            c.responses.create(model="demo", input="x", previous_response_id=r2.id)
        assert e.value.code == "previous_response_not_found"
        with pytest.raises(openai.NotFoundError):
            c.responses.retrieve(r2.id)
        with raw(env) as other:
            not_found(raw_response(other, {"model": "demo", "input": "x", "previous_response_id": r2.id})[0], r2.id)
        # a stored response may continue the unstored chain: it starts a conversation of its own
        r3 = one_response(conn, model="demo", input="kept now", previous_response_id=r2.id)[-1].response
        assert r3.store is True and sent_texts(env["oai"].requests[-1])[-3:] == [
            ("user", "secret two"), ("assistant", "Answer to: secret two"), ("user", "kept now")]
    assert c.responses.retrieve(r3.id).output_text == "Answer to: kept now"
    # the scratch conversations are gone; only r3's own conversation was added
    assert _conversations(env) == before + 1
    # and after the socket closed, its last unstored response is unknown too
    with raw(env) as ws:
        r4 = raw_response(ws, {"model": "demo", "input": "gone soon", "store": False})[-1]["response"]
    with raw(env) as ws:
        not_found(raw_response(ws, {"model": "demo", "input": "x", "previous_response_id": r4["id"]})[0], r4["id"])
    assert _conversations(env) == before + 1


def test_a_failed_continuation_evicts_the_cached_response(env):
    with raw(env) as ws:
        r1 = raw_response(ws, {"model": "demo", "input": "keep me", "store": False})[-1]["response"]
        [err] = raw_response(ws, {"model": "demo", "input": "x", "store": False, "previous_response_id": r1["id"],
                                  "tool_choice": "sometimes"})
        assert err["status"] == 400 and err["error"]["param"] == "tool_choice"
        not_found(raw_response(ws, {"model": "demo", "input": "again", "store": False,
                                    "previous_response_id": r1["id"]})[0], r1["id"])
        # a failure mid-stream evicts too: the events end in error + response.failed
        r2 = raw_response(ws, {"model": "demo", "input": "second chain", "store": False})[-1]["response"]
        env["oai"].reset(fault="reset")  # the engine drops the stream after its first chunks
        failed = raw_response(ws, {"model": "demo", "input": "boom", "store": False,
                                   "previous_response_id": r2["id"]})
        env["oai"].reset()
        err, last = failed[-2:]
        assert last["type"] == "response.failed" and last["response"]["status"] == "failed", failed
        assert err["type"] == "error" and err["status"] == 502 and err["error"]["code"] == "server_error"
        assert err["sequence_number"] == last["sequence_number"] - 1
        not_found(raw_response(ws, {"model": "demo", "input": "after", "store": False,
                                    "previous_response_id": r2["id"]})[0], r2["id"])
        # the connection is still usable
        assert raw_response(ws, {"model": "demo", "input": "fine"})[-1]["type"] == "response.completed"


# ---- refusals --------------------------------------------------------------------------------------

def test_a_bad_or_missing_key_is_refused_at_the_upgrade(env):
    with pytest.raises(InvalidStatus) as e:
        client(env, key="app-not-a-real-key").responses.connect().enter()
    assert e.value.response.status_code == 401
    body = json.loads(e.value.response.body)
    assert body["error"]["code"] == "invalid_api_key" and body["error"]["type"] == "authentication_error"
    with pytest.raises(InvalidStatus) as e:
        connect(env["ws"], open_timeout=10)
    assert e.value.response.status_code == 401


@pytest.mark.parametrize(("message", "param", "code"), [
    ({"stream": True}, "stream", "unsupported_parameter"),
    ({"stream_options": {"include_obfuscation": False}}, "stream_options", "unsupported_parameter"),
    ({"background": False}, "background", "unsupported_parameter"),
    ({"stream_id": "lane-1"}, "stream_id", "unsupported_parameter"),
    ({"type": "response.cancel"}, "type", "invalid_value"),
    ({"model": "no-such-model"}, "model", "model_not_found"),
    ({"temperature": 9}, "temperature", "invalid_value"),
    ({"surprise": 1}, "surprise", "unrecognized_argument"),
])
def test_a_refused_message_is_an_error_frame_and_the_socket_stays_open(env, message, param, code):
    body = {"model": "demo", "input": "hi", **message}
    with raw(env) as ws:
        ws.send(json.dumps({"type": "response.create", **body}))
        err = json.loads(ws.recv(timeout=10))
        assert err["type"] == "error" and err["status"] in (400, 404)
        assert set(err) == {"type", "status", "error"}
        assert set(err["error"]) == {"type", "code", "message", "param"}
        assert err["error"]["param"] == param and err["error"]["code"] == code, err
        assert err["error"]["type"] == "invalid_request_error"
        ws.send("{not json")
        assert json.loads(ws.recv(timeout=10))["status"] == 400
        assert raw_response(ws, {"model": "demo", "input": "still here"})[-1]["type"] == "response.completed"
    assert len(env["oai"].requests) == 1  # nothing refused reached the engine


def test_a_message_over_the_body_limit_is_refused_unread(env):
    with raw(env) as ws:
        ws.send(json.dumps({"type": "response.create", "model": "demo", "input": "x" * 250_000}))
        err = json.loads(ws.recv(timeout=10))
        assert err["status"] == 413 and err["error"]["code"] == "request_too_large"
        assert raw_response(ws, {"model": "demo", "input": "small"})[-1]["type"] == "response.completed"
    assert len(env["oai"].requests) == 1


def test_the_sdk_raises_on_an_error_frame(env):
    with client(env).responses.connect() as conn:
        conn.response.create(model="demo", input="x", previous_response_id="resp_" + "0" * 32)
        with pytest.raises(openai.OpenAIError, match="previous_response_not_found"):
            conn.dispatch_events()


# ---- the connection's end --------------------------------------------------------------------------

def test_leaving_mid_response_keeps_the_partial_answer_as_stopped(env):
    env["oai"].reset(slow=0.1, chunk_size=1)
    ws = raw(env)
    ws.send(json.dumps({"type": "response.create", "model": "demo", "input": "a long answer please"}))
    rid = None
    deltas = 0
    while deltas < 3:
        ev = json.loads(ws.recv(timeout=10))
        rid = rid or ev["response"]["id"]
        deltas += ev["type"] == "response.output_text.delta"
    ws.close()
    c = client(env)
    deadline = time.monotonic() + 10
    while (got := c.responses.retrieve(rid)).status == "in_progress":
        assert time.monotonic() < deadline, "the turn went on after the client left"
        time.sleep(0.05)
    assert got.status == "cancelled"
    assert got.output_text and "Answer to: a long answer please".startswith(got.output_text)
    assert got.output_text != "Answer to: a long answer please"


def test_the_connection_age_limit(env, monkeypatch):
    monkeypatch.setattr(responses_ws, "CONNECTION_LIMIT_S", 1)
    with raw(env) as ws:
        assert raw_response(ws, {"model": "demo", "input": "in time"})[-1]["type"] == "response.completed"
        time.sleep(1.2)
        err = json.loads(ws.recv(timeout=5))  # said when the limit passes, without waiting for a message
        assert err["type"] == "error" and err["error"]["code"] == "websocket_connection_limit_reached"
        with pytest.raises(ConnectionClosed) as e:
            ws.recv(timeout=5)
        assert e.value.rcvd is not None and e.value.rcvd.code == 1001


# ---- open mode -------------------------------------------------------------------------------------

def test_open_mode_checks_host_and_origin_on_the_upgrade(openai_double, tmp_path):
    """A browser opens a WebSocket to any site without a CORS check: in open mode (no key) another
    site's page, or a rebound DNS name, must not reach the socket."""
    settings = Settings.build(database_url=f"sqlite+aiosqlite:///{tmp_path}/o.db", include_presets=False,
                              engines=engines_for(openai_double[1]), default_engine="acc")
    srv = LiveServer(create_app(settings, open_access=True, listen_host="127.0.0.1")).start()
    url = srv.url.replace("http://", "ws://") + "/v1/responses"
    try:
        with pytest.raises(InvalidStatus) as e:
            connect(url, additional_headers={"Origin": "https://evil.example"}, open_timeout=10)
        assert e.value.response.status_code == 403
        assert json.loads(e.value.response.body)["error"]["code"] == "origin_not_allowed"
        # DNS rebinding: the attacker's name resolves to 127.0.0.1, the Host header still says its name
        sock = socket.create_connection(("127.0.0.1", srv.port))
        with pytest.raises(InvalidStatus) as e:
            connect(f"ws://rebind.evil.example:{srv.port}/v1/responses", sock=sock, open_timeout=10)
        assert e.value.response.status_code == 403
        assert json.loads(e.value.response.body)["error"]["code"] == "host_not_allowed"
        # the page itself (same origin) and plain local clients are served, without a key
        for headers in ({"Origin": srv.url}, {}):
            with connect(url, additional_headers=headers, open_timeout=10) as ws:
                done = raw_response(ws, {"model": "default", "input": "local"})[-1]
                assert done["type"] == "response.completed", done
    finally:
        srv.stop()


def test_a_scratch_conversation_is_never_matched_listed_or_reached_by_others(env):
    """A store:false chain's conversation lives as long as its socket: while it does, a client that
    resends the same history (Responses or Chat Completions), the conversation list and the OpenAI
    surfaces never reach it, so closing the socket removes nothing anyone else stored."""
    c = client(env)
    h = {"Authorization": f"Bearer {env['keys']['demo']}"}
    before = _conversations(env)
    with c.responses.connect() as conn:
        one_response(conn, model="demo", input="scratch hi", store=False)
        assert _conversations(env) == before  # not listed
        replay = [{"role": "user", "content": "scratch hi"}, {"role": "assistant", "content": "Answer to: scratch hi"}]
        kept = c.responses.with_raw_response.create(model="demo", input=[*replay, {"role": "user", "content": "go on"}])
        cc = httpx.post(f"{env['url']}/v1/chat/completions", headers=h, json={
            "model": "demo", "messages": [*replay, {"role": "user", "content": "cc next"}]})
        assert cc.status_code == 200
    resp = kept.parse()
    # both were stored in conversations of their own, which outlive the socket
    assert c.responses.retrieve(resp.id).output_text == "Answer to: go on"
    for cid in (kept.headers["x-threadline-conversation-id"], cc.headers["x-threadline-conversation-id"]):
        r = httpx.get(f"{env['url']}/v1/messages", headers=h, params={"user": "openai-user", "conversation_id": cid})
        assert r.status_code == 200 and len(r.json()["data"]) == 2, r.text
    assert _conversations(env) == before + 2


def test_a_scratch_conversation_a_dead_process_left_is_swept(env, tmp_path):
    """store:false keeps nothing even when the process dies mid-response: a scratch conversation idle
    past the WebSocket's hour, under no lease, is removed by the sweep (run at start and every minute)."""
    from threadline.gateway import Gateway
    from threadline.turns import TurnRequest

    async def run() -> tuple[int, int, bool]:
        gw = Gateway(Settings.build(database_url=f"sqlite+aiosqlite:///{tmp_path}/s.db", include_presets=False,
                                    engines=engines_for(env["oai_url"]), apps={"demo": {"engine": "acc"}}))
        await gw.start()
        try:
            async def turn(**kw: Any) -> str:
                cid = ""
                async for ev in gw.turn(TurnRequest(user="u", app="demo", stream=False, **kw)):
                    cid = getattr(ev, "conversation_id", "") or getattr(getattr(ev, "reply", None),
                                                                        "conversation_id", "") or cid
                return cid
            scratch = await turn(text="left behind", scratch=True)
            kept = await turn(text="kept")
            fresh = await turn(text="still in use", scratch=True)
            old = 1_000.0  # as if the process that made it died long ago
            await gw.store.set_conversation_fields(scratch, updated_at=old)
            await gw.store.set_conversation_fields(kept, updated_at=old)
            removed = await gw.sweep_scratch()
            left = [r["id"] for r in (await gw.store.list_conversations(app="demo", user="u", limit=10))[0]]
            async with gw.store.engine.connect() as conn:
                from sqlalchemy import select

                from threadline.store.schema import conversations, messages
                ids = {r[0] for r in await conn.execute(select(conversations.c.id))}
                msgs = {r[0] for r in await conn.execute(select(messages.c.conversation_id))}
            return removed, len(left), scratch not in ids and scratch not in msgs and kept in ids and fresh in ids
        finally:
            await gw.close()

    removed, listed, right = asyncio.run(run())
    assert removed == 1 and right and listed == 1  # the fresh scratch one is kept but never listed
