"""A conversation is a tree of turns: regenerate, edit-and-resend and continuing from an older
answer fork a branch without copying history, and what an engine is sent is the branch being
continued (checked on the strict doubles, on SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.conftest import engines_for
from tests.doubles.dify_double import DifyDouble
from tests.doubles.live import LiveServer
from threadline import AsyncThreadline
from threadline.config import Settings
from threadline.errors import InvalidParamError, NotFoundError
from threadline.messages import TurnCompleted
from threadline.server.app import create_app
from threadline.server.keys import create_key
from threadline.store.store import ROOT_PARENT
from threadline.turns import TurnRequest


async def turn(tl: AsyncThreadline, text: str, *, user: str = "u", app: str | None = "demo", **kw: object):
    svc = tl.service
    async for ev in svc.turn(svc.scope(app, user), TurnRequest(user=user, text=text, stream=False, **kw)):  # type: ignore[arg-type]
        if isinstance(ev, TurnCompleted):
            return ev.reply
    raise AssertionError("no reply")


def sent(d) -> list[str]:
    return [m["content"] for m in d.requests[-1]["messages"] if m["role"] != "system"]


@pytest.fixture
async def tl(oai, database_url):
    async with AsyncThreadline(database_url=database_url, engines=engines_for(oai[1]),
                               apps={"demo": {"engine": "acc"}}, include_presets=False) as t:
        yield t


async def test_regenerate_edit_and_continue_follow_the_branch(tl, oai):
    d, _ = oai
    r1 = await turn(tl, "q1")
    cid = r1.conversation_id
    await turn(tl, "q2", conversation_id=cid)
    r3 = await turn(tl, "q3", conversation_id=cid)

    # regenerate the answer to q2: a new branch after a1; the engine sees q1, a1, q2 only
    r2b = await turn(tl, "q2", conversation_id=cid, parent_id=r1.message_id)
    assert sent(d) == ["q1", "Answer to: q1", "q2"]
    msgs, _ = await tl.service.messages(tl.service.scope("demo", "u"), cid)
    assert [m["content"] for m in msgs] == ["q1", "Answer to: q1", "q2", "Answer to: q2"]
    assert msgs[-1]["id"] == r2b.message_id
    # the abandoned branch is still there, nothing copied
    old, _ = await tl.service.messages(tl.service.scope("demo", "u"), cid, tip_id=r3.message_id)
    assert [m["content"] for m in old] == ["q1", "Answer to: q1", "q2", "Answer to: q2", "q3", "Answer to: q3"]
    assert (await tl.conversation(cid, user="u")).id == cid
    assert len(await tl.gateway.store.branch(cid)) == 4

    # a plain next turn continues the newest branch
    await turn(tl, "q4", conversation_id=cid)
    assert sent(d) == ["q1", "Answer to: q1", "q2", "Answer to: q2", "q4"]

    # edit the first question: a branch from the root
    await turn(tl, "q1 edited", conversation_id=cid, parent_id=ROOT_PARENT)
    assert sent(d) == ["q1 edited"]
    msgs, _ = await tl.service.messages(tl.service.scope("demo", "u"), cid)
    assert [m["content"] for m in msgs] == ["q1 edited", "Answer to: q1 edited"]

    # continuing from the newest answer is no fork at all
    last = msgs[-1]["id"]
    await turn(tl, "q5", conversation_id=cid, parent_id=last)
    assert sent(d) == ["q1 edited", "Answer to: q1 edited", "q5"]


async def test_a_linear_conversation_stays_linear(tl, oai):
    r1 = await turn(tl, "a")
    await turn(tl, "b", conversation_id=r1.conversation_id, parent_id=r1.message_id)  # the newest answer
    conv = await tl.service.conversation(tl.service.scope("demo", "u"), r1.conversation_id)
    assert conv["forked"] is False


async def test_bad_parents_are_refused_and_store_nothing(tl, oai):
    r1 = await turn(tl, "a")
    r_other = await turn(tl, "other")
    cid = r1.conversation_id
    for bad in (r_other.message_id, r1.user_message_id, "01234567-89ab-7def-8123-456789abcdef"):
        with pytest.raises(InvalidParamError) as exc:
            await turn(tl, "x", conversation_id=cid, parent_id=bad)
        assert exc.value.code == "invalid_parent"
    with pytest.raises(InvalidParamError):
        await turn(tl, "x", parent_id=r1.message_id)  # no conversation
    with pytest.raises(NotFoundError):  # another user: not-found before the parent is even looked at
        await turn(tl, "x", user="mallory", conversation_id=cid, parent_id=r1.message_id)
    assert len(await tl.messages(cid, user="u")) == 2


async def test_a_stateful_engine_gets_the_branch_as_a_fresh_seeded_conversation(oai, tmp_path):
    """Dify keeps its own line: a fork cannot continue it, so the turn starts a new Dify
    conversation seeded with the branch (never the abandoned turns)."""
    dd = DifyDouble()
    srv = LiveServer(dd.app()).start()
    try:
        async with AsyncThreadline(database_url=f"sqlite+aiosqlite:///{tmp_path}/t.db", include_presets=False,
                                   engines={"dify": {"kind": "dify", "base_url": f"{srv.url}/v1",
                                                     "api_key": dd.api_key}},
                                   apps={"demo": {"engine": "dify"}}) as tl:
            r1 = await turn(tl, "first question")
            cid = r1.conversation_id
            await turn(tl, "abandoned question", conversation_id=cid)
            remote1 = (await tl.conversation(cid, user="u")).remote["dify"]["id"]
            await turn(tl, "second try", conversation_id=cid, parent_id=r1.message_id)
            remote2 = (await tl.conversation(cid, user="u")).remote["dify"]["id"]
            assert remote2 != remote1
            q = dd.requests[-1]["query"]
            assert "first question" in q and "abandoned question" not in q and q.endswith("second try")
            assert not dd.requests[-1].get("conversation_id")
    finally:
        srv.stop()


def test_dify_route_parent_message_id(oai, tmp_path):
    d, url = oai
    settings = Settings.build(database_url=f"sqlite+aiosqlite:///{tmp_path}/s.db", include_presets=False,
                              engines=engines_for(url), apps={"demo": {"engine": "acc"}})
    key = asyncio.run(create_key(settings, "demo"))
    srv = LiveServer(create_app(settings)).start()
    h = {"Authorization": f"Bearer {key}"}
    try:
        def ask(q: str, cid: str = "", parent: str | None = None, user: str = "d1") -> httpx.Response:
            body = {"inputs": {}, "query": q, "user": user, "response_mode": "blocking", "conversation_id": cid}
            if parent is not None:
                body["parent_message_id"] = parent
            return httpx.post(f"{srv.url}/v1/chat-messages", headers=h, json=body)

        r1 = ask("q1").json()
        cid = r1["conversation_id"]
        ask("q2", cid)
        # UUID_NIL, what Dify's service API always records, means the newest answer
        r3 = ask("q3", cid, "00000000-0000-0000-0000-000000000000")
        assert r3.status_code == 200 and sent(d)[-2:] == ["Answer to: q2", "q3"]
        r = ask("q2 again", cid, r1["message_id"])
        assert r.status_code == 200 and sent(d) == ["q1", "Answer to: q1", "q2 again"]
        page = httpx.get(f"{srv.url}/v1/messages", headers=h, params={"conversation_id": cid, "user": "d1"}).json()
        assert [m["query"] for m in page["data"]] == ["q1", "q2 again"]
        assert page["data"][1]["parent_message_id"] == r1["message_id"]
        assert page["data"][0]["parent_message_id"] == "00000000-0000-0000-0000-000000000000"
        bad = ask("x", cid, "not-a-uuid")
        assert bad.status_code == 400 and "parent_message_id" in bad.json()["message"]
        assert ask("x", cid, r1["message_id"], user="d2").status_code == 404
    finally:
        srv.stop()


async def test_python_api_regenerate_edit_and_read_a_branch(tl, oai):
    d, _ = oai
    r1 = await tl.chat("q1", user="u", app="demo")
    cid = r1.conversation_id
    r2 = await tl.chat("q2", user="u", app="demo", conversation_id=cid)
    again = await tl.regenerate(r2.message_id, user="u")  # by the answer; app found from the id
    assert again.conversation_id == cid and again.message_id != r2.message_id
    assert sent(d) == ["q1", "Answer to: q1", "q2"]
    edited = await tl.edit(r2.user_message_id, "q2, edited", user="u", app="demo")  # by the question
    assert sent(d) == ["q1", "Answer to: q1", "q2, edited"]
    assert [m.content for m in await tl.messages(cid, user="u")] == ["q1", "Answer to: q1", "q2, edited",
                                                                      "Answer to: q2, edited"]
    assert [m.content for m in await tl.messages(cid, user="u", tip_id=r2.message_id)][-1] == "Answer to: q2"
    first = await tl.edit(r1.user_message_id, "q1 from the top", user="u")
    assert sent(d) == ["q1 from the top"] and first.conversation_id == edited.conversation_id
    r3 = await tl.chat("next", user="u", conversation_id=cid, parent_id=again.message_id)
    assert sent(d) == ["q1", "Answer to: q1", "q2", "Answer to: q2", "next"] and r3.status == "completed"
    with pytest.raises(NotFoundError):
        await tl.regenerate(r2.message_id, user="mallory")
