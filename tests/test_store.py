"""The same store suite on SQLite and on the real PostgreSQL at 127.0.0.1:5432."""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import pytest

from threadline.errors import NotFoundError
from threadline.store import Store, new_id


@pytest.fixture
async def store(database_url):
    s = Store(database_url)
    await s.migrate()
    await s.migrate()  # idempotent
    yield s
    await s.close()


async def _turn(store: Store, cid: str, q: str, a: str, new: dict | None = None) -> tuple[str, str]:
    uid, aid = new_id(), new_id()
    await store.begin_turn(cid, user_msg={"id": uid, "content": q, "token_estimate": 5},
                           assistant_msg={"id": aid, "parent_id": uid, "task_id": new_id()}, new_conversation=new)
    await store.finish_turn(cid, aid, None, content=a, status="completed", token_estimate=3)
    return uid, aid


def _conv(cid: str, user: str = "alice", app: str = "a", t: float = 1000.0) -> dict:
    return {"id": cid, "app": app, "user": user, "engine": "e", "name": "", "inputs": {}, "remote": {}, "last_seq": 0,
            "created_at": t, "updated_at": t, "deleted": False}


async def test_turns_are_ordered_and_scoped(store):
    cid = new_id()
    await _turn(store, cid, "q1", "a1", _conv(cid))
    await _turn(store, cid, "q2", "a2")
    conv = await store.get_conversation(cid, app="a", user="alice")
    assert conv["last_seq"] == 4
    msgs, more = await store.list_messages(cid)
    assert [(m["seq"], m["role"], m["content"]) for m in msgs] == [
        (1, "user", "q1"), (2, "assistant", "a1"), (3, "user", "q2"), (4, "assistant", "a2")]
    assert not more
    with pytest.raises(NotFoundError):
        await store.get_conversation(cid, app="a", user="bob")
    with pytest.raises(NotFoundError):
        await store.get_conversation(cid, app="other", user="alice")
    with pytest.raises(NotFoundError):
        await store.get_conversation(new_id(), app="a", user="alice")


async def test_dify_style_turn_paging(store):
    cid = new_id()
    await _turn(store, cid, "q0", "a0", _conv(cid))
    for i in range(1, 5):
        await _turn(store, cid, f"q{i}", f"a{i}")
    page, more = await store.turns_page(cid, first_id=None, limit=2)
    assert [(u["content"], a["content"]) for u, a in page] == [("q3", "a3"), ("q4", "a4")] and more
    page2, more2 = await store.turns_page(cid, first_id=page[0][1]["id"], limit=2)
    assert [u["content"] for u, _ in page2] == ["q1", "q2"] and more2
    page3, more3 = await store.turns_page(cid, first_id=page2[0][1]["id"], limit=2)
    assert [u["content"] for u, _ in page3] == ["q0"] and not more3
    with pytest.raises(NotFoundError):
        await store.turns_page(cid, first_id=new_id(), limit=2)


async def test_conversation_keyset_paging_all_sorts(store):
    ids = []
    for i in range(7):
        cid = new_id()
        ids.append(cid)
        await store.create_conversation(app="a", user="alice", engine="e", conversation_id=cid, created_at=1000.0 + i)
        await store.set_conversation_fields(cid, updated_at=2000.0 - i)
    await store.create_conversation(app="a", user="bob", engine="e")
    for sort, expected in [("-created_at", ids[::-1]), ("created_at", ids), ("updated_at", ids[::-1]),
                           ("-updated_at", ids)]:
        seen, last, more = [], None, True
        while more:
            rows, more = await store.list_conversations(app="a", user="alice", last_id=last, limit=3, sort_by=sort)
            seen += [r["id"] for r in rows]
            last = rows[-1]["id"] if rows else None
        assert seen == expected, sort
    with pytest.raises(NotFoundError):
        await store.list_conversations(app="a", user="alice", last_id=new_id())


async def test_rename_delete_and_remote_binding(store):
    cid = new_id()
    await _turn(store, cid, "q", "a", _conv(cid))
    renamed = await store.rename_conversation(cid, app="a", user="alice", name="Trip")
    assert renamed["name"] == "Trip"
    await store.set_remote(cid, "dify", "remote-1", 2)
    assert (await store.get_conversation(cid, app="a", user="alice"))["remote"] == {"dify": {"id": "remote-1", "seq": 2}}
    with pytest.raises(NotFoundError):
        await store.delete_conversation(cid, app="a", user="bob")
    await store.delete_conversation(cid, app="a", user="alice")
    with pytest.raises(NotFoundError):
        await store.get_conversation(cid, app="a", user="alice")
    rows, _ = await store.list_conversations(app="a", user="alice")
    assert rows == []


async def test_turn_lock_is_exclusive_across_owners(store):
    cid = new_id()
    await store.create_conversation(app="a", user="alice", engine="e", conversation_id=cid)
    assert await store.try_lock(cid, "proc-1", 60)
    assert not await store.try_lock(cid, "proc-2", 60)
    await store.unlock(cid, "proc-1")
    assert await store.try_lock(cid, "proc-2", 60)
    # an expired lease (crashed process) can be taken over
    assert await store.try_lock(cid, "proc-2", -1)
    assert await store.try_lock(cid, "proc-3", 60)


async def test_partial_flush_and_cross_process_stop_flag(store):
    cid = new_id()
    uid, aid = new_id(), new_id()
    await store.begin_turn(cid, user_msg={"id": uid, "content": "q"}, assistant_msg={"id": aid, "task_id": "t-1"},
                           new_conversation=_conv(cid))
    assert await store.flush_partial(aid, "part", None) is False
    await store.request_stop((await store.message_by_task("t-1"))["id"])
    assert await store.flush_partial(aid, "partial", "why") is True
    m = await store.get_message(aid)
    assert (m["content"], m["reasoning"], m["status"]) == ("partial", "why", "streaming")


async def test_memory_files_keys(store):
    m = await store.add_memory(app="a", user="alice", text="likes tea", token_estimate=3)
    await store.add_memory(app="a", user="bob", text="likes coffee", token_estimate=3)
    assert [x["text"] for x in await store.list_memory(app="a", user="alice")] == ["likes tea"]
    with pytest.raises(NotFoundError):
        await store.delete_memory(m["id"], app="a", user="bob")
    await store.delete_memory(m["id"], app="a", user="alice")
    f = await store.add_file(app="a", user="alice", name="x.png", data=b"\x89PNG", mime_type="image/png", extension="png")
    assert (await store.get_file(f["id"], app="a", user="alice"))["data"] == b"\x89PNG"
    with pytest.raises(NotFoundError):
        await store.get_file(f["id"], app="a", user="bob")
    k = await store.add_key(app="a", key_hash="h" * 64, prefix="tl-abc")
    assert (await store.find_key("h" * 64))["app"] == "a"
    assert await store.revoke_key(k["id"]) == 1
    assert await store.find_key("h" * 64) is None


async def test_concurrent_writers_do_not_interleave_seq(store):
    cids = [new_id() for _ in range(5)]
    for c in cids:
        await store.create_conversation(app="a", user="alice", engine="e", conversation_id=c)

    async def run(c: str) -> None:
        for i in range(4):
            await _turn(store, c, f"q{i}", f"a{i}")

    await asyncio.gather(*(run(c) for c in cids))
    for c in cids:
        msgs, _ = await store.list_messages(c)
        assert [m["seq"] for m in msgs] == list(range(1, 9))


def test_ids_are_uuid7_ordered_by_time():
    import time
    import uuid

    from threadline.store import new_id

    before = time.time_ns() // 1_000_000
    ids = [new_id() for _ in range(2000)]
    after = time.time_ns() // 1_000_000
    parsed = [uuid.UUID(i) for i in ids]
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 and str(u) == i for u, i in zip(parsed, ids, strict=True))
    assert all(before <= u.int >> 80 <= after for u in parsed)  # the leading 48 bits are Unix milliseconds
    assert len(set(ids)) == len(ids)
    # Time-ordered to the 12 bits of sub-millisecond precision: consecutive ids (almost) never go back.
    backwards = sum(1 for a, b in itertools.pairwise(parsed) if (b.int >> 64) < (a.int >> 64))
    assert backwards <= 2  # only if the wall clock itself steps back


async def test_expired_memory_answers_at_once_and_is_read_again_once(database_url, monkeypatch):
    """Every stateless turn packs memory. When the cached copy expires, the turns in flight must not
    all stop to read it again: they get the cached copy, one read refreshes it in the background, and
    a change made through this process is never hidden by a read that began before it."""
    from threadline.store import store as store_module

    here, there = Store(database_url), Store(database_url)  # two server processes on one database
    await here.migrate()
    try:
        await here.add_memory(app="a", user="u", text="one", token_estimate=2)
        assert [m["text"] for m in await here.list_memory(app="a", user="u")] == ["one"]
        await there.add_memory(app="a", user="u", text="two", token_estimate=2)  # another process's change
        monkeypatch.setattr(store_module, "MEMORY_TTL", 0.0)
        here._memory_cache[("a", "u")] = (0.0, here._memory_cache[("a", "u")][1])  # expired
        reads = 0
        real_read = here._read_memory

        async def counting(key):  # type: ignore[no-untyped-def]
            nonlocal reads
            reads += 1
            return await real_read(key)

        monkeypatch.setattr(here, "_read_memory", counting)
        answers = await asyncio.gather(*(here.list_memory(app="a", user="u") for _ in range(16)))
        assert all([m["text"] for m in a] == ["one"] for a in answers)  # the cached copy, at once
        assert reads == 1
        await asyncio.sleep(0.2)
        assert [m["text"] for m in await here.list_memory(app="a", user="u")] == ["one", "two"]
        # A local change while a read is in flight: the read (it saw the older rows) must not put
        # them back in the cache. The read is held between its query and its end until the change is made.
        gate, read_done = asyncio.Event(), asyncio.Event()
        real_engine = here.engine

        class HeldConnection:
            def __init__(self, conn):  # type: ignore[no-untyped-def]
                self.conn = conn

            async def execute(self, *args):  # type: ignore[no-untyped-def]
                result = await self.conn.execute(*args)
                read_done.set()
                await gate.wait()
                return result

        class HeldEngine:
            def begin(self):  # type: ignore[no-untyped-def]
                return real_engine.begin()

            @contextlib.asynccontextmanager
            async def connect(self):  # type: ignore[no-untyped-def]
                async with real_engine.connect() as conn:
                    yield HeldConnection(conn)

        monkeypatch.setattr(here, "engine", HeldEngine())
        here._memory_cache[("a", "u")] = (0.0, here._memory_cache[("a", "u")][1])
        await here.list_memory(app="a", user="u")  # starts the background read
        await read_done.wait()  # it has read ["one", "two"]
        await here.add_memory(app="a", user="u", text="three", token_estimate=2)
        gate.set()
        await asyncio.sleep(0.05)
        monkeypatch.setattr(here, "engine", real_engine)
        assert [m["text"] for m in await here.list_memory(app="a", user="u")] == ["one", "two", "three"]
    finally:
        await here.close()
        await there.close()
