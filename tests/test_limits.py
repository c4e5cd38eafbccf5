"""Rate limits and budgets per key and per app, and concurrent turns per user: answered with 429 and
Retry-After in each surface's own error shape, counted in the store so separate servers share them,
and free of any store access when nothing is limited."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.doubles.live import LiveServer
from threadline import AsyncThreadline
from threadline import limits as limits_module
from threadline.config import Settings
from threadline.errors import ConfigError, RateLimitedError
from threadline.gateway import Gateway
from threadline.limits import Limits
from threadline.server.app import create_app
from threadline.server.keys import create_key, list_keys
from threadline.store import Store
from threadline.store.counters import Counters

EXE = str(Path(sys.executable).with_name("threadline"))


# ---- helpers -------------------------------------------------------------------------------------------


def _settings(db: str, oai_url: str, apps: dict, **engine: object) -> Settings:
    return Settings.build(
        database_url=db,
        engines={"acc": {"kind": "openai", "base_url": f"{oai_url}/v1", "api_key": "sk-test-double-key", "model": "m",
                         **engine}},
        apps=apps, include_presets=False)


def _fresh_minute(needed: float = 8.0) -> None:
    """Requests-per-minute windows are whole UTC minutes: start a test's burst far from a boundary,
    so it cannot straddle two windows."""
    left = 60 - time.time() % 60
    if left < needed:
        time.sleep(left + 0.05)


def _turn(c: httpx.Client, surface: str, key: str, app: str, *, user: str = "alice", query: str = "hello",
          stream: bool = False, conversation_id: str = "", history: list[dict] | None = None) -> httpx.Response:
    h = {"Authorization": f"Bearer {key}"}
    if surface == "dify":
        return c.post("/v1/chat-messages", headers=h, json={
            "inputs": {}, "query": query, "user": user, "conversation_id": conversation_id,
            "response_mode": "streaming" if stream else "blocking"})
    return c.post("/v1/chat/completions", headers=h, json={
        "model": app, "user": user, "stream": stream,
        "messages": [*(history or []), {"role": "user", "content": query}]})


def _conversation_of(surface: str, r: httpx.Response) -> str:
    return r.json()["conversation_id"] if surface == "dify" else r.headers["x-threadline-conversation-id"]


def _answer_of(surface: str, r: httpx.Response) -> str:
    return r.json()["answer"] if surface == "dify" else r.json()["choices"][0]["message"]["content"]


def _assert_refused(r: httpx.Response, surface: str, code: str, *, most_wait: int) -> str:
    """A 429 in the surface's own error shape, with Retry-After; returns the message."""
    assert r.status_code == 429, r.text
    assert r.headers["content-type"].startswith("application/json")
    wait = int(r.headers["retry-after"])
    assert 1 <= wait <= most_wait
    body = r.json()
    if surface == "dify":
        assert set(body) == {"code", "message", "status"}
        assert body["code"] == code and body["status"] == 429
        return body["message"]
    assert set(body) == {"error"}
    err = body["error"]
    assert err["type"] == "rate_limit_error" and err["code"] == code and err["param"] is None
    return err["message"]


def _rows(db: str) -> tuple[int, int]:
    """(conversations, messages) in the store."""
    async def count() -> tuple[int, int]:
        eng = create_async_engine(db)
        try:
            async with eng.connect() as c:
                return ((await c.execute(text("SELECT count(*) FROM conversations"))).scalar_one(),
                        (await c.execute(text("SELECT count(*) FROM messages"))).scalar_one())
        finally:
            await eng.dispose()
    return asyncio.run(count())


def _usage(db: str, scope: str) -> dict[str, int]:
    async def read() -> dict[str, int]:
        store = Store(db)
        try:
            return await Counters(store).usage(scope)
        finally:
            await store.close()
    return asyncio.run(read())


def _key_id(settings: Settings, key: str) -> str:
    return next(r["id"] for r in asyncio.run(list_keys(settings)) if r["prefix"] == key[:10])


class _SlowStream:
    """A streaming turn held open in a thread: admitted once its headers arrive, ended by draining."""

    def __init__(self, base: str, surface: str, key: str, app: str, user: str) -> None:
        self.started = threading.Event()
        self.status = 0
        self.body = ""
        self.thread = threading.Thread(target=self._run, args=(base, surface, key, app, user), daemon=True)
        self.thread.start()
        assert self.started.wait(20)

    def _run(self, base: str, surface: str, key: str, app: str, user: str) -> None:
        h = {"Authorization": f"Bearer {key}"}
        if surface == "dify":
            path, body = "/v1/chat-messages", {"inputs": {}, "query": "hello", "user": user,
                                               "response_mode": "streaming"}
        else:
            path, body = "/v1/chat/completions", {"model": app, "user": user, "stream": True,
                                                  "messages": [{"role": "user", "content": "hello"}]}
        with httpx.Client(base_url=base, headers=h, timeout=30) as c, c.stream("POST", path, json=body) as s:
            self.status = s.status_code
            self.started.set()
            self.body = s.read().decode()

    def finish(self) -> str:
        self.thread.join(30)
        assert not self.thread.is_alive()
        return self.body


# ---- requests per minute -----------------------------------------------------------------------------


@pytest.mark.parametrize("surface", ["dify", "openai"])
def test_requests_per_minute_per_key_refuses_the_next_request_and_stores_nothing(oai, tmp_path, surface):
    _, url = oai
    db = f"sqlite+aiosqlite:///{tmp_path}/l.db"
    s = _settings(db, url, {"demo": {"engine": "acc"}, "other": {"engine": "acc"}})
    limited = asyncio.run(create_key(s, "demo", Limits(requests_per_minute=2)))
    unlimited_same_app = asyncio.run(create_key(s, "demo"))
    other_app = asyncio.run(create_key(s, "other"))
    srv = LiveServer(create_app(s)).start()
    try:
        _fresh_minute()
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            first = _turn(c, surface, limited, "demo")
            assert first.status_code == 200, first.text
            assert _turn(c, surface, limited, "demo", query="again").status_code == 200
            before = _rows(db)
            # A new conversation (an OpenAI client's history that matches nothing stored) ...
            new = _turn(c, surface, limited, "demo", stream=True,
                        history=[{"role": "user", "content": "older"}, {"role": "assistant", "content": "reply"}])
            message = _assert_refused(new, surface, "rate_limit_exceeded", most_wait=60)
            assert "2 requests per minute" in message and "this key" in message
            # ... and the continuation of a stored one: neither stores anything.
            cid = _conversation_of(surface, first)
            cont = _turn(c, surface, limited, "demo", query="more", conversation_id=cid,
                         history=[{"role": "user", "content": "hello"},
                                  {"role": "assistant", "content": _answer_of(surface, first)}])
            _assert_refused(cont, surface, "rate_limit_exceeded", most_wait=60)
            assert _rows(db) == before
            assert _usage(db, f"key:{_key_id(s, limited)}")["requests"] == 2  # refusals are not counted
            # The limit is this key's: the app's other key and another app's key go on.
            assert _turn(c, surface, unlimited_same_app, "demo").status_code == 200
            assert _turn(c, surface, other_app, "other").status_code == 200
    finally:
        srv.stop()


@pytest.mark.parametrize("surface", ["dify", "openai"])
def test_requests_per_minute_per_app_counts_every_key_of_the_app(oai, database_url, surface):
    _, url = oai
    db = database_url
    s = _settings(db, url, {"capped": {"engine": "acc", "limits": {"requests_per_minute": 2}},
                            "other": {"engine": "acc"}})
    k1, k2 = asyncio.run(create_key(s, "capped", Limits(requests_per_minute=5))), asyncio.run(create_key(s, "capped"))
    other = asyncio.run(create_key(s, "other"))
    srv = LiveServer(create_app(s)).start()
    try:
        _fresh_minute()
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            assert _turn(c, surface, k2, "capped").status_code == 200
            assert _turn(c, surface, k2, "capped", user="bob").status_code == 200
            before = _rows(db)
            # k1's own limit (5) would admit it; the app's (2, used by k2) refuses it.
            refused = _turn(c, surface, k1, "capped", user="carol")
            message = _assert_refused(refused, surface, "rate_limit_exceeded", most_wait=60)
            assert "app 'capped' allows 2 requests per minute" in message
            _assert_refused(_turn(c, surface, k2, "capped"), surface, "rate_limit_exceeded", most_wait=60)
            assert _rows(db) == before
            assert _usage(db, "app:capped")["requests"] == 2
            assert _usage(db, f"key:{_key_id(s, k1)}")["requests"] == 0  # counted by the key, undone with the refusal
            assert _turn(c, surface, other, "other").status_code == 200
    finally:
        srv.stop()


async def test_app_limits_apply_to_the_python_api(oai, sqlite_url):
    _, url = oai
    tl = AsyncThreadline(database_url=sqlite_url, include_presets=False,
                         engines={"acc": {"kind": "openai", "base_url": f"{url}/v1", "api_key": "sk-test-double-key",
                                          "model": "m"}},
                         apps={"demo": {"engine": "acc", "limits": {"requests_per_minute": 1,
                                                                    "concurrent_turns_per_user": 1}}})
    try:
        await asyncio.to_thread(_fresh_minute)
        r = await tl.chat("hi", user="u", app="demo")
        with pytest.raises(RateLimitedError) as refused:
            await tl.chat("again", user="u", app="demo", conversation_id=r.conversation_id)
        assert refused.value.code == "rate_limit_exceeded" and refused.value.limit == "requests_per_minute"
        assert 0 < refused.value.retry_after <= 60
        with pytest.raises(RateLimitedError):
            await tl.chat("new", user="u", app="demo")
        assert [c.id for c in await tl.conversations(user="u", app="demo")] == [r.conversation_id]
        assert len(await tl.messages(r.conversation_id, user="u")) == 2
        async with tl.gateway.store.engine.connect() as conn:  # the refused turns' slots were given back
            assert (await conn.execute(text("SELECT count(*) FROM turn_slots"))).scalar_one() == 0
    finally:
        await tl.aclose()


# ---- budgets: tokens and spend per day -----------------------------------------------------------------


def test_tokens_per_day_per_key_refuse_the_turn_after_the_quota_is_used(oai, tmp_path):
    _, url = oai
    db = f"sqlite+aiosqlite:///{tmp_path}/l.db"
    s = _settings(db, url, {"demo": {"engine": "acc"}})
    key = asyncio.run(create_key(s, "demo", Limits(tokens_per_day=40)))
    srv = LiveServer(create_app(s)).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            spent = 0
            for _ in range(50):  # turns go on while the day's tokens are under the quota
                r = _turn(c, "dify", key, "demo")
                if r.status_code != 200:
                    break
                spent += r.json()["metadata"]["usage"]["total_tokens"]
            assert spent >= 40
            message = _assert_refused(r, "dify", "token_quota_exceeded", most_wait=86400)
            assert "40 tokens per day" in message and "00:00 UTC" in message
            assert _usage(db, f"key:{_key_id(s, key)}")["tokens"] == spent  # counted as the engine reported them
            streamed = _turn(c, "openai", key, "demo", stream=True)
            _assert_refused(streamed, "openai", "token_quota_exceeded", most_wait=86400)
    finally:
        srv.stop()


def test_spend_per_day_per_app_counts_only_its_currency(oai, tmp_path):
    _, url = oai
    db = f"sqlite+aiosqlite:///{tmp_path}/l.db"
    # 1,000 USD per million tokens: a thousandth of a dollar per token.
    s = _settings(db, url, {"usd": {"engine": "acc", "limits": {"spend_per_day": 0.005}},
                            "eur": {"engine": "acc", "limits": {"spend_per_day": "0.005", "currency": "EUR"}}},
                  price_input_per_mtok=1000, price_output_per_mtok=1000, currency="USD")
    usd, eur = asyncio.run(create_key(s, "usd")), asyncio.run(create_key(s, "eur"))
    srv = LiveServer(create_app(s)).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            first = _turn(c, "openai", usd, "usd")
            assert first.status_code == 200
            assert first.json()["usage"]["total_tokens"] > 5  # so it cost more than the cap
            message = _assert_refused(_turn(c, "openai", usd, "usd"), "openai", "spend_cap_exceeded",
                                      most_wait=86400)
            assert "0.005 USD per day" in message
            _assert_refused(_turn(c, "dify", usd, "usd"), "dify", "spend_cap_exceeded", most_wait=86400)
            assert _usage(db, "app:usd")["spend_nanos"] == first.json()["usage"]["total_tokens"] * 1_000_000
            for _ in range(3):  # priced in USD, so nothing counts against a EUR cap
                assert _turn(c, "openai", eur, "eur").status_code == 200
            assert _usage(db, "app:eur")["spend_nanos"] == 0
    finally:
        srv.stop()


# ---- concurrent turns per user ---------------------------------------------------------------------------


@pytest.mark.parametrize("surface", ["dify", "openai"])
def test_concurrent_turns_per_user(oai, tmp_path, surface):
    d, url = oai
    db = f"sqlite+aiosqlite:///{tmp_path}/l.db"
    s = _settings(db, url, {"one": {"engine": "acc", "limits": {"concurrent_turns_per_user": 1}}})
    key = asyncio.run(create_key(s, "one"))
    srv = LiveServer(create_app(s)).start()
    try:
        d.reset(slow=0.25)  # about 1.5 s of streaming, and 0.25 s for a blocking answer
        running = _SlowStream(srv.url, surface, key, "one", "alice")
        assert running.status == 200
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            before = _rows(db)
            message = _assert_refused(_turn(c, surface, key, "one"), surface, "too_many_requests", most_wait=1)
            assert "1 turn running" in message
            assert _rows(db) == before
            assert _turn(c, surface, key, "one", user="bob").status_code == 200  # another user is not held up
            assert ("message_end" if surface == "dify" else "[DONE]") in running.finish()
            assert _turn(c, surface, key, "one").status_code == 200  # the first ended: its slot is free
    finally:
        srv.stop()


def test_a_turn_that_ends_before_it_runs_frees_its_slot(oai, tmp_path):
    _, url = oai
    db = f"sqlite+aiosqlite:///{tmp_path}/l.db"
    s = _settings(db, url, {"one": {"engine": "acc", "limits": {"concurrent_turns_per_user": 1}}})
    key = asyncio.run(create_key(s, "one"))
    srv = LiveServer(create_app(s)).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            missing = _turn(c, "dify", key, "one", conversation_id="00000000-0000-7000-8000-000000000000")
            assert missing.status_code == 404
            assert _turn(c, "dify", key, "one").status_code == 200
    finally:
        srv.stop()


async def test_running_turns_keep_their_slots_and_a_dead_process_slots_expire(oai, sqlite_url, monkeypatch):
    """Slots are rows in the store: another gateway (process) sees them; a running turn renews its
    own past their lifetime; one left by a process that died stops counting once it expires."""
    d, url = oai
    monkeypatch.setattr(limits_module, "SLOT_TTL", 0.6)
    monkeypatch.setattr(limits_module, "SLOT_RENEW", 0.1)
    kw = {"database_url": sqlite_url, "include_presets": False,
          "engines": {"acc": {"kind": "openai", "base_url": f"{url}/v1", "api_key": "sk-test-double-key",
                              "model": "m"}},
          "apps": {"one": {"engine": "acc", "limits": {"concurrent_turns_per_user": 1}}}}
    a, b = AsyncThreadline(**kw), AsyncThreadline(**kw)
    try:
        d.reset(reply="x" * 60, chunk_size=3, slow=0.1)  # 20 chunks: about 2 s, more than three lifetimes

        async def long_turn() -> str:
            out = ""
            async for ev in a.stream("long", user="u", app="one"):
                out += getattr(ev, "text", "")
            return out

        task = asyncio.create_task(long_turn())
        try:
            await asyncio.sleep(1.4)
            assert not task.done()
            with pytest.raises(RateLimitedError) as refused:
                await b.chat("meanwhile", user="u", app="one")
            assert refused.value.code == "too_many_requests" and refused.value.retry_after == 1
            assert await task == "x" * 60
        finally:
            task.cancel()
        d.reset()
        assert (await b.chat("now", user="u", app="one")).answer == "Answer to: now"
        # A process that died mid-turn left a slot; it counts until it expires, then not.
        await b.gateway.start()
        async with b.gateway.store.engine.begin() as conn:
            await conn.execute(text('INSERT INTO turn_slots (app, "user", id, expires_at) VALUES '
                                    "('one', 'v', 'dead-1', :live)"), {"live": time.time() + 0.5})
        with pytest.raises(RateLimitedError):
            await b.chat("blocked", user="v", app="one")
        await asyncio.sleep(0.6)
        assert (await b.chat("freed", user="v", app="one")).answer == "Answer to: freed"
    finally:
        await a.aclose()
        await b.aclose()


# ---- shared between processes ------------------------------------------------------------------------------


def test_two_servers_on_one_store_share_the_counts(oai, database_url):
    d, url = oai
    s = _settings(database_url, url, {"demo": {"engine": "acc"},
                                      "one": {"engine": "acc", "limits": {"concurrent_turns_per_user": 1}}})
    key = asyncio.run(create_key(s, "demo", Limits(requests_per_minute=3)))
    one = asyncio.run(create_key(s, "one"))
    first, second = LiveServer(create_app(s)).start(), LiveServer(create_app(s)).start()
    try:
        _fresh_minute()
        with httpx.Client(base_url=first.url, timeout=30) as a, httpx.Client(base_url=second.url, timeout=30) as b:
            assert _turn(a, "dify", key, "demo").status_code == 200
            assert _turn(b, "openai", key, "demo").status_code == 200
            assert _turn(a, "openai", key, "demo").status_code == 200
            _assert_refused(_turn(b, "dify", key, "demo"), "dify", "rate_limit_exceeded", most_wait=60)
            _assert_refused(_turn(a, "dify", key, "demo"), "dify", "rate_limit_exceeded", most_wait=60)
            d.reset(slow=0.25)
            running = _SlowStream(first.url, "dify", one, "one", "alice")
            _assert_refused(_turn(b, "dify", one, "one"), "dify", "too_many_requests", most_wait=1)
            running.finish()
            assert _turn(b, "dify", one, "one").status_code == 200
    finally:
        first.stop()
        second.stop()


async def test_simultaneous_admissions_in_two_processes_never_pass_a_limit(database_url):
    """Admissions racing in two gateways (separate pools, as two processes have) on one store: a
    limit of N admits exactly N, for requests per minute and for concurrent turns alike."""
    s = Settings.build(database_url=database_url, include_presets=False,
                       engines={"acc": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"}},
                       apps={"rpm": {"engine": "acc", "limits": {"requests_per_minute": 5}},
                             "one": {"engine": "acc", "limits": {"concurrent_turns_per_user": 1}}})
    gateways = [Gateway(s), Gateway(s)]
    try:
        for gw in gateways:
            await gw.start()
        await asyncio.to_thread(_fresh_minute)
        for app, user_of, admitted in (("rpm", lambda i: f"u{i}", 5), ("one", lambda i: "same", 1)):
            results = await asyncio.gather(*(gateways[i % 2].limits.admit(s.apps[app], user_of(i), None)
                                             for i in range(24)), return_exceptions=True)
            assert sum(1 for r in results if r is not None and not isinstance(r, BaseException)) == admitted
            assert all(isinstance(r, RateLimitedError) for r in results if r is None or isinstance(r, BaseException))
    finally:
        for gw in gateways:
            await gw.close()


async def test_limits_hold_on_sqlite_s_waiting_path(oai, sqlite_url):
    """While another process holds SQLite's write lock for long, writes take the store's async path
    (a transaction that does not hold the lock from its start): the same counts and refusals."""
    _, url = oai
    tl = AsyncThreadline(database_url=sqlite_url, include_presets=False,
                         engines={"acc": {"kind": "openai", "base_url": f"{url}/v1", "api_key": "sk-test-double-key",
                                          "model": "m"}},
                         apps={"demo": {"engine": "acc", "limits": {"requests_per_minute": 2, "tokens_per_day": 10**6,
                                                                    "concurrent_turns_per_user": 1}}})
    try:
        await tl.gateway.start()
        tl.gateway.store.hot.close()
        tl.gateway.store.hot = None
        await asyncio.to_thread(_fresh_minute)
        slots = await asyncio.gather(*(tl.gateway.limits.admit(tl.settings.apps["demo"], "u", None) for _ in range(3)),
                                     return_exceptions=True)
        assert sum(1 for t in slots if not isinstance(t, BaseException)) == 1
        assert all(t.code == "too_many_requests" for t in slots if isinstance(t, RateLimitedError))
        for t in slots:
            if not isinstance(t, BaseException):
                await tl.gateway.limits.settle(t)
        r = await tl.chat("hi", user="u", app="demo")
        with pytest.raises(RateLimitedError) as refused:
            await tl.chat("again", user="u", app="demo")
        assert refused.value.code == "rate_limit_exceeded"
        usage = await tl.gateway.limits.counters.usage("app:demo")
        assert usage["requests"] == 2 and usage["tokens"] == r.usage.total_tokens
        async with tl.gateway.store.engine.connect() as conn:
            assert (await conn.execute(text("SELECT count(*) FROM turn_slots"))).scalar_one() == 0
    finally:
        await tl.aclose()


# ---- no limits: no cost ------------------------------------------------------------------------------------


async def test_without_limits_a_turn_touches_no_counter_and_reads_no_key_limits(oai, sqlite_url):
    _, url = oai
    s = _settings(sqlite_url, url, {"demo": {"engine": "acc"}})
    key = await create_key(s, "demo")
    gw = Gateway(s)
    statements: list[str] = []
    srv = LiveServer(create_app(s, gateway=gw)).start()
    try:
        event.listen(gw.store.engine.sync_engine, "before_cursor_execute",
                     lambda *args: statements.append(args[2]))
        gw.store.hot.conn.set_trace_callback(statements.append)

        def turns() -> None:
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                cid = ""
                for surface in ("dify", "openai", "dify"):
                    r = _turn(c, surface, key, "demo", conversation_id=cid)
                    assert r.status_code == 200
                    cid = _conversation_of(surface, r)

        await asyncio.to_thread(turns)
        assert any("INSERT INTO messages" in q for q in statements)  # the tracing sees the turns' writes
        assert not [q for q in statements if "usage_counters" in q or "turn_slots" in q]
        assert not [q for q in statements if q.lstrip().startswith("SELECT api_keys.limit_rpm")]
    finally:
        srv.stop()
    store = Store(sqlite_url)
    try:
        async with store.engine.connect() as conn:
            assert (await conn.execute(text("SELECT count(*) FROM usage_counters"))).scalar_one() == 0
            assert (await conn.execute(text("SELECT count(*) FROM turn_slots"))).scalar_one() == 0
    finally:
        await store.close()


# ---- configuration -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("limits", "words"), [
    ({"requests_per_minute": 0}, "requests_per_minute must be a whole number of at least 1"),
    ({"requests_per_minute": -5}, "requests_per_minute must be a whole number of at least 1"),
    ({"requests_per_minute": "60"}, "requests_per_minute must be a whole number"),
    ({"requests_per_minute": True}, "requests_per_minute must be a whole number"),
    ({"tokens_per_day": 1.5}, "tokens_per_day must be a whole number"),
    ({"concurrent_turns_per_user": 0}, "concurrent_turns_per_user must be a whole number of at least 1"),
    ({"spend_per_day": 0}, "spend_per_day must be more than 0"),
    ({"spend_per_day": "five"}, "spend_per_day must be a number"),
    ({"spend_per_day": float("nan")}, "spend_per_day must be more than 0"),
    ({"spend_per_day": 5, "currency": ""}, "currency must be a currency code"),
    ({"rpm": 60}, "unknown setting(s) ['rpm']"),
    (60, "must be a table of limits"),
])
def test_bad_limits_are_a_clear_config_error(limits, words):
    with pytest.raises(ConfigError) as err:
        Settings.build(database_url="sqlite+aiosqlite:///x.db", include_presets=False,
                       engines={"acc": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"}},
                       apps={"demo": {"engine": "acc", "limits": limits}})
    assert words in err.value.message and "[apps.demo.limits]" in err.value.message


def test_limits_in_threadline_toml_and_on_keys_from_the_cli(tmp_path, oai):
    _, url = oai
    cfg = tmp_path / "threadline.toml"
    cfg.write_text(f'''database_url = "sqlite+aiosqlite:///./cli.db"
[engines.acc]
kind = "openai"
base_url = "{url}/v1"
api_key = "sk-test-double-key"
model = "m"
[apps.demo]
engine = "acc"
[apps.demo.limits]
requests_per_minute = 60
tokens_per_day = 100_000
spend_per_day = 2.5
currency = "EUR"
concurrent_turns_per_user = 2
''')
    assert Settings.from_file(cfg).apps["demo"].limits == Limits(
        requests_per_minute=60, tokens_per_day=100_000, spend_per_day=Decimal("2.5"), currency="EUR",
        concurrent_turns_per_user=2)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([EXE, "keys", *args, "--config", str(cfg)], capture_output=True, text=True, timeout=60,
                              env={"PATH": "/usr/bin:/bin", "COLUMNS": "200"})

    bad = cli("create", "--app", "demo", "--rpm", "0")
    assert bad.returncode == 1 and "requests_per_minute must be a whole number of at least 1" in bad.stderr
    bad = cli("create", "--app", "demo", "--spend-per-day", "-1")
    assert bad.returncode == 1 and "spend_per_day must be more than 0" in bad.stderr
    made = cli("create", "--app", "demo", "--rpm", "30", "--tokens-per-day", "5000", "--spend-per-day", "1.25")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    plain = cli("create", "--app", "demo")
    assert plain.returncode == 0
    listed = cli("list").stdout
    row = next(line for line in listed.splitlines() if key[:10] in line)
    assert "30 requests/min" in row and "5000 tokens/day" in row and "1.25 USD/day" in row
    other = next(line for line in listed.splitlines() if plain.stdout.strip().splitlines()[-1][:10] in line)
    assert "none" in other
    rows = asyncio.run(list_keys(Settings.from_file(cfg)))
    stored = next(r for r in rows if r["prefix"] == key[:10])
    assert stored["limit_spend_per_day"] == "1.25" and stored["limit_currency"] == "USD"
    assert Limits.from_key_row(stored) == Limits(requests_per_minute=30, tokens_per_day=5000,
                                                 spend_per_day=Decimal("1.25"))
