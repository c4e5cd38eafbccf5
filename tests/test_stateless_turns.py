"""Turns over stateless engines, end to end through the pinned Python API and live wire doubles."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import engines_for
from threadline import (
    AsyncThreadline,
    ConversationBusyError,
    NotFoundError,
    ReasoningDelta,
    TextDelta,
    Threadline,
    TurnCompleted,
    TurnFailed,
    UpstreamError,
)
from threadline.turns import TurnRequest


async def test_second_turn_carries_history_system_and_memory_openai(atl, oai):
    d, _ = oai
    await atl.memory.add(user="u1", app="demo", text="Prefers metric units")
    r1 = await atl.chat("What is 2+2?", user="u1", app="demo")
    assert r1.answer == "Answer to: What is 2+2?"
    assert r1.usage.prompt_tokens > 0 and r1.usage.total_tokens >= r1.usage.prompt_tokens
    r2 = await atl.chat("And 3+3?", user="u1", app="demo", conversation_id=r1.conversation_id)
    assert r2.conversation_id == r1.conversation_id
    body = d.requests[-1]
    assert set(body) <= {"model", "messages", "stream", "max_tokens", "stream_options"}
    assert "conversation_id" not in str(body)
    msgs = body["messages"]
    assert msgs[0]["role"] == "system"
    assert "You are terse." in msgs[0]["content"] and "Answer in English." in msgs[0]["content"]
    assert "Prefers metric units" in msgs[0]["content"]
    assert [m["role"] for m in msgs[1:]] == ["user", "assistant", "user"]
    assert msgs[1]["content"] == "What is 2+2?"
    assert msgs[2]["content"] == "Answer to: What is 2+2?"
    assert msgs[3]["content"] == "And 3+3?"


async def test_second_turn_carries_history_gemini(atl, gem):
    d, _ = gem
    await atl.memory.add(user="u1", app="gdemo", text="Lives in Oslo")
    r1 = await atl.chat("Hello there", user="u1", app="gdemo")
    assert r1.answer == "Answer to: Hello there"
    assert r1.reasoning and "Considering" in r1.reasoning
    r2 = await atl.chat("Second", user="u1", app="gdemo", conversation_id=r1.conversation_id)
    body = d.requests[-1]
    assert body["systemInstruction"]["parts"][0]["text"].startswith("You are terse.")
    assert "Lives in Oslo" in body["systemInstruction"]["parts"][0]["text"]
    assert [c["role"] for c in body["contents"]] == ["user", "model", "user"]
    assert body["contents"][1]["parts"] == [{"text": "Answer to: Hello there"}]
    # reasoning is never replayed
    assert "Considering" not in str(body["contents"])
    assert r2.usage.reasoning_tokens > 0
    assert r2.usage.completion_tokens >= r2.usage.reasoning_tokens


@pytest.mark.parametrize("provider,mode,profile", [
    ("nim", "think_tags", "deepseek-r1"),
    ("nim", "think_no_open", "deepseek-r1"),
    ("deepseek", "reasoning_content", "deepseek-reasoner"),
    ("xai", "reasoning_content", "grok"),
    ("openai", "plain", "openai"),
])
async def test_provider_profiles_stream_and_never_replay_reasoning(oai, sqlite_url, provider, mode, profile):
    d, url = oai
    d.reset(provider=provider, answer_mode=mode, chunk_size=2)
    engines = {"e": {"kind": "openai", "base_url": f"{url}/v1", "api_key": "sk-test-double-key", "model": "m",
                     "profile": profile}}
    async with AsyncThreadline(database_url=sqlite_url, engines=engines,
                               apps={"a": {"engine": "e", "system": ["Be brief."]}}, include_presets=False) as tl:
        texts, reasons = [], []
        final = None
        async for ev in tl.stream("first question", user="u", app="a"):
            if isinstance(ev, TextDelta):
                texts.append(ev.text)
            elif isinstance(ev, ReasoningDelta):
                reasons.append(ev.text)
            elif isinstance(ev, TurnCompleted):
                final = ev.reply
        assert final is not None
        assert final.answer == "Answer to: " + ("Be brief.\n\nfirst question" if profile == "deepseek-r1" else "first question")
        if mode == "plain":
            assert final.reasoning is None
        else:
            assert final.reasoning == d.reasoning
            assert "".join(reasons) == d.reasoning
            assert "<think>" not in "".join(texts) and "</think>" not in "".join(texts)
        await tl.chat("second", user="u", app="a", conversation_id=final.conversation_id)
        body = d.requests[-1]
        assert d.reasoning not in str(body["messages"])
        for m in body["messages"]:
            assert set(m) == {"role", "content"}
        if profile == "deepseek-r1":
            assert all(m["role"] != "system" for m in body["messages"])
            assert body["messages"][0]["content"].startswith("Be brief.")
            assert "stream_options" not in d.requests[0]
            assert "max_tokens" in body
        if profile == "openai":
            assert "max_completion_tokens" in body and "max_tokens" not in body
            assert d.requests[0]["stream_options"] == {"include_usage": True}
            assert final.usage.estimated is False
        stored = await tl.messages(final.conversation_id, user="u", app="a")
        assert stored[1].reasoning == (None if mode == "plain" else d.reasoning)


async def test_images_by_url_reach_openai_as_image_url_and_gemini_inline(oai, gem, image_host, sqlite_url):
    od, ourl = oai
    gd, gurl = gem
    engines = engines_for(ourl, gurl)
    engines["gem"]["allow_hosts"] = ["127.0.0.1"]
    async with AsyncThreadline(database_url=sqlite_url, engines=engines,
                               apps={"o": {"engine": "acc"}, "g": {"engine": "gem"}}, include_presets=False) as tl:
        url = f"{image_host}/img/blue.png"
        await tl.chat("what is this?", user="u", app="o", images=[url])
        parts = od.requests[-1]["messages"][-1]["content"]
        assert parts == [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": url}}]
        r = await tl.chat("what is this?", user="u", app="g", images=[url])
        part = gd.requests[-1]["contents"][-1]["parts"][1]
        assert part["inlineData"]["mimeType"] == "image/png"
        assert r.answer.endswith("[1 image(s)]")
        # data: URIs are split into mimeType + data
        await tl.chat("and this?", user="u", app="g", images=["data:image/png;base64,iVBORw0KGgo="])
        assert gd.requests[-1]["contents"][-1]["parts"][1] == {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}}
        # an uploaded image goes inline to Gemini and as a data: URL to OpenAI-compatible engines
        fid = await tl.upload(b"\x89PNG\r\n\x1a\n" + b"0" * 20, user="u", app="g", name="x.png")
        await tl.chat("uploaded", user="u", app="g", files=[fid])
        assert gd.requests[-1]["contents"][-1]["parts"][1]["inlineData"]["mimeType"] == "image/png"


@pytest.mark.parametrize("target", ["http://127.0.0.1:{port}/img/blue.png", "http://10.0.0.7/x.png",
                                    "http://169.254.169.254/latest/meta-data/", "http://[::1]/x.png"])
async def test_ssrf_guard_refuses_internal_addresses(gem, image_host, sqlite_url, target):
    gd, gurl = gem
    port = image_host.rsplit(":", 1)[1]
    async with AsyncThreadline(database_url=sqlite_url, engines=engines_for(None, gurl), apps={"g": {"engine": "gem"}},
                               include_presets=False) as tl:
        before = len(gd.requests)
        with pytest.raises(Exception) as ei:
            await tl.chat("look", user="u", app="g", images=[target.format(port=port)])
        assert getattr(ei.value, "code", "") in ("url_not_allowed", "invalid_param")
        assert len(gd.requests) == before  # nothing reached the provider
        convs = await tl.conversations(user="u", app="g")
        msgs = await tl.messages(convs[0].id, user="u")
        assert msgs[0].content == "look" and msgs[1].status == "failed"


async def test_non_http_image_url_is_rejected_before_anything_is_stored(atl):
    with pytest.raises(Exception) as ei:
        await atl.chat("look", user="u", app="gdemo", images=["file:///etc/passwd"])
    assert ei.value.code == "invalid_param" and ei.value.status == 400
    assert await atl.conversations(user="u", app="gdemo") == []


async def test_redirect_to_internal_address_is_refused(gem, image_host, sqlite_url):
    _, gurl = gem
    engines = engines_for(None, gurl)
    engines["gem"]["allow_hosts"] = []
    async with AsyncThreadline(database_url=sqlite_url, engines=engines, apps={"g": {"engine": "gem"}},
                               include_presets=False) as tl:
        with pytest.raises(Exception) as ei:
            await tl.chat("x", user="u", app="g", images=[f"{image_host}/redirect?to=http://169.254.169.254/"])
        assert ei.value.code == "url_not_allowed"


async def test_killed_upstream_keeps_user_message_and_partial_answer_failed(atl, oai):
    d, _ = oai
    d.reset(reply="one two three four five six seven", chunk_size=4, fail_after=3)
    got = []
    with pytest.raises(UpstreamError):
        async for ev in atl.stream("tell me", user="u1", app="demo"):
            if isinstance(ev, TextDelta):
                got.append(ev.text)
    assert "".join(got) == "one two thre"
    convs = await atl.conversations(user="u1", app="demo")
    msgs = await atl.messages(convs[0].id, user="u1")
    assert [m.role for m in msgs] == ["user", "assistant"]
    assert msgs[0].content == "tell me"
    assert msgs[1].status == "failed" and msgs[1].content == "one two thre"
    assert msgs[1].error["code"] in ("upstream_unavailable", "upstream_error")


async def test_retries_429_honouring_retry_after_then_succeeds(atl, oai):
    d, _ = oai
    d.reset(rate_limit=2, retry_after="0.05")
    r = await atl.chat("hi", user="u1", app="demo")
    assert r.answer == "Answer to: hi"
    assert len(d.requests) == 3


async def test_rate_limit_exhausted_maps_to_429_error_without_key(atl, oai):
    d, _ = oai
    d.reset(rate_limit=10, retry_after="0.01")
    with pytest.raises(UpstreamError) as ei:
        await atl.chat("hi", user="u1", app="demo")
    assert ei.value.code == "rate_limit_error" and ei.value.status == 429 and ei.value.retryable
    assert "sk-test" not in str(ei.value)


@pytest.mark.parametrize("provider,status", [("openai", 400), ("nim", 422), ("xai", 400)])
async def test_doubles_reject_invented_fields_like_the_real_services(oai, provider, status):
    import httpx

    d, url = oai
    d.reset(provider=provider)
    async with httpx.AsyncClient() as c:
        r = await c.post(f"{url}/v1/chat/completions", headers={"Authorization": "Bearer sk-test-double-key"},
                         json={"model": "m", "messages": [{"role": "user", "content": "x"}], "conversation_id": "abc"})
    assert r.status_code == status
    assert "conversation_id" in r.text


async def test_wrong_key_is_mapped_and_never_leaked(oai, sqlite_url):
    _, url = oai
    secret = "sk-live-SECRET-1234567890"
    engines = {"e": {"kind": "openai", "base_url": f"{url}/v1", "api_key": secret, "model": "m", "max_retries": 0}}
    async with AsyncThreadline(database_url=sqlite_url, engines=engines, apps={"a": {"engine": "e"}},
                               include_presets=False) as tl:
        with pytest.raises(UpstreamError) as ei:
            await tl.chat("hi", user="u", app="a")
        assert ei.value.code == "provider_auth_error"
        assert secret not in str(ei.value.to_dict())
        msgs = await tl.messages((await tl.conversations(user="u", app="a"))[0].id, user="u")
        assert secret not in str(msgs[1].error)


async def test_gemini_blocked_prompt_and_safety_finish_are_clear_errors(atl, gem):
    d, _ = gem
    d.reset(block_prompt=True)
    with pytest.raises(UpstreamError) as ei:
        await atl.chat("bad", user="u", app="gdemo")
    assert ei.value.code == "content_blocked"
    d.reset(safety_finish=True)
    with pytest.raises(UpstreamError) as ei:
        await atl.chat("bad", user="u", app="gdemo")
    assert ei.value.code == "content_blocked" and "SAFETY" in ei.value.message


async def test_gemini_429_retry_delay_is_honoured(atl, gem):
    d, _ = gem
    d.reset(rate_limit=1)
    r = await atl.chat("hi", user="u", app="gdemo")
    assert r.answer == "Answer to: hi" and len(d.requests) == 2


async def test_another_user_and_unknown_ids_get_not_found(atl):
    r = await atl.chat("mine", user="alice", app="demo")
    with pytest.raises(NotFoundError):
        await atl.chat("theirs", user="bob", app="demo", conversation_id=r.conversation_id)
    with pytest.raises(NotFoundError):
        await atl.messages(r.conversation_id, user="bob")
    with pytest.raises(NotFoundError):
        await atl.delete_conversation(r.conversation_id, user="bob")
    with pytest.raises(NotFoundError):
        await atl.chat("x", user="alice", app="gdemo", conversation_id=r.conversation_id)  # other app
    assert len(await atl.messages(r.conversation_id, user="alice")) == 2


async def test_engine_override_keeps_history_and_switches_provider(atl, oai, gem):
    od, _ = oai
    gd, _ = gem
    r1 = await atl.chat("on openai", user="u", app="demo")
    r2 = await atl.chat("now gemini", user="u", app="demo", conversation_id=r1.conversation_id, engine="gem")
    assert r2.engine == "gem"
    contents = gd.requests[-1]["contents"]
    assert contents[0]["parts"][0]["text"] == "on openai"
    assert contents[1]["parts"][0]["text"] == "Answer to: on openai"
    r3 = await atl.chat("back", user="u", app="demo", conversation_id=r1.conversation_id)
    assert r3.engine == "acc"
    assert "Answer to: now gemini" in str(od.requests[-1]["messages"])


async def test_concurrent_turns_on_one_conversation_are_serialized(atl, oai):
    d, _ = oai
    r = await atl.chat("start", user="u", app="demo")
    d.reset(slow=0.02, chunk_size=5)
    a = atl.chat("A", user="u", app="demo", conversation_id=r.conversation_id)
    b = atl.chat("B", user="u", app="demo", conversation_id=r.conversation_id)
    await asyncio.gather(a, b)
    msgs = await atl.messages(r.conversation_id, user="u")
    roles = [m.role for m in msgs]
    assert roles == ["user", "assistant"] * 3
    # each answer directly follows its question
    for q, a_ in zip(msgs[2::2], msgs[3::2], strict=True):
        assert a_.content == f"Answer to: {q.content}"


async def test_busy_conversation_gives_clear_error_when_wait_expires(atl, oai):
    d, _ = oai
    r = await atl.chat("start", user="u", app="demo")
    atl.gateway.turn_wait = 0.1
    d.reset(slow=0.2)
    first = asyncio.create_task(atl.chat("slow", user="u", app="demo", conversation_id=r.conversation_id))
    await asyncio.sleep(0.05)
    with pytest.raises(ConversationBusyError) as ei:
        await atl.chat("second", user="u", app="demo", conversation_id=r.conversation_id)
    assert ei.value.code == "conversation_busy"
    await first


async def test_stop_keeps_partial_answer(atl, oai):
    d, _ = oai
    d.reset(reply="x" * 200, chunk_size=2, slow=0.01)
    task_id = None
    got = 0
    final = None
    async for ev in atl.stream("go", user="u", app="demo"):
        if type(ev).__name__ == "TurnStarted":
            task_id = ev.task_id
        if isinstance(ev, TextDelta):
            got += 1
            if got == 5:
                assert await atl.stop(task_id, user="u")
        if isinstance(ev, TurnCompleted):
            final = ev.reply
    assert final.status == "stopped"
    assert 5 * 2 <= len(final.answer) < 200
    msgs = await atl.messages(final.conversation_id, user="u")
    assert msgs[1].status == "stopped" and msgs[1].content == final.answer


async def test_conversation_is_free_when_the_final_event_arrives(atl, oai):
    """A blocking caller returns on the final event and never resumes the generator: the turn must
    not keep its conversation locked until that generator is garbage-collected."""
    gw = atl.gateway
    agen = gw.turn(TurnRequest(user="u", text="q1", app="demo", stream=False))
    events = [ev async for ev in _until_final(agen)]
    cid = events[0].conversation_id
    assert isinstance(events[-1], TurnCompleted)
    assert cid not in gw._locks  # released (and dropped) before the caller saw the end
    r = await asyncio.wait_for(atl.chat("q2", user="u", app="demo", conversation_id=cid), 5)
    assert r.status == "completed"
    await agen.aclose()


async def _until_final(agen):
    async for ev in agen:
        yield ev
        if isinstance(ev, TurnCompleted | TurnFailed):
            return


async def test_a_caller_leaving_mid_answer_has_the_partial_stored_before_the_turn_ends(atl, oai):
    d, _ = oai
    d.reset(reply="y" * 200, chunk_size=2, slow=0.01)
    agen = atl.gateway.turn(TurnRequest(user="u", text="go", app="demo", stream=True))
    started = await agen.__anext__()
    got = [await agen.__anext__() for _ in range(3)]
    assert all(isinstance(ev, TextDelta) for ev in got)
    await agen.aclose()  # the client went away
    msgs = await atl.messages(started.conversation_id, user="u")  # no waiting: already stored
    assert msgs[1].status == "stopped"
    assert msgs[1].content.startswith("yyyyyy") and len(msgs[1].content) < 200
    assert started.conversation_id not in atl.gateway._locks


async def test_a_caller_leaving_right_after_the_start_leaves_no_answer_streaming(atl, oai):
    agen = atl.gateway.turn(TurnRequest(user="u", text="go", app="demo", stream=True))
    started = await agen.__anext__()
    await agen.aclose()
    msgs = await atl.messages(started.conversation_id, user="u")
    assert [(m.role, m.status) for m in msgs] == [("user", "completed"), ("assistant", "stopped")]
    r = await atl.chat("again", user="u", app="demo", conversation_id=started.conversation_id)
    assert r.status == "completed"


def test_sync_facade_same_shape(oai, gem, tmp_path):
    _, ourl = oai
    tl = Threadline(database_url=f"sqlite+aiosqlite:///{tmp_path}/x.db",
                    engines={"acc": {"kind": "openai", "base_url": f"{ourl}/v1", "api_key": "sk-test-double-key",
                                     "model": "m"}},
                    apps={"demo": {"engine": "acc", "system": ["You are terse."]}})
    try:
        r = tl.chat("text", user="u1", app="demo", conversation_id=None, engine=None)
        assert r.answer and r.conversation_id and r.message_id and r.usage.total_tokens > 0
        events = list(tl.stream("more", user="u1", app="demo", conversation_id=r.conversation_id))
        assert any(type(e).__name__.startswith("Text") and e.text for e in events)
        assert events[-1].reply.answer == "Answer to: more"
        assert [c.id for c in tl.conversations(user="u1", app="demo")] == [r.conversation_id]
        assert len(tl.messages(r.conversation_id, user="u1")) == 4
        m = tl.memory.add(user="u1", app="demo", text="Prefers metric units")
        assert [e.text for e in tl.memory.list(user="u1", app="demo")] == ["Prefers metric units"]
        tl.memory.delete(m.id, user="u1", app="demo")
        assert tl.memory.list(user="u1", app="demo") == []
        with pytest.raises(NotFoundError):
            tl.messages(r.conversation_id, user="someone-else")
        tl.delete_conversation(r.conversation_id, user="u1")
        with pytest.raises(NotFoundError):
            tl.messages(r.conversation_id, user="u1")
        # app may be omitted when engine is given
        r2 = tl.chat("no app", user="u1", engine="acc")
        assert r2.engine == "acc"
    finally:
        tl.close()
