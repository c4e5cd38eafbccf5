"""The Dify engine against real recorded Dify 1.13.2 traffic, byte for byte, and against a double
built from that traffic for multi-turn, switching, upload and stop behaviour."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import SHARED
from tests.doubles.dify_double import DifyDouble
from tests.doubles.live import LiveServer
from threadline import AsyncThreadline
from threadline.config import EngineConfig
from threadline.engines.base import EngineRequest
from threadline.engines.dify import DIFY_FIELDS, DifyEngine
from threadline.errors import RemoteConversationLost, UpstreamError
from threadline.messages import AnswerReplaced, RemoteState, TextDelta, UsageReport

FIX = SHARED / "fixtures" / "dify"


def _engine_replaying(fx: dict) -> DifyEngine:
    resp = fx["response"]
    body = (FIX / fx["response"]["body_file"]).read_bytes() if resp.get("body_file") else resp["body_raw"].encode()
    headers = dict(resp["headers"])

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(resp["status"], content=body, headers={"content-type": headers.get("Content-Type", "")})

    cfg = EngineConfig(name="dify", kind="dify", base_url="http://dify.test/v1", api_key="app-x", max_retries=0)
    return DifyEngine(cfg, httpx.AsyncClient(transport=httpx.MockTransport(handler)))


async def _run(engine: DifyEngine, stream: bool, remote: str | None = None):
    text, usage, price, state = "", None, None, RemoteState()
    async for ev in engine.events(EngineRequest(messages=[], query="q", stream=stream, remote_user="alice",
                                                remote_conversation_id=remote)):
        if isinstance(ev, TextDelta):
            text += ev.text
        elif isinstance(ev, AnswerReplaced):
            text = ev.text
        elif isinstance(ev, UsageReport):
            usage, price = ev.usage, ev.price
        elif isinstance(ev, RemoteState):
            state = ev
    return text, usage, price, state


@pytest.mark.parametrize("name", ["010-blocking-new", "011-blocking-second-turn", "012-blocking-third-turn",
                                  "013-blocking-fourth-turn", "031-blocking-local-file", "032-blocking-remote-url"])
async def test_recorded_blocking_responses_parse_exactly(name):
    fx = json.loads((FIX / f"{name}.json").read_text())
    want = fx["response"]["json"]
    text, usage, price, state = await _run(_engine_replaying(fx), stream=False)
    assert text == want["answer"]
    assert (state.conversation_id, state.message_id, state.task_id) == (want["conversation_id"], want["message_id"],
                                                                         want["task_id"])
    assert usage.total_tokens == want["metadata"]["usage"]["total_tokens"]
    assert price["total_price"] == want["metadata"]["usage"]["total_price"]


@pytest.mark.parametrize("name", ["020-stream-new", "021-stream-second-turn", "034-stream-with-files",
                                  "073-stream-slow-complete"])
async def test_recorded_streams_parse_exactly(name):
    fx = json.loads((FIX / f"{name}.json").read_text())
    raw = (FIX / f"{name}.sse").read_text()
    events = [json.loads(x[6:]) for x in raw.split("\n\n") if x.startswith("data: ")]
    want_text = "".join(e.get("answer", "") for e in events if e["event"] == "message")
    end = next(e for e in events if e["event"] == "message_end")
    text, usage, price, state = await _run(_engine_replaying(fx), stream=True)
    assert text == want_text and text
    assert state.conversation_id == end["conversation_id"] and state.message_id == end["message_id"]
    assert state.task_id == end["task_id"]
    assert usage.total_tokens == end["metadata"]["usage"]["total_tokens"]
    assert price["currency"] == end["metadata"]["usage"]["currency"]


async def test_recorded_stopped_stream_keeps_partial():
    fx = json.loads((FIX / "070-stream-stopped.json").read_text())
    text, usage, _, _ = await _run(_engine_replaying(fx), stream=True)
    assert text.startswith("working on:") and usage is None


async def test_recorded_failing_workflow_stream_fails_with_partial():
    fx = json.loads((FIX / "075-stream-failing-workflow.json").read_text())
    got = ""
    with pytest.raises(UpstreamError) as ei:
        async for ev in _engine_replaying(fx).events(EngineRequest(messages=[], query="q", remote_user="alice")):
            if isinstance(ev, TextDelta):
                got += ev.text
    assert got.startswith("about to fail") and "Run failed" in ei.value.message


@pytest.mark.parametrize("name,code,status", [
    ("076-blocking-failing-workflow", "invalid_param", 400),
    ("095-err-files-missing-upload-id", "invalid_param", 400),
    ("096-err-files-unknown-upload-id", "invalid_param", 400),
    ("099-err-files-too-many", "invalid_param", 400),
    ("102-err-input-too-long", "invalid_param", 400),
    ("087-err-bad-api-key", "provider_auth_error", 502),
])
async def test_recorded_error_cases_map(name, code, status):
    fx = json.loads((FIX / f"{name}.json").read_text())
    with pytest.raises(UpstreamError) as ei:
        await _run(_engine_replaying(fx), stream=False)
    assert (ei.value.code, ei.value.status) == (code, status)
    assert fx["response"]["json"]["message"][:20] in ei.value.message or code == "provider_auth_error"


@pytest.mark.parametrize("name", ["080-err-unknown-conversation", "062-chat-deleted-conversation"])
async def test_recorded_unknown_remote_conversation_is_a_lost_binding(name):
    fx = json.loads((FIX / f"{name}.json").read_text())
    with pytest.raises(RemoteConversationLost):
        await _run(_engine_replaying(fx), stream=False, remote="9d3e3d72-a6a8-4a7e-989c-12cbe5bd7524")


# ---- against the live Dify double ------------------------------------------------------------------


@pytest.fixture(scope="module")
def dify_server():
    d = DifyDouble()
    srv = LiveServer(d.app()).start()
    yield d, srv.url
    srv.stop()


@pytest.fixture
async def dtl(dify_server, oai, sqlite_url):
    d, url = dify_server
    d.reset()
    _, ourl = oai
    engines = {"dify": {"kind": "dify", "base_url": f"{url}/v1", "api_key": d.api_key, "max_retries": 0},
               "acc": {"kind": "openai", "base_url": f"{ourl}/v1", "api_key": "sk-test-double-key", "model": "m"}}
    tl = AsyncThreadline(database_url=sqlite_url, engines=engines,
                         apps={"d": {"engine": "dify", "inputs": {"nickname": "Al"}}, "s": {"engine": "acc"}},
                         include_presets=False)
    yield tl, d
    await tl.aclose()


async def test_three_dify_turns_carry_difys_own_conversation(dtl):
    tl, d = dtl
    r1 = await tl.chat("hello", user="alice", app="d")
    assert r1.answer.startswith("echo: hello\nturn: 0\nprevious: \nnickname: Al")
    r2 = await tl.chat("again", user="alice", app="d", conversation_id=r1.conversation_id)
    assert "turn: 1\nprevious: hello" in r2.answer
    events = [ev async for ev in tl.stream("third", user="alice", app="d", conversation_id=r1.conversation_id)]
    assert "turn: 2\nprevious: again" in events[-1].reply.answer
    bodies = d.requests
    assert bodies[0]["conversation_id"] == "" and bodies[1]["conversation_id"] == bodies[2]["conversation_id"] != ""
    assert bodies[1]["conversation_id"] != r1.conversation_id  # Threadline's id stays its own
    assert all(set(b) <= DIFY_FIELDS for b in bodies)
    assert [b["query"] for b in bodies] == ["hello", "again", "third"]  # never packed history
    assert len({b["user"] for b in bodies}) == 1
    msgs = await tl.messages(r1.conversation_id, user="alice")
    assert [m.content for m in msgs if m.role == "user"] == ["hello", "again", "third"]


async def test_dify_images_by_url_and_upload(dtl, image_host):
    tl, d = dtl
    url = f"{image_host}/img/blue.png"
    await tl.chat("url", user="alice", app="d", images=[url])
    assert d.requests[-1]["files"] == [{"type": "image", "transfer_method": "remote_url", "url": url}]
    fid = await tl.upload((FIX / "assets" / "red.png").read_bytes(), user="alice", app="d", name="red.png")
    await tl.chat("upload", user="alice", app="d", files=[fid])
    f = d.requests[-1]["files"][0]
    assert f["transfer_method"] == "local_file" and f["upload_file_id"] in d.uploads
    assert d.uploads[f["upload_file_id"]]["user"] == d.requests[-1]["user"]


async def test_switch_dify_to_stateless_replays_dify_turns(dtl, oai):
    tl, _ = dtl
    od, _ = oai
    r1 = await tl.chat("on dify", user="alice", app="d")
    await tl.chat("now stateless", user="alice", app="d", conversation_id=r1.conversation_id, engine="acc")
    msgs = od.requests[-1]["messages"]
    assert msgs[0] == {"role": "user", "content": "on dify"}
    assert msgs[1]["role"] == "assistant" and msgs[1]["content"].startswith("echo: on dify")


async def test_switch_stateless_to_dify_seeds_missed_turns_once(dtl):
    tl, d = dtl
    r1 = await tl.chat("I like blue", user="alice", app="s")
    r2 = await tl.chat("what do I like?", user="alice", app="s", conversation_id=r1.conversation_id, engine="dify")
    first = d.requests[-1]
    assert first["conversation_id"] == ""
    assert "Earlier conversation" in first["query"] and "I like blue" in first["query"]
    assert first["query"].endswith("what do I like?")
    assert "turn: 0" in r2.answer
    await tl.chat("plain again", user="alice", app="s", conversation_id=r1.conversation_id, engine="dify")
    assert d.requests[-1]["query"] == "plain again"
    assert d.requests[-1]["conversation_id"] == d.conversations_by_query("plain again")


async def test_lost_remote_conversation_is_recreated_and_seeded(dtl):
    tl, d = dtl
    r1 = await tl.chat("remember me", user="alice", app="d")
    d.conversations.clear()  # deleted on Dify's side
    r2 = await tl.chat("still there?", user="alice", app="d", conversation_id=r1.conversation_id)
    assert r2.status == "completed"
    assert "remember me" in d.requests[-1]["query"] and d.requests[-1]["conversation_id"] == ""


async def test_stop_calls_dify_stop_with_same_user_and_keeps_partial(dtl):
    tl, d = dtl
    d.slow = 0.05
    got, final = 0, None
    async for ev in tl.stream("long answer please", user="alice", app="d"):
        if type(ev).__name__ == "TurnStarted":
            tid = ev.task_id
        if isinstance(ev, TextDelta):
            got += 1
            if got == 3:
                await tl.stop(tid, user="alice")
        if type(ev).__name__ == "TurnCompleted":
            final = ev.reply
    assert final.status == "stopped" and final.answer
    assert d.stops and d.stops[-1]["user"] == d.requests[-1]["user"]
    msgs = await tl.messages(final.conversation_id, user="alice")
    assert msgs[-1].status == "stopped" and msgs[-1].content == final.answer


async def test_import_existing_dify_conversation(dtl):
    tl, d = dtl
    d.page_cap = 2
    # Seconds apart: a page edge inside one second loses messages on the real server (its first_id
    # page holds strictly older ones), which no client can get back; tests/test_dify_import_order.py.
    remote = d.seed_conversation("bob-remote", ["q1", "q2", "q3"], created_at=[100, 101, 102])
    conv = await tl.import_dify_conversation(remote, user="bob", app="d", remote_user="bob-remote")
    msgs = await tl.messages(conv.id, user="bob")
    assert [m.content for m in msgs if m.role == "user"] == ["q1", "q2", "q3"]
    assert d.message_pages >= 2  # paged with first_id / has_more
