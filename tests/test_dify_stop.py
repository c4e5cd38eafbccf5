"""Issue 19, items 2 and 5: an early end of a Dify turn stops Dify's own run too, so Dify's
/messages keeps the same partial answer Threadline stored; and the Dify route ends a stopped
stream as Dify 1.13 does (fixture 070-stream-stopped.sse: `workflow_finished` stopped, no `message_end`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import httpx
import pytest

from tests.conftest import SHARED
from tests.doubles.dify_double import DifyDouble
from tests.doubles.live import LiveServer
from threadline import AsyncThreadline
from threadline.config import Settings
from threadline.messages import TextDelta, TurnCompleted, TurnStarted
from threadline.server.app import create_app
from threadline.server.keys import create_key

FIX = SHARED / "fixtures" / "dify"
LONG = "\n".join(f"line {i}" for i in range(60))  # the echo chatflow answers it in ~60 pieces


@pytest.fixture(scope="module")
def dify_server():
    d = DifyDouble()
    srv = LiveServer(d.app()).start()
    yield d, srv.url
    srv.stop()


def _engines(url: str, d: DifyDouble) -> dict:
    return {"dify": {"kind": "dify", "base_url": f"{url}/v1", "api_key": d.api_key, "max_retries": 0}}


@pytest.fixture
def server(dify_server, tmp_path):
    d, url = dify_server
    d.reset(slow=0.03)
    settings = Settings.build(database_url=f"sqlite+aiosqlite:///{tmp_path}/srv.db", engines=_engines(url, d),
                              apps={"d": {"engine": "dify"}}, include_presets=False)
    key = asyncio.run(create_key(settings, "d"))
    srv = LiveServer(create_app(settings)).start()
    yield srv.url, key, d, url
    srv.stop()


def _difys_answer(d: DifyDouble, dify_url: str, remote_user: str) -> str:
    """The answer Dify itself keeps, read through its own /messages once its run has ended."""
    assert d.wait_idle(30), "Dify's run never ended"
    cid = d.conversations_by_query(LONG)
    r = httpx.get(f"{dify_url}/v1/messages", params={"conversation_id": cid, "user": remote_user},
                  headers={"Authorization": f"Bearer {d.api_key}"})
    return str(r.json()["data"][-1]["answer"])


def _threadline_answer(c: httpx.Client, cid: str, user: str) -> dict:
    deadline = time.monotonic() + 10
    while True:
        m = c.get("/v1/messages", params={"conversation_id": cid, "user": user}).json()["data"][-1]
        if m["threadline_status"] != "streaming" or time.monotonic() > deadline:
            return dict(m)
        time.sleep(0.05)


def test_openai_route_client_hanging_up_stops_dify_with_the_same_partial(server):
    base, key, d, dify_url = server
    h = {"Authorization": f"Bearer {key}"}
    body = {"model": "d", "messages": [{"role": "user", "content": LONG}], "stream": True, "user": "alice"}
    with httpx.Client(base_url=base, headers=h, timeout=30) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            cid = r.headers["x-threadline-conversation-id"]
            seen = 0
            for line in r.iter_lines():
                if '"content"' in line:
                    seen += 1
                    if seen == 3:
                        break
        # The connection is closed here, mid-answer.
        ours = _threadline_answer(c, cid, "alice")
    assert ours["threadline_status"] == "stopped"
    theirs = _difys_answer(d, dify_url, "d:alice")
    assert len(d.stops) == 1 and d.stops[0] == {"user": "d:alice"}
    assert theirs.startswith("echo: line 0\n") and not theirs.endswith("line 59\n")  # cut short
    assert ours["answer"] == theirs


async def test_python_api_leaving_a_stream_stops_dify_with_the_same_partial(dify_server, sqlite_url):
    d, url = dify_server
    d.reset(slow=0.03)
    tl = AsyncThreadline(database_url=sqlite_url, engines=_engines(url, d), apps={"d": {"engine": "dify"}},
                         include_presets=False)
    try:
        pieces = 0
        async with contextlib.aclosing(tl.stream(LONG, user="bob", app="d")) as s:
            async for ev in s:
                if isinstance(ev, TextDelta):
                    pieces += 1
                    if pieces == 3:
                        break
        convs = await tl.conversations(user="bob", app="d")
        ours = (await tl.messages(convs[0].id, user="bob"))[-1]
        assert ours.status == "stopped"
        theirs = await asyncio.to_thread(_difys_answer, d, url, "d:bob")
        assert len(d.stops) == 1
        assert theirs.startswith("echo: line 0\n") and not theirs.endswith("line 59\n")
        assert ours.content == theirs
    finally:
        await tl.aclose()


async def test_stop_flag_from_another_replica_stops_dify_too(dify_server, sqlite_url):
    """A stop asked on another replica reaches this one through the store's stop flag."""
    d, url = dify_server
    d.reset(slow=0.03)
    tl = AsyncThreadline(database_url=sqlite_url, engines=_engines(url, d), apps={"d": {"engine": "dify"}},
                         include_presets=False)
    try:
        pieces, mid, final = 0, "", None
        async for ev in tl.stream(LONG, user="carol", app="d"):
            if isinstance(ev, TurnStarted):
                mid = ev.message_id
            elif isinstance(ev, TextDelta):
                pieces += 1
                if pieces == 2:
                    await tl.gateway.store.request_stop(mid)  # as Gateway.stop does for a turn run elsewhere
            elif isinstance(ev, TurnCompleted):
                final = ev.reply
        assert final is not None and final.status == "stopped"
        theirs = await asyncio.to_thread(_difys_answer, d, url, "d:carol")
        assert len(d.stops) == 1
        assert not theirs.endswith("line 59\n") and final.answer == theirs
    finally:
        await tl.aclose()


def _terminal(events: list[dict]) -> list[dict]:
    """The events after the last `message`: how a stream ends."""
    last = max(i for i, e in enumerate(events) if e["event"] == "message")
    return events[last + 1:]


def test_dify_route_stopped_stream_ends_as_dify_does_and_dify_client_parses_it(server):
    from dify_client import ChatClient

    base, key, d, _ = server
    recorded = [json.loads(x[6:]) for x in (FIX / "070-stream-stopped.sse").read_text().split("\n\n")
                if x.startswith("data: ")]
    want = [e for e in _terminal(recorded) if not e["event"].startswith("node_")]
    client = ChatClient(key)
    client.base_url = f"{base}/v1"
    s = client.create_chat_message(inputs={}, query=LONG, user="dave", response_mode="streaming")
    events, got, stopped = [], "", False
    for line in s.iter_lines(decode_unicode=True):
        if line and line.startswith("data: "):
            ev = json.loads(line[6:])
            events.append(ev)
            if ev["event"] == "message":
                got += ev["answer"]
                if len(got) > 20 and not stopped:
                    stopped = True  # dify-client 0.1.10 has no stop method: as Dify's API documents it
                    r = httpx.post(f"{base}/v1/chat-messages/{ev['task_id']}/stop", json={"user": "dave"},
                                   headers={"Authorization": f"Bearer {key}"})
                    assert r.status_code == 200
    ends = _terminal(events)
    assert [e["event"] for e in ends] == [e["event"] for e in want] == ["workflow_finished"]
    end, rec = ends[-1], want[-1]
    assert set(rec) <= set(end) and set(rec["data"]) <= set(end["data"])
    assert end["data"]["status"] == rec["data"]["status"] == "stopped"
    assert end["data"]["error"] == rec["data"]["error"]
    assert end["task_id"] == events[0]["task_id"] and end["conversation_id"] == events[0]["conversation_id"]
    assert end["message_id"] == events[0]["message_id"]
    assert end["data"]["outputs"]["answer"] == got
    assert not any(e["event"] == "message_end" for e in events)
    msgs = client.get_conversation_messages("dave", end["conversation_id"]).json()["data"]
    assert msgs[-1]["answer"] == got and msgs[-1]["threadline_status"] == "stopped"
