"""The in-process history cache must never change what a stateless engine is sent: two gateways on
one database (as two server processes) alternate turns of one conversation, and each request still
carries the full, current history."""

from __future__ import annotations

import random

import orjson

from tests.conftest import engines_for
from threadline import AsyncThreadline
from threadline.config import EngineConfig
from threadline.context import pack
from threadline.engines.base import EngineRequest
from threadline.engines.openai_compat import OpenAICompatEngine
from threadline.history_cache import HistoryCache
from threadline.messages import ChatMessage
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


async def test_the_cached_window_packs_exactly_what_walking_the_rows_packs(sqlite_url):
    """Random histories (failed empty answers, images, repeated roles, uneven token counts) and random
    budgets: packing through the cache's bisected window must equal packing row by row from the store."""
    rng = random.Random(7)
    store = Store(sqlite_url)
    await store.migrate()
    cache = HistoryCache(store)
    windows = 0
    real_fitting = cache.newest_fitting

    async def counting(*args, **kwargs):
        nonlocal windows
        win = await real_fitting(*args, **kwargs)
        windows += win is not None
        return win

    cache.newest_fitting = counting  # type: ignore[method-assign]
    engines = [OpenAICompatEngine(EngineConfig(name="o", kind="openai", model="m", base_url="http://x/v1")),
               OpenAICompatEngine(EngineConfig(name="r1", kind="openai", model="deepseek-ai/deepseek-r1",
                                               base_url="http://x/v1", profile="deepseek-r1"))]
    assert engines[1].profile.system == "fold"
    encoded = 0
    try:
        for conv_no in range(6):
            cid = new_id()
            conv = {"id": cid, "app": "a", "user": "u", "engine": "e", "name": "", "inputs": {}, "remote": {},
                    "last_seq": 0, "created_at": 1.0, "updated_at": 1.0, "deleted": False}
            odd_rate = [0.0, 0.0, 0.02, 0.05, 0.2, 0.0][conv_no]
            for i in range(rng.randint(20, 160)):
                q = f"q{i} " + "w " * rng.randint(0, 30)
                parts = [{"type": "image", "url": "https://img/x.png"}] if rng.random() < odd_rate else None
                uid, aid = new_id(), new_id()
                await store.begin_turn(cid, user_msg={"id": uid, "content": q, "parts": parts,
                                                      "token_estimate": rng.randint(1, 40)},
                                       assistant_msg={"id": aid, "parent_id": uid},
                                       new_conversation=conv if i == 0 else None)
                answer = "" if rng.random() < odd_rate else f"a{i} " + "w " * rng.randint(0, 30)
                await store.finish_turn(cid, aid, None, content=answer, status="completed" if answer else "failed",
                                        token_estimate=rng.randint(0, 60))
            last = (await store.get_conversation(cid, app="a", user="u"))["last_seq"]
            for _ in range(25):
                before = rng.choice([last + 1, last + 1, rng.randint(2, last + 1)])
                budget = rng.choice([0, 5, rng.randint(10, 400), rng.randint(400, 4000), 100_000])
                args = {"before_seq": before, "system_modules": ["sys"], "memories": [("m", 2)],
                        "new_message": ChatMessage("user", "new"), "new_message_tokens": 3, "budget": budget}
                await pack(cache, cid, **args)  # the first call may fill the cache
                fast = await pack(cache, cid, **args)
                slow = await pack(store, cid, **args)
                assert [(m.role, m.text, [i.url for i in m.images]) for m in fast.messages] == \
                       [(m.role, m.text, [i.url for i in m.images]) for m in slow.messages]
                assert (fast.estimated_tokens, fast.history_used, fast.history_dropped) == \
                       (slow.estimated_tokens, slow.history_used, slow.history_dropped)
                # What an engine sends is the same bytes, pre-encoded history or not, folded system or not.
                for eng in engines:
                    sent = orjson.dumps(eng.build_body(EngineRequest(messages=fast.messages, system=fast.system,
                                                                     openai_history=fast.openai_history)))
                    assert sent == orjson.dumps(eng.build_body(EngineRequest(messages=list(slow.messages),
                                                                             system=slow.system)))
                    encoded += len(fast.openai_history)
        assert windows > 100  # the bisected window really answered most of these
        assert encoded > 1000  # and handed over encoded history
    finally:
        await store.close()


async def test_cached_history_is_data_the_garbage_collector_never_walks(sqlite_url):
    """A full collection walks every tracked object, and the cache holds thousands of messages for as
    long as the process lives: rows and their encoded messages must hold no tracked object, trimming a
    long run must keep the encodings, and the window must still be the newest history."""
    import gc

    from threadline import history_cache

    store = Store(sqlite_url)
    await store.migrate()
    cache = HistoryCache(store)
    cid = new_id()
    try:
        conv = {"id": cid, "app": "a", "user": "u", "engine": "e", "name": "", "inputs": {}, "remote": {},
                "last_seq": 0, "created_at": 1.0, "updated_at": 1.0, "deleted": False}
        await store.begin_turn(cid, user_msg={"id": new_id(), "content": "q0", "token_estimate": 3},
                               assistant_msg={"id": new_id()}, new_conversation=conv)
        await cache.history_newest(cid, before_seq=3, limit=10)
        run = cache._runs[cid]
        seq = 2
        for i in range(history_cache.MAX_ROWS):  # appended the way the gateway appends finished turns
            cache.append_turn(cid, [
                {"seq": seq + 1, "role": "user", "content": f"q{i}", "parts": None, "reasoning": None,
                 "status": "completed", "token_estimate": 2, "engine": "e"},
                {"seq": seq + 2, "role": "assistant", "content": f"a{i}", "parts": None, "reasoning": None,
                 "status": "completed", "token_estimate": 2, "engine": "e"}])
            seq += 2
            if i == history_cache.MAX_ROWS // 2:
                kept = run.wires[-10:]
        gc.collect()
        assert not any(gc.is_tracked(r) for r in run.rows)
        assert all(w is not None and not gc.is_tracked(w) for w in run.wires[1:])  # row 1 is the empty answer
        assert len(run.rows) <= history_cache.MAX_ROWS + history_cache.MAX_ROWS // 4  # it was trimmed
        assert all(any(k is w for w in run.wires) for k in kept)  # trimming kept the encodings
        win = await cache.newest_fitting(cid, before_seq=seq + 1, budget=40)
        last = history_cache.MAX_ROWS - 1
        assert [r["content"] for r in win.rows][-2:] == [f"q{last}", f"a{last}"]
        assert [orjson.loads(orjson.dumps(w)) for w in win.wires][-2:] == [
            {"role": "user", "content": f"q{last}"}, {"role": "assistant", "content": f"a{last}"}]
    finally:
        await store.close()


async def test_a_burst_of_short_chats_does_not_evict_a_long_conversation_and_memory_stays_bounded(sqlite_url,
                                                                                                   monkeypatch):
    from threadline import history_cache

    store = Store(sqlite_url)
    await store.migrate()
    cache = HistoryCache(store)

    def turn(seq: int, text: str) -> list[dict]:
        return [{"seq": seq, "role": "user", "content": text, "parts": None, "reasoning": None, "status": "completed",
                 "token_estimate": 3, "engine": "e"},
                {"seq": seq + 1, "role": "assistant", "content": text * 3, "parts": None, "reasoning": "r",
                 "status": "completed", "token_estimate": 9, "engine": "e"}]

    def accounted() -> int:
        assert cache.size == sum(r.counted for r in cache._runs.values())
        assert all(r.counted == r.size == history_cache.RUN_BYTES + sum(map(history_cache._row_bytes, r.rows))
                   for r in cache._runs.values())
        return cache.size

    try:
        long_id = new_id()
        for i in range(150):
            cache.append_turn(long_id, turn(2 * i + 1, f"long question {i}"))
        for _ in range(2000):  # one-turn chats, as an OpenAI-style client without history makes them
            cache.append_turn(new_id(), turn(1, "hi"))
        assert long_id in cache._runs and len(cache._runs[long_id].rows) == 300
        assert accounted() > 0
        monkeypatch.setattr(history_cache, "MAX_BYTES", 200_000)
        for _ in range(50):
            cache.append_turn(new_id(), turn(1, "hello there"))
        assert accounted() <= 200_000
        assert long_id not in cache._runs  # now the least recently used had to go
        cache.forget(next(iter(cache._runs)))
        accounted()
    finally:
        await store.close()


async def test_a_run_far_behind_is_read_afresh_not_caught_up_row_by_row(sqlite_url):
    """When a conversation went on in another process for a long time, catching the cached run up
    would read every row of the gap; packing needs only the newest that fit, read newest first."""
    from threadline import history_cache

    store = Store(sqlite_url)
    await store.migrate()
    cache = HistoryCache(store)
    cid = new_id()
    conv = {"id": cid, "app": "a", "user": "u", "engine": "e", "name": "", "inputs": {}, "remote": {},
            "last_seq": 0, "created_at": 1.0, "updated_at": 1.0, "deleted": False}

    async def turns(first: int, n: int) -> None:
        for i in range(first, first + n):
            uid, aid = new_id(), new_id()
            await store.begin_turn(cid, user_msg={"id": uid, "content": f"q{i}", "token_estimate": 5},
                                   assistant_msg={"id": aid, "parent_id": uid},
                                   new_conversation=conv if i == 0 else None)
            await store.finish_turn(cid, aid, None, content=f"a{i}", status="completed", token_estimate=5)

    read: list[int] = []
    real_range, real_newest = store.history_range, store.history_newest

    async def counting_range(*a, **k):  # type: ignore[no-untyped-def]
        rows = await real_range(*a, **k)
        read.append(len(rows))
        return rows

    async def counting_newest(*a, **k):  # type: ignore[no-untyped-def]
        rows = await real_newest(*a, **k)
        read.append(len(rows))
        return rows

    store.history_range, store.history_newest = counting_range, counting_newest  # type: ignore[method-assign]
    try:
        await turns(0, 5)
        args = {"system_modules": [], "memories": [], "new_message": ChatMessage("user", "new"),
                "new_message_tokens": 3, "budget": 200}
        await pack(cache, cid, before_seq=11, **args)  # cached now
        await turns(5, 600)  # another process went on: 1,200 rows the cache has not seen
        read.clear()
        packed = await pack(cache, cid, before_seq=1211, **args)
        assert packed.history_used == 39 and [m.text for m in packed.messages][-2:] == ["a604", "new"]
        assert sum(read) < 2 * 64 + history_cache.MAX_GAP  # pages of the newest rows, not the 1,200-row gap
        slow = await pack(store, cid, before_seq=1211, **args)
        assert [m.text for m in packed.messages] == [m.text for m in slow.messages]
    finally:
        await store.close()


def test_the_cache_estimate_is_not_below_what_it_really_holds():
    """The cache's bound is only as good as its estimate: measured with tracemalloc, one-turn chats
    and a long conversation (distinct texts, as real ones are) must cost no more than estimated."""
    import tracemalloc

    def turn(seq: int, text: str) -> list[dict]:
        return [{"seq": seq, "role": "user", "content": f"{text} q{seq}", "parts": None, "reasoning": None,
                 "status": "completed", "token_estimate": 8, "engine": "e"},
                {"seq": seq + 1, "role": "assistant", "content": f"{text} a{seq}", "parts": None,
                 "reasoning": None, "status": "completed", "token_estimate": 12, "engine": "e"}]

    for text in ("short", "long " * 600):
        ids = [new_id() for _ in range(2000)]
        long_id = new_id()
        cache = HistoryCache(store=None)  # type: ignore[arg-type]
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for cid in ids:  # rows made here, as the gateway makes them for the cache
                cache.append_turn(cid, turn(1, text))
            for i in range(1000):
                cache.append_turn(long_id, turn(2 * i + 1, text))
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert len(cache._runs) == 2001
        assert held <= cache.size, (text[:5], held, cache.size)
