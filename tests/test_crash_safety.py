"""Crash and cancellation safety, in one process and deterministic: turn leases that are renewed while
a turn lives and taken over once they expire, answers a dead turn left `streaming` closed as failed
(`interrupted`) with their text, and writes that a cancelled caller cannot stop halfway.

The real thing (`kill -9` of `threadline serve`) is tests/test_kill9.py."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import engines_for
from tests.doubles.live import LiveServer
from threadline import AsyncThreadline, ConversationBusyError, TextDelta
from threadline import gateway as gateway_mod
from threadline.store import Store, new_id

APPS = {"demo": {"engine": "acc", "system": ["You are terse."]}}


def _tl(url: str, oai_url: str) -> AsyncThreadline:
    return AsyncThreadline(database_url=url, engines=engines_for(oai_url), apps=APPS, include_presets=False)


async def _left_streaming(store: Store, *, owner: str | None, ttl: float, user: str = "u", app: str = "demo",
                          partial: str = "the part that came") -> tuple[str, str, str]:
    """A conversation as a turn leaves it when its process dies mid-answer: the user message, the
    answer `streaming` with the partial text flushed so far, and the turn's lease (`ttl` seconds
    from now; negative: already expired) still naming the dead process."""
    cid, uid, aid = new_id(), new_id(), new_id()
    now = time.time()
    conv = {"id": cid, "app": app, "user": user, "engine": "acc", "name": "", "inputs": {}, "remote": {},
            "last_seq": 0, "created_at": now, "updated_at": now, "deleted": False}
    await store.begin_turn(cid, user_msg={"id": uid, "content": "the question"},
                           assistant_msg={"id": aid, "task_id": new_id()}, new_conversation=conv,
                           lock=(owner, ttl) if owner else None)
    await store.flush_partial(aid, partial, None)
    return cid, uid, aid


LATER_COLUMNS = [("messages", "finish_reason", "VARCHAR(32)"),
                 ("conversations", "forked", "BOOLEAN NOT NULL DEFAULT false"),
                 ("conversations", "history_hash", "VARCHAR(48)"),
                 ("messages", "response", "JSON"), ("conversations", "meta", "JSON"),
                 ("conversations", "scratch", "BOOLEAN NOT NULL DEFAULT false")]  # added by migrations after 0003


def _interrupted(msg: dict[str, Any] | None, partial: str = "the part that came") -> bool:
    return (msg is not None and msg["status"] == "failed" and (msg["error"] or {}).get("code") == "interrupted"
            and msg["content"] == partial)


@contextlib.contextmanager
def _held_in_the_driver(marker: str) -> Iterator[tuple[asyncio.Event, threading.Event]]:
    """Hold the first SQLite statement containing `marker` in aiosqlite's worker thread, just before
    it runs: `hit` is set once it is held there (its caller is suspended waiting for it), and it runs
    when `release` is set. This is the moment a cancelled caller interrupts a statement."""
    import aiosqlite.core

    loop = asyncio.get_running_loop()
    hit, release = asyncio.Event(), threading.Event()
    real = aiosqlite.core.Connection._execute
    armed = [True]

    async def _execute(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if armed[0] and args and isinstance(args[0], str) and marker in args[0]:
            armed[0] = False

            def held(*a: Any, **kw: Any) -> Any:
                loop.call_soon_threadsafe(hit.set)
                release.wait(30)
                return fn(*a, **kw)

            return await real(self, held, *args, **kwargs)
        return await real(self, fn, *args, **kwargs)

    aiosqlite.core.Connection._execute = _execute
    try:
        yield hit, release
    finally:
        release.set()
        aiosqlite.core.Connection._execute = real


def _writable(path: str) -> bool:
    """Another connection (as another process would) can take SQLite's write lock."""
    other = sqlite3.connect(path, timeout=2, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        other.close()


def _async_path(store: Store) -> None:
    """Send every SQLite write down the SQLAlchemy/aiosqlite path, as when the hot path gives up
    because another process holds the write lock."""
    assert store.hot is not None
    store.hot.close()
    store.hot = None


# ---- finding 8: a cancelled write never leaves the database locked -----------------------------------


async def test_a_settled_write_runs_to_its_end_and_the_cancellation_follows():
    from threadline.store import settle

    release = asyncio.Event()
    seen: list[object] = []

    async def write() -> int:
        await release.wait()
        return 42

    async def caller() -> None:
        seen.append(await settle(write()))
        await asyncio.sleep(10)  # the cancellation lands here, at the next suspension
        seen.append("never")

    task = asyncio.create_task(caller())
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.sleep(0.05)
    assert not task.done()  # still waiting for its write
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == [42]

    async def timed() -> None:  # a deadline still ends as TimeoutError, not as a stray cancellation
        async with asyncio.timeout(0.05):
            assert await settle(asyncio.sleep(0.2, "done")) == "done"
            await asyncio.sleep(10)

    with pytest.raises(TimeoutError):
        await timed()


@pytest.mark.parametrize("write", ["flush_partial", "claim_turn"])
async def test_a_write_cancelled_mid_statement_completes_and_leaves_the_database_writable(tmp_path, write):
    store = Store(f"sqlite+aiosqlite:///{tmp_path}/t.db")
    await store.migrate()
    try:
        cid, _, aid = await _left_streaming(store, owner=None, ttl=0, partial="")
        await store.finish_turn(cid, aid, None, content="", status="completed")
        _async_path(store)
        if write == "flush_partial":
            marker, call = "RETURNING stop_requested", store.flush_partial(aid, "partial", None)
        else:
            marker = "last_seq"
            call = store.claim_turn(cid, app="demo", user="u", owner="me", ttl=30, user_msg={"id": new_id(),
                                    "content": "q2"}, assistant_msg={"id": new_id()})
        with _held_in_the_driver(marker) as (hit, release):
            task = asyncio.create_task(call)
            await asyncio.wait_for(hit.wait(), 10)
            task.cancel()  # the client went away while the statement was on its way
            release.set()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 10)
        assert _writable(store._sqlite_path)  # no connection was left holding the write lock
        await asyncio.wait_for(store.update_message(aid, feedback={"rating": "like"}), 10)
        # The write itself was not cut in half: it ran to its end.
        if write == "flush_partial":
            assert (await store.get_message(aid))["content"] == "partial"
        else:
            msgs, _ = await store.list_messages(cid)
            assert [(m["role"], m["content"]) for m in msgs][2:] == [("user", "q2"), ("assistant", "")]
            assert (await store.get_conversation(cid, app="demo", user="u"))["last_seq"] == 4
    finally:
        await asyncio.wait_for(store.close(), 10)


async def test_an_answers_final_write_is_never_skipped_when_its_caller_leaves(database_url):
    """Other hot-path writes are skipped whole if their caller leaves before their group runs; the
    final write of an answer is not: it is what keeps the answer and frees the conversation."""
    store = Store(database_url)
    await store.migrate()
    try:
        cid, _, aid = await _left_streaming(store, owner="me", ttl=30)
        task = asyncio.create_task(store.finish_turn(cid, aid, "me", content="all of it", status="stopped"))
        await asyncio.sleep(0)  # queued, its group not yet run
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        msg = await store.get_message(aid)
        assert (msg["status"], msg["content"]) == ("stopped", "all of it")
        assert (await store.get_conversation(cid, app="demo", user="u"))["lock_owner"] is None
    finally:
        await store.close()


async def test_a_connection_is_never_returned_to_the_pool_inside_a_transaction(database_url):
    """A connection handed back with a transaction its user could not end (here: opened behind
    SQLAlchemy's back) is rolled back on its way into the pool, not kept open with its locks."""
    import asyncpg

    store = Store(database_url)
    await store.migrate()
    try:
        cid, _, aid = await _left_streaming(store, owner=None, ttl=0)
        async with store.engine.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            if not store.is_sqlite:  # asyncpg commits each statement unless told otherwise (sqlite3 begins itself)
                await raw.execute("BEGIN")
            await raw.execute(f"UPDATE messages SET content = 'uncommitted' WHERE id = '{aid}'")
        if store.is_sqlite:
            assert _writable(store._sqlite_path)
        else:
            other = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
            try:
                await other.execute("SET lock_timeout = '2s'")
                await other.execute("UPDATE messages SET feedback = NULL WHERE id = $1", aid)  # the row is not locked
            finally:
                await other.close()
        assert (await store.get_message(aid))["content"] == "the part that came"
    finally:
        await store.close()


async def test_a_client_leaving_during_a_partial_write_leaves_the_conversation_usable(atl, oai, monkeypatch):
    """The reported race end to end: a streaming turn on the async write path, the caller cancelled
    while its partial answer is being written. The answer must end as stopped with its text, and the
    next turn must run instead of waiting on a lock nobody will release."""
    d, _ = oai
    monkeypatch.setattr(gateway_mod, "FLUSH_INTERVAL", 0.02)
    first = await atl.chat("first", user="u", app="demo")
    cid = first.conversation_id
    _async_path(atl.gateway.store)
    d.reset(reply="w " * 200, chunk_size=2, slow=0.01)

    async def consume() -> None:
        async for _ in atl.stream("second", user="u", app="demo", conversation_id=cid):
            pass

    with _held_in_the_driver("RETURNING stop_requested") as (hit, release):
        task = asyncio.create_task(consume())
        await asyncio.wait_for(hit.wait(), 10)
        task.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
    assert _writable(atl.gateway.store._sqlite_path)
    d.reset()
    third = await asyncio.wait_for(atl.chat("third", user="u", app="demo", conversation_id=cid), 10)
    assert third.status == "completed"
    msgs = await atl.messages(cid, user="u")
    assert [m.content for m in msgs if m.role == "user"] == ["first", "second", "third"]
    assert msgs[3].status == "stopped"
    assert msgs[3].content and ("w " * 200).startswith(msgs[3].content) and len(msgs[3].content) < 400


# ---- finding 7: leases ---------------------------------------------------------------------------------


async def test_claiming_a_conversation_closes_the_answer_its_dead_turn_left(database_url):
    """The next turn takes over an expired lease at once and, in the same transaction, closes the
    answer the dead turn left streaming: failed, code `interrupted`, its partial text kept."""
    store = Store(database_url)
    await store.migrate()
    try:
        paths = ["hot", "async"] if store.hot is not None else ["async"]
        for path in paths:
            if path == "async" and store.hot is not None:
                _async_path(store)
            cid, uid, aid = await _left_streaming(store, owner="crashed-process", ttl=-0.01)
            claimed = await store.claim_turn(cid, app="demo", user="u", owner="me", ttl=30,
                                             user_msg={"id": new_id(), "content": "next"},
                                             assistant_msg={"id": new_id()})
            assert claimed is not None and claimed[1:] == (3, 4), path
            assert _interrupted(await store.get_message(aid)), path
            assert (await store.get_message(uid))["content"] == "the question"
    finally:
        await store.close()


async def test_startup_closes_answers_left_under_expired_leases_and_spares_live_ones(database_url, oai):
    store = Store(database_url)
    await store.migrate()
    dead = await _left_streaming(store, owner="crashed-process", ttl=-1)
    live = await _left_streaming(store, owner="another-live-process", ttl=60)
    await store.close()
    tl = _tl(database_url, oai[1])
    try:
        await tl.gateway.start()
        assert _interrupted(await tl.gateway.store.get_message(dead[2]))
        assert (await tl.gateway.store.get_message(live[2]))["status"] == "streaming"
        conv = await tl.gateway.store.get_conversation(live[0], app="demo", user="u")
        assert conv["lock_owner"] == "another-live-process"
    finally:
        await tl.aclose()


async def test_an_answer_left_streaming_is_closed_even_if_nobody_comes_back(atl, monkeypatch):
    """A process that restarts before the dead lease has expired finds nothing to close at startup;
    its periodic sweep closes the answer once the lease has expired, with no reader and no new turn."""
    monkeypatch.setattr(gateway_mod, "RENEW_EVERY", 0.05, raising=False)
    monkeypatch.setattr(gateway_mod, "SWEEP_EVERY", 0.1, raising=False)
    await atl.gateway.start()
    store = atl.gateway.store
    _, _, aid = await _left_streaming(store, owner="crashed-process", ttl=0.3)
    for _ in range(200):  # up to 10 s
        if _interrupted(await store.get_message(aid)):
            break
        await asyncio.sleep(0.05)
    assert _interrupted(await store.get_message(aid))


async def test_the_next_turn_is_served_once_a_dead_lease_expires(atl, oai, monkeypatch):
    monkeypatch.setattr(gateway_mod, "SWEEP_EVERY", 1000.0, raising=False)  # the takeover, not the periodic sweep, is under test
    await atl.gateway.start()
    store = atl.gateway.store
    cid, _, aid = await _left_streaming(store, owner="crashed-process", ttl=0.5)
    r = await asyncio.wait_for(atl.chat("next", user="u", app="demo", conversation_id=cid), 10)
    assert r.status == "completed" and r.answer == "Answer to: next"
    assert _interrupted(await store.get_message(aid))
    # The dead answer stays in the history the engine sees, as it is stored; the new turn follows it.
    msgs = await atl.messages(cid, user="u")
    assert [(m.role, m.status) for m in msgs] == [("user", "completed"), ("assistant", "failed"),
                                                  ("user", "completed"), ("assistant", "completed")]


async def test_a_live_turn_outlasting_the_ttl_keeps_its_conversation(database_url, oai, monkeypatch):
    """Two processes (two gateways, two owners, one database). A turn runs several lease lifetimes
    long: its process renews the lease, so the other process can neither take the conversation
    over nor sweep the live answer, however often it sweeps."""
    d, url = oai
    monkeypatch.setattr(gateway_mod, "LOCK_TTL", 1.0)
    monkeypatch.setattr(gateway_mod, "RENEW_EVERY", 0.05, raising=False)
    monkeypatch.setattr(gateway_mod, "SWEEP_EVERY", 0.05, raising=False)
    a, b = _tl(database_url, url), _tl(database_url, url)
    try:
        r = await a.chat("start", user="u", app="demo")
        cid = r.conversation_id
        await b.gateway.start()
        b.gateway.turn_wait = 0.3
        d.reset(reply="z " * 60, chunk_size=2, slow=0.05)  # about 3 s: three lease lifetimes
        started = asyncio.Event()

        async def long_turn() -> str:
            out = ""
            async for ev in a.stream("long", user="u", app="demo", conversation_id=cid):
                if isinstance(ev, TextDelta):
                    out += ev.text
                    started.set()
            return out

        task = asyncio.create_task(long_turn())
        await asyncio.wait_for(started.wait(), 10)
        await asyncio.sleep(2.0)  # two lifetimes in (b swept every 50 ms): an unrenewed lease would have expired
        with pytest.raises(ConversationBusyError):
            await b.chat("intruder", user="u", app="demo", conversation_id=cid)
        assert await asyncio.wait_for(task, 20) == "z " * 60
        msgs = await a.messages(cid, user="u")
        assert [(m.role, m.content, m.status) for m in msgs][2:] == [("user", "long", "completed"),
                                                                     ("assistant", "z " * 60, "completed")]
        assert (await a.gateway.store.get_conversation(cid, app="demo", user="u"))["lock_owner"] is None
    finally:
        await a.aclose()
        await b.aclose()


async def test_a_turn_that_lost_its_lease_stops_and_leaves_the_new_holder_alone(atl, oai, monkeypatch):
    """If a lease could not be renewed in time and another process took the conversation over, the
    old turn stops (its text kept) and its final write does not free the new holder's lease."""
    d, _ = oai
    monkeypatch.setattr(gateway_mod, "RENEW_EVERY", 0.05, raising=False)
    r = await atl.chat("start", user="u", app="demo")
    cid = r.conversation_id
    d.reset(reply="y " * 200, chunk_size=2, slow=0.02)
    store = atl.gateway.store
    agen = atl.stream("long", user="u", app="demo", conversation_id=cid)
    got = ""
    async for ev in agen:
        if isinstance(ev, TextDelta):
            got += ev.text
            if len(got) == 10:
                # Another process took the conversation over (as it may once a lease has expired).
                await store.set_conversation_fields(cid, lock_owner="usurper", lock_until=time.time() + 60)
    msgs = await atl.messages(cid, user="u")
    assert msgs[3].status == "stopped" and msgs[3].content.startswith("y y y y y") and len(msgs[3].content) < 400
    conv = await store.get_conversation(cid, app="demo", user="u")
    assert conv["lock_owner"] == "usurper"


# ---- reads never show a dead answer as live ------------------------------------------------------------


async def test_reads_show_an_answer_left_by_a_dead_turn_as_failed(atl, oai, monkeypatch):
    import httpx

    from threadline.server.app import create_app
    from threadline.server.keys import hash_key, new_key

    monkeypatch.setattr(gateway_mod, "SWEEP_EVERY", 1000.0, raising=False)  # the read, not the periodic sweep, is under test
    await atl.gateway.start()
    store = atl.gateway.store
    expired = await _left_streaming(store, owner="crashed-process", ttl=-1)
    no_lease = await _left_streaming(store, owner=None, ttl=0)  # freed without its answer being closed
    live = await _left_streaming(store, owner="another-live-process", ttl=60)
    key = new_key()
    await store.add_key(app="demo", key_hash=hash_key(key), prefix=key[:10])
    srv = LiveServer(create_app(atl.settings, gateway=atl.gateway))
    await asyncio.to_thread(srv.start)
    try:
        async with httpx.AsyncClient(base_url=srv.url, timeout=10, headers={"Authorization": f"Bearer {key}"}) as c:
            async def last(cid: str) -> dict[str, Any]:
                r = await c.get("/v1/messages", params={"conversation_id": cid, "user": "u"})
                assert r.status_code == 200
                return r.json()["data"][-1]

            for cid, _, _ in (expired, no_lease):
                m = await last(cid)
                assert (m["status"], m["threadline_status"], m["answer"]) == ("error", "failed", "the part that came")
                assert m["error"]
            m = await last(live[0])
            assert (m["status"], m["threadline_status"]) == ("normal", "streaming")  # it is being written
    finally:
        await asyncio.to_thread(srv.stop)
    assert _interrupted(await store.get_message(expired[2])) and _interrupted(await store.get_message(no_lease[2]))
    py = await atl.messages(live[0], user="u")
    assert py[-1].status == "streaming"


async def test_the_migration_closes_answers_the_old_long_leases_left_streaming(database_url):
    """Upgrading a store the 900 s leases ran on: answers left streaming that no turn can still be
    writing are closed; one under a lease still running is left to its turn."""
    from alembic import command
    from alembic.config import Config

    from threadline.store import store as store_mod

    store = Store(database_url)

    def upgrade_to_0001(conn: Any) -> None:
        cfg = Config()
        cfg.set_main_option("script_location", str(store_mod._MIGRATIONS))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")

    try:
        async with store.engine.begin() as conn:
            await conn.run_sync(upgrade_to_0001)
            # Today's store writes columns later revisions added: they exist while the old state is
            # written, and are gone again before the upgrade adds them for real.
            for table, column, kind in LATER_COLUMNS:
                await conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        superseded = await _left_streaming(store, owner=None, ttl=0)  # then a later turn ran after it:
        await store.begin_turn(superseded[0], user_msg={"id": new_id(), "content": "later"},
                               assistant_msg={"id": (later := new_id())})
        await store.finish_turn(superseded[0], later, None, content="later answer", status="completed")
        expired = await _left_streaming(store, owner="old-process", ttl=-1)
        live = await _left_streaming(store, owner="old-process", ttl=900)
        await store.close()
        store = Store(database_url)
        async with store.engine.begin() as conn:
            for table, column, _ in LATER_COLUMNS:
                await conn.exec_driver_sql(f"ALTER TABLE {table} DROP COLUMN {column}")
        await store.migrate()
        assert _interrupted(await store.get_message(superseded[2]))
        assert (await store.get_message(later))["status"] == "completed"
        assert _interrupted(await store.get_message(expired[2]))
        assert (await store.get_message(live[2]))["status"] == "streaming"
    finally:
        await store.close()
