"""The same store suite on SQLite and on the real PostgreSQL at 127.0.0.1:5432."""

from __future__ import annotations

import asyncio

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
