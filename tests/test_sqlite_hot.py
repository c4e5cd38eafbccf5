"""The SQLite hot path (store/sqlite_hot.py): the rows it writes are the rows the async path writes, it
never makes the event loop wait on another process's lock, and it keeps the WAL checkpointed."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from threadline.errors import NotFoundError
from threadline.store import Store, new_id, sqlite_hot


@pytest.fixture
async def store(tmp_path: Path):
    s = Store(f"sqlite+aiosqlite:///{tmp_path}/t.db")
    await s.migrate()
    assert s.hot is not None
    yield s
    await s.close()


def _size(path: str) -> int:
    return Path(path).stat().st_size


def _conv(cid: str) -> dict:
    return {"id": cid, "app": "a", "user": "alice", "engine": "e", "name": "", "inputs": {"k": [1, "два"]},
            "remote": {}, "last_seq": 0, "created_at": 1000.0, "updated_at": 1000.0, "deleted": False}


async def _full_turn(store: Store, cid: str, *, first: bool) -> tuple[str, str, dict]:
    """A turn as the gateway runs it, with every kind of column set: JSON, None-valued JSON, floats."""
    uid, aid = new_id(), new_id()
    user_msg = {"id": uid, "content": "q ✓", "parts": [{"type": "image", "url": "https://x/y.png"}],
                "engine": "e", "model": "m", "token_estimate": 5, "inputs": None}
    asst_msg = {"id": aid, "parent_id": uid, "engine": "e", "model": "m", "task_id": new_id()}
    if first:
        await store.begin_turn(cid, user_msg=user_msg, assistant_msg=asst_msg, new_conversation=_conv(cid),
                               lock=("me", 900.0))
        conv = await store.get_conversation(cid, app="a", user="alice")
    else:
        conv, _, _ = await store.claim_turn(cid, app="a", user="alice", owner="me", ttl=900.0,
                                            user_msg=user_msg, assistant_msg=asst_msg)
    await store.finish_turn(cid, aid, "me", conversation_values={"engine": "e", "remote": {"dify": {"id": "r", "seq": 2}}},
                            content="a ✓", reasoning=None, status="completed", usage={"prompt_tokens": 3},
                            price={"total_price": "0.1"}, latency=0.25, error=None, token_estimate=3, remote_id=None)
    return uid, aid, conv


def _comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("id", "conversation_id", "parent_id", "task_id", "created_at",
                                                      "updated_at", "lock_until")}


async def test_hot_rows_read_back_like_rows_written_by_the_async_path(store):
    hot_cid, slow_cid = new_id(), new_id()
    hot = [await _full_turn(store, hot_cid, first=True), await _full_turn(store, hot_cid, first=False)]
    store_hot, store.hot = store.hot, None  # the async path, as used when the hot path is busy
    try:
        slow = [await _full_turn(store, slow_cid, first=True), await _full_turn(store, slow_cid, first=False)]
    finally:
        store.hot = store_hot
    # The claimed conversation handed to the gateway has the same shape and types either way.
    assert _comparable({**hot[1][2], "id": None}) == _comparable({**slow[1][2], "id": None})
    assert hot[1][2]["inputs"] == {"k": [1, "два"]} and hot[1][2]["deleted"] is False
    for (hu, ha, _), (su, sa, _) in zip(hot, slow, strict=True):
        for h, s in ((hu, su), (ha, sa)):
            hm, sm = await store.get_message(h), await store.get_message(s)
            assert _comparable(hm) == _comparable(sm)
    assert (await store.get_message(hot[1][0]))["parts"] == [{"type": "image", "url": "https://x/y.png"}]
    # Python None in a JSON column is stored as JSON null by both paths, not as SQL NULL.
    raw = sqlite3.connect(store._sqlite_path)
    kinds = raw.execute("SELECT DISTINCT typeof(inputs), typeof(error) FROM messages").fetchall()
    raw.close()
    assert kinds == [("text", "text")]
    hc = await store.get_conversation(hot_cid, app="a", user="alice")
    sc = await store.get_conversation(slow_cid, app="a", user="alice")
    assert hc["remote"] == sc["remote"] == {"dify": {"id": "r", "seq": 2}}
    assert hc["lock_owner"] is None and hc["last_seq"] == sc["last_seq"] == 4


async def test_hot_claim_keeps_the_lease_and_ownership_rules(store):
    cid = new_id()
    await _full_turn(store, cid, first=True)
    msg = {"id": new_id(), "content": "q"}
    first = await store.claim_turn(cid, app="a", user="alice", owner="p1", ttl=900.0, user_msg=msg,
                                   assistant_msg={"id": new_id()})
    assert first is not None and first[1:] == (3, 4)
    # Another process's turn is running: not claimable, and nothing was written.
    assert await store.claim_turn(cid, app="a", user="alice", owner="p2", ttl=900.0,
                                  user_msg={"id": new_id(), "content": "q"}, assistant_msg={"id": new_id()}) is None
    assert (await store.get_conversation(cid, app="a", user="alice"))["last_seq"] == 4
    with pytest.raises(NotFoundError):
        await store.claim_turn(cid, app="a", user="bob", owner="p2", ttl=900.0,
                               user_msg={"id": new_id(), "content": "q"}, assistant_msg={"id": new_id()})


@pytest.mark.parametrize("hot_wait", [1.0, 0.05], ids=["polls-until-free", "falls-back-to-the-async-path"])
async def test_a_write_lock_held_by_another_process_never_blocks_the_event_loop(store, monkeypatch, hot_wait):
    monkeypatch.setattr(sqlite_hot, "HOT_WAIT", hot_wait)
    cid = new_id()
    await _full_turn(store, cid, first=True)
    async_writes = 0
    real_tx = store._tx

    def counting_tx():  # type: ignore[no-untyped-def]
        nonlocal async_writes
        async_writes += 1
        return real_tx()

    monkeypatch.setattr(store, "_tx", counting_tx)
    other = sqlite3.connect(store._sqlite_path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # as another Threadline process mid-write would
    release = threading.Timer(0.4, lambda: other.execute("COMMIT"))
    release.start()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    t = asyncio.create_task(ticker())
    started = time.monotonic()
    try:
        claimed = await store.claim_turn(cid, app="a", user="alice", owner="me", ttl=900.0,
                                         user_msg={"id": new_id(), "content": "waited"}, assistant_msg={"id": new_id()})
    finally:
        t.cancel()
        release.join()
        other.close()
    waited = time.monotonic() - started
    assert claimed is not None and claimed[1] == 3
    assert waited >= 0.35  # it really had to wait for the other writer ...
    assert ticks >= 15  # ... and the loop kept running meanwhile
    assert async_writes == (0 if hot_wait > 0.4 else 1)
    msgs, _ = await store.list_messages(cid)
    assert [m["content"] for m in msgs][-2:] == ["waited", ""]


async def test_the_wal_is_checkpointed_off_the_hot_connection(store, monkeypatch):
    monkeypatch.setattr(sqlite_hot, "CHECKPOINT_EVERY", 20)
    monkeypatch.setattr(sqlite_hot, "WAL_RESET_BYTES", 256 * 1024)
    cid = new_id()
    await _full_turn(store, cid, first=True)
    wal = store._sqlite_path + "-wal"
    sizes = []
    for _ in range(10):
        for _ in range(20):
            await _full_turn(store, cid, first=False)
        await asyncio.sleep(0.05)  # let the checkpoint thread run
        sizes.append(_size(wal))
    # Without checkpoints the WAL would grow by every commit (400 commits here); with them it is
    # rewound and stays near the size of one checkpoint interval.
    assert max(sizes[3:]) <= max(sizes[:3]) * 1.5
    msgs, _ = await store.list_messages(cid, limit=1000)
    assert len(msgs) == 2 + 200 * 2


async def test_concurrent_turns_commit_together_and_each_gets_its_own_answer(store, monkeypatch):
    cids = [new_id() for _ in range(12)]
    for cid in cids:
        await _full_turn(store, cid, first=True)
    commits = 0
    real_commit = store.hot._commit

    def counting(writes: int) -> None:
        nonlocal commits
        commits += 1
        real_commit(writes)

    monkeypatch.setattr(store.hot, "_commit", counting)
    claims = await asyncio.gather(*(
        store.claim_turn(cid, app="a", user="alice", owner="me", ttl=900.0, user_msg={"id": new_id(), "content": cid},
                         assistant_msg={"id": new_id()}) for cid in cids))
    assert commits == 1  # twelve claims, one transaction
    assert [c[0]["id"] for c in claims] == cids and all(c[1:] == (3, 4) for c in claims)
    for cid in cids:
        msgs, _ = await store.list_messages(cid)
        assert [m["content"] for m in msgs][2] == cid


async def test_a_failing_write_fails_alone_and_its_group_still_commits(store):
    cids = [new_id() for _ in range(3)]
    for cid in cids:
        await _full_turn(store, cid, first=True)
    taken = (await store.list_messages(cids[0]))[0][0]["id"]  # a message id that exists already

    def claim(cid: str, user_id: str):  # type: ignore[no-untyped-def]
        return store.claim_turn(cid, app="a", user="alice", owner="me", ttl=900.0,
                                user_msg={"id": user_id, "content": "new"}, assistant_msg={"id": new_id()})

    ok1, bad, ok2 = await asyncio.gather(claim(cids[0], new_id()), claim(cids[1], taken), claim(cids[2], new_id()),
                                         return_exceptions=True)
    assert isinstance(bad, sqlite3.IntegrityError)
    assert ok1[1] == 3 and ok2[1] == 3
    assert len((await store.list_messages(cids[1]))[0]) == 2  # nothing of the failed claim was kept
    assert (await store.get_conversation(cids[1], app="a", user="alice"))["last_seq"] == 2
    assert len((await store.list_messages(cids[2]))[0]) == 4


async def test_a_write_whose_caller_left_before_the_group_ran_is_skipped(store):
    cid = new_id()
    await _full_turn(store, cid, first=True)
    task = asyncio.create_task(store.claim_turn(cid, app="a", user="alice", owner="me", ttl=900.0,
                                                user_msg={"id": new_id(), "content": "never"},
                                                assistant_msg={"id": new_id()}))
    await asyncio.sleep(0)  # queued, the group not yet run
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.01)
    msgs, _ = await store.list_messages(cid)
    assert "never" not in [m["content"] for m in msgs]
    assert (await store.get_conversation(cid, app="a", user="alice"))["last_seq"] == 2


_WRITER = """
import asyncio, sys
from threadline.store import Store, new_id, sqlite_hot
sqlite_hot.CHECKPOINT_EVERY = 20
sqlite_hot.WAL_RESET_BYTES = 256 * 1024

async def main(url, turns):
    store = Store(url)
    await store.migrate()
    cid = new_id()
    conv = {"id": cid, "app": "a", "user": "u", "engine": "e", "name": "", "inputs": {}, "remote": {}, "last_seq": 0,
            "created_at": 1.0, "updated_at": 1.0, "deleted": False}
    for i in range(turns):
        uid, aid = new_id(), new_id()
        if i == 0:
            await store.begin_turn(cid, user_msg={"id": uid, "content": "q"}, assistant_msg={"id": aid},
                                   new_conversation=conv, lock=("me", 900.0))
        else:
            await store.claim_turn(cid, app="a", user="u", owner="me", ttl=900.0, user_msg={"id": uid, "content": "q"},
                                   assistant_msg={"id": aid})
        await store.finish_turn(cid, aid, "me", content="a " * 40, status="completed", token_estimate=3)
        await asyncio.sleep(0.001)  # as a real turn waits on its engine between its two writes and the next turn
    await store.close()

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def test_the_wal_starts_over_while_several_processes_write(tmp_path: Path):
    """Two server processes writing all the time: the WAL must still start over now and then (a
    catch-up inside one process always lost the race to the other one's next write)."""
    db = tmp_path / "shared.db"
    url = f"sqlite+aiosqlite:///{db}"
    asyncio.run(_migrate(url))
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, url, "1500"]) for _ in range(2)]
    sizes = []
    try:
        while any(w.poll() is None for w in writers):
            with contextlib.suppress(FileNotFoundError):
                sizes.append(Path(f"{db}-wal").stat().st_size)
            time.sleep(0.02)
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
    assert all(w.returncode == 0 for w in writers)
    # Without restarts the WAL holds every frame of these 6,000 writes: about 70 MB (measured). A WAL
    # that starts over keeps its file at the size it reached between two restarts.
    assert len(sizes) > 20
    assert max(sizes) < 8 * 1024 * 1024, max(sizes)


async def _migrate(url: str) -> None:
    s = Store(url)
    await s.migrate()
    await s.close()


async def test_hot_keyed_reads_return_what_the_async_path_returns(store):
    """get_message / get_conversation / conversation_in_app read on the hot connection (no thread
    hop): the same dicts, same types, as SQLAlchemy's, and the same not-found rules."""
    cid = new_id()
    uid, aid, _ = await _full_turn(store, cid, first=True)
    await store.update_message(aid, response={"model": "demo", "deleted": False}, feedback={"rating": "like"})
    hot = {"q": await store.get_message(uid), "a": await store.get_message(aid),
           "c": await store.get_conversation(cid, app="a", user="alice"),
           "o": await store.conversation_in_app(cid, app="a"), "none": await store.get_message(new_id()),
           "w": await store.message_with_owner(aid)}
    assert hot["w"]["_app"] == "a" and hot["w"]["_user"] == "alice"
    reads = []
    real = store.hot.read_message

    def counting(mid):
        reads.append(mid)
        return real(mid)

    store.hot.read_message = counting  # type: ignore[method-assign]
    assert await store.get_message(aid) == hot["a"] and reads == [aid]  # served by the hot connection
    store.hot.read_message = real  # type: ignore[method-assign]
    store_hot, store.hot = store.hot, None
    try:
        slow = {"q": await store.get_message(uid), "a": await store.get_message(aid),
                "c": await store.get_conversation(cid, app="a", user="alice"),
                "o": await store.conversation_in_app(cid, app="a"), "none": await store.get_message(new_id()),
                "w": await store.message_with_owner(aid)}
    finally:
        store.hot = store_hot
    assert hot == slow
    assert hot["a"]["response"] == {"model": "demo", "deleted": False} and hot["a"]["stop_requested"] is False
    assert type(hot["a"]["created_at"]) is float and hot["c"]["deleted"] is False and hot["c"]["forked"] is False
    for wrong in ({"app": "b", "user": "alice"}, {"app": "a", "user": "bob"}, {"app": None, "user": "bob"}):
        with pytest.raises(NotFoundError):
            await store.get_conversation(cid, **wrong)
    with pytest.raises(NotFoundError):
        await store.conversation_in_app(cid, app="b")
    await store.delete_conversation(cid, app="a", user="alice")
    with pytest.raises(NotFoundError):
        await store.get_conversation(cid, app="a", user="alice")
    with pytest.raises(NotFoundError):
        await store.conversation_in_app(cid, app="a")
    assert await store.message_with_owner(aid) is None  # a deleted conversation's messages have no owner
