"""Issue 19.3: importing a Dify conversation whose messages share created_at seconds.

Dify's created_at has whole seconds, /messages returns an equal-second run in no guaranteed order
(recording 047: q2 before q1) and the service API gives nil parent ids, so the order Threadline can
know is: created_at, then Dify's pages (first_id pages hold older messages), then the reverse of Dify's
in-page order for an equal-second run (Dify lists it newest first: 047, and the live `hello, third, again`).
"""

from __future__ import annotations

import json

import httpx

from tests.conftest import SHARED
from tests.test_dify_engine import dify_server, dtl  # noqa: F401  (fixtures)
from threadline.config import EngineConfig
from threadline.engines.dify import DifyEngine

FIX = SHARED / "fixtures" / "dify"


def _recorded(name: str) -> dict:
    return json.loads((FIX / f"{name}.json").read_text())["response"]["json"]


async def test_recorded_pages_keep_order_across_pages_and_dify_order_within():
    newest, older = _recorded("046-quirk-messages-limit1"), _recorded("047-quirk-messages-first-id")
    asked: list[dict[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        q = dict(request.url.params)
        asked.append(q)
        if q.get("first_id") == newest["data"][0]["id"]:
            return httpx.Response(200, json=older)
        assert "first_id" not in q
        return httpx.Response(200, json=newest)

    cfg = EngineConfig(name="dify", kind="dify", base_url="http://dify.test/v1", api_key="app-x", max_retries=0)
    eng = DifyEngine(cfg, httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    try:
        msgs = await eng.list_messages("01c04ae3-dbfd-41cd-91d2-b332e984534c", "carol")
    finally:
        await eng.http.aclose()
    # q3 (the newer page, a later second) last; the equal-second run Dify listed q2, q1 is put back in
    # the order it was asked (the recording's queries are numbered in order).
    assert [m["query"] for m in msgs] == ["q1", "q2", "q3"]
    assert len(asked) == 2 and asked[1]["first_id"] == newest["data"][0]["id"]


async def test_double_pages_like_the_recording(dify_server):  # noqa: F811
    d, url = dify_server
    d.reset()
    d.paging = "dify"
    cid = d.seed_conversation("carol", ["q1", "q2", "q3"], created_at=[1795337717, 1795337717, 1795337718])
    async with httpx.AsyncClient(base_url=f"{url}/v1", headers={"Authorization": f"Bearer {d.api_key}"}) as c:
        p1 = (await c.get("/messages", params={"conversation_id": cid, "user": "carol", "limit": 1})).json()
        p2 = (await c.get("/messages", params={"conversation_id": cid, "user": "carol", "limit": 20,
                                               "first_id": p1["data"][0]["id"]})).json()
    assert [m["query"] for m in p1["data"]] == ["q3"] and p1["has_more"] is True  # as 046
    assert [m["query"] for m in p2["data"]] == ["q2", "q1"] and p2["has_more"] is False  # as 047


async def test_import_many_same_second_messages_over_several_pages(dtl):  # noqa: F811
    tl, d = dtl
    d.paging, d.page_cap = "dify", 4
    queries = [f"m{i}" for i in range(1, 11)]
    # Three pages of 4/4/2 newest first; each page has equal-second runs, page edges between seconds.
    seconds = [100, 100, 101, 101, 101, 101, 102, 102, 102, 103]
    remote = d.seed_conversation("bob-remote", queries, created_at=seconds)
    conv = await tl.import_dify_conversation(remote, user="bob", app="d", remote_user="bob-remote")
    got = [m.content for m in await tl.messages(conv.id, user="bob") if m.role == "user"]
    assert d.message_pages == 3
    # Every message, in the order it was asked: seconds ascending, pages in order, and within a second
    # the reverse of Dify's newest-first order.
    assert got == queries
