"""The in-process history cache must never change what a stateless engine is sent: two gateways on
one database (as two server processes) alternate turns of one conversation, and each request still
carries the full, current history."""

from __future__ import annotations

from tests.conftest import engines_for
from threadline import AsyncThreadline
from threadline.history_cache import HistoryCache
from threadline.store import Store, new_id


def _texts(body: dict) -> list[tuple[str, str]]:
    return [(m["role"], m["content"] if isinstance(m["content"], str) else m["content"][0]["text"])
            for m in body["messages"] if m["role"] != "system"]


async def test_two_processes_alternating_turns_each_send_the_whole_history(oai, database_url):
    d, url = oai
    apps = {"demo": {"engine": "acc"}}
    a = AsyncThreadline(database_url=database_url, engines=engines_for(url), apps=apps, include_presets=False)
    b = AsyncThreadline(database_url=database_url, engines=engines_for(url), apps=apps, include_presets=False)
    try:
        d.reset(reply="one")
        r = await a.chat("q1", user="u", app="demo")
        d.reset(reply="two")
        await b.chat("q2", user="u", app="demo", conversation_id=r.conversation_id)
        d.reset(reply="three")
        await a.chat("q3", user="u", app="demo", conversation_id=r.conversation_id)
        assert _texts(d.requests[-1]) == [("user", "q1"), ("assistant", "one"), ("user", "q2"), ("assistant", "two"),
                                          ("user", "q3")]
        d.reset(reply="four")
        await a.chat("q4", user="u", app="demo", conversation_id=r.conversation_id)
        assert _texts(d.requests[-1])[-3:] == [("user", "q3"), ("assistant", "three"), ("user", "q4")]
        assert len(_texts(d.requests[-1])) == 7
    finally:
        await a.aclose()
        await b.aclose()


async def test_pages_older_than_the_cached_run_come_from_the_store(sqlite_url):
    store = Store(sqlite_url)
    await store.migrate()
    cid = new_id()
    try:
        conv = {"id": cid, "app": "a", "user": "u", "engine": "e", "name": "", "inputs": {}, "remote": {},
                "last_seq": 0, "created_at": 1.0, "updated_at": 1.0, "deleted": False}
        for i in range(50):
            await store.begin_turn(cid, user_msg={"id": new_id(), "content": f"q{i}", "token_estimate": 3},
                                   assistant_msg={"id": new_id()}, new_conversation=conv if i == 0 else None)
        cache = HistoryCache(store)
        newest = await cache.history_newest(cid, before_seq=101, limit=10)
        assert [r["seq"] for r in newest] == list(range(100, 90, -1))
        # Served from the cache now, and an older page joins the cached run.
        older = await cache.history_newest(cid, before_seq=91, limit=20)
        assert [r["seq"] for r in older] == list(range(90, 70, -1))
        again = await cache.history_newest(cid, before_seq=101, limit=30)
        assert [r["seq"] for r in again] == list(range(100, 70, -1))
        direct = await store.history_newest(cid, before_seq=101, limit=30)
        assert [(r["seq"], r["role"], r["content"]) for r in again] == [(r["seq"], r["role"], r["content"]) for r in direct]
        # A turn appended out of order (a gap) is not trusted: the cache forgets the conversation.
        cache.append_turn(cid, [{"seq": 105, "role": "user", "content": "x", "parts": None, "status": "completed",
                                 "token_estimate": 1}])
        assert [r["seq"] for r in await cache.history_newest(cid, before_seq=101, limit=3)] == [100, 99, 98]
    finally:
        await store.close()
