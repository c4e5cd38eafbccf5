"""Isolation, keys, open mode and bad input: the outside probe's findings (issue 12), each against a
live server, each failing on the code before its fix."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import asyncpg
import httpx
import pytest

from tests.doubles.live import LiveServer
from threadline import AsyncThreadline
from threadline.config import Settings
from threadline.errors import InvalidParamError
from threadline.server.app import create_app
from threadline.server.keys import create_key, revoke_key
from threadline.store import Store

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


def two_app_settings(db: str, oai_url: str, gem_url: str | None = None) -> Settings:
    engines = {"acc": {"kind": "openai", "base_url": f"{oai_url}/v1", "api_key": "sk-test-double-key", "model": "m"}}
    if gem_url:
        engines["gem"] = {"kind": "gemini", "base_url": f"{gem_url}/v1beta", "api_key": "AIza-test-double-key-0000",
                          "model": "gemini-2.5-pro"}
    return Settings.build(database_url=db, engines=engines, include_presets=False,
                          apps={"alpha": {"engine": "acc"}, "beta": {"engine": "acc", "engines": ["acc"]}})


@pytest.fixture
def two_apps(oai, gem, tmp_path):
    settings = two_app_settings(f"sqlite+aiosqlite:///{tmp_path}/sec.db", oai[1], gem[1])
    ka = asyncio.run(create_key(settings, "alpha"))
    kb = asyncio.run(create_key(settings, "beta"))
    srv = LiveServer(create_app(settings)).start()
    yield srv.url, ka, kb, settings
    srv.stop()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# ---- 1. a key reaches only its own app ---------------------------------------------------------------


def test_another_apps_name_as_model_is_not_found_and_plants_nothing(two_apps):
    base, ka, kb, _ = two_apps
    with httpx.Client(base_url=base, timeout=30) as c:
        a = c.post("/v1/chat-messages", headers=bearer(ka), json={"query": "secret plan", "user": "alice", "inputs": {}})
        assert a.status_code == 200
        history = [{"role": "user", "content": "secret plan"}, {"role": "assistant", "content": a.json()["answer"]},
                   {"role": "user", "content": "and now?"}]
        for messages in (history, [{"role": "user", "content": "plant this"}]):
            r = c.post("/v1/chat/completions", headers=bearer(kb),
                       json={"model": "alpha", "messages": messages, "user": "alice"})
            assert r.status_code == 404, r.text
            assert r.json()["error"]["code"] == "model_not_found"
            assert "x-threadline-conversation-id" not in r.headers
        convs = c.get("/v1/conversations", headers=bearer(ka), params={"user": "alice"}).json()["data"]
        assert len(convs) == 1
        msgs = c.get("/v1/messages", headers=bearer(ka), params={"user": "alice", "conversation_id": convs[0]["id"]})
        assert [m["query"] for m in msgs.json()["data"]] == ["secret plan"]
        # The key's own app answers by its name.
        ok = c.post("/v1/chat/completions", headers=bearer(kb),
                    json={"model": "beta", "messages": [{"role": "user", "content": "hi"}], "user": "alice"})
        assert ok.status_code == 200, ok.text


def test_models_lists_exactly_the_keys_app_and_the_engines_it_allows(two_apps):
    base, ka, kb, _ = two_apps
    with httpx.Client(base_url=base) as c:
        ids_a = [m["id"] for m in c.get("/v1/models", headers=bearer(ka)).json()["data"]]
        ids_b = [m["id"] for m in c.get("/v1/models", headers=bearer(kb)).json()["data"]]
    assert ids_a == ["alpha", "acc", "gem"]  # no engines list: every configured engine
    assert ids_b == ["beta", "acc"]          # engines = ["acc"]


def test_an_engine_outside_the_apps_list_is_refused_on_every_route(two_apps, tmp_path):
    base, _, kb, settings = two_apps
    with httpx.Client(base_url=base, timeout=30) as c:
        r = c.post("/v1/chat/completions", headers=bearer(kb),
                   json={"model": "gem", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = c.post("/v1/chat-messages", headers=bearer(kb),
                   json={"query": "hi", "user": "u", "inputs": {}, "engine": "gem"})
        assert r.status_code == 400 and r.json()["code"] == "engine_not_available"
        assert c.get("/v1/conversations", headers=bearer(kb), params={"user": "u"}).json()["data"] == []
        r = c.post("/v1/chat/completions", headers=bearer(kb),
                   json={"model": "acc", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200

    async def python_api() -> None:
        tl = AsyncThreadline(settings=settings)
        try:
            with pytest.raises(InvalidParamError):
                await tl.chat("hi", user="u", app="beta", engine="gem")
            with pytest.raises(InvalidParamError):
                await tl.chat("hi", user="u", app="beta", engine="nope")
        finally:
            await tl.aclose()

    asyncio.run(python_api())


def test_config_engines_list_must_name_configured_engines(tmp_path):
    from threadline.errors import ConfigError

    with pytest.raises(ConfigError, match="not configured"):
        Settings.build(database_url=f"sqlite+aiosqlite:///{tmp_path}/c.db", include_presets=False,
                       engines={"acc": {"kind": "openai", "base_url": "http://127.0.0.1:1/v1", "model": "m"}},
                       apps={"x": {"engine": "acc", "engines": ["missing"]}})
    toml = tmp_path / "threadline.toml"
    toml.write_text('database_url = "sqlite+aiosqlite:///./t.db"\n'
                    '[engines.acc]\nkind = "openai"\nbase_url = "http://127.0.0.1:1/v1"\nmodel = "m"\n'
                    '[engines.gem]\nkind = "gemini"\napi_key = "k"\nmodel = "g"\n'
                    '[apps.x]\nengine = "gem"\nengines = ["acc", "gem"]\n')
    app = Settings.from_file(toml).apps["x"]
    assert app.engines == ["gem", "acc"] and app.allows("acc") and app.allows("gem")


# ---- 2. uploads are their owner's ----------------------------------------------------------------------


def test_file_preview_always_checks_the_owner_and_never_serves_active_content_inline(two_apps):
    base, ka, _, _ = two_apps
    with httpx.Client(base_url=base, headers=bearer(ka)) as c:
        png = c.post("/v1/files/upload", files={"file": ("a.png", PNG, "image/png")}, data={"user": "alice"}).json()
        html = c.post("/v1/files/upload", files={"file": ("x.html", b"<script>alert(1)</script>", "text/html")},
                      data={"user": "alice"}).json()
        svg = c.post("/v1/files/upload", files={"file": ("x.svg", b"<svg onload='alert(1)'/>", "image/svg+xml")},
                     data={"user": "alice"}).json()
        assert c.get(f"/v1/files/{png['id']}/preview").status_code == 400  # no user: no way to check the owner
        assert c.get(f"/v1/files/{png['id']}/preview", params={"user": "bob"}).status_code == 404
        own = c.get(f"/v1/files/{png['id']}/preview", params={"user": "alice"})
        assert own.status_code == 200 and own.content == PNG and own.headers["content-type"] == "image/png"
        assert own.headers["x-content-type-options"] == "nosniff"
        for f in (html, svg):
            r = c.get(f"/v1/files/{f['id']}/preview", params={"user": "alice"})
            assert r.status_code == 200
            assert r.headers["content-disposition"].startswith("attachment")
            assert r.headers["content-type"] == "application/octet-stream"
            assert r.headers["x-content-type-options"] == "nosniff"


# ---- 3. revoked keys ---------------------------------------------------------------------------------------


def test_a_revoked_key_is_refused_within_a_second_by_every_server_process(oai, tmp_path):
    settings = two_app_settings(f"sqlite+aiosqlite:///{tmp_path}/rev.db", oai[1])
    key = asyncio.run(create_key(settings, "alpha"))
    servers = [LiveServer(create_app(settings)).start() for _ in range(2)]  # two processes' worth of caches
    try:
        for s in servers:
            assert httpx.get(f"{s.url}/v1/info", headers=bearer(key)).status_code == 200
        prefix = key[:10]
        assert asyncio.run(revoke_key(settings, prefix)) == 1
        revoked_at = time.monotonic()
        time.sleep(1.0)
        for s in servers:
            for path in ("/v1/info", "/v1/conversations?user=u", "/v1/models"):
                r = httpx.get(f"{s.url}{path}", headers=bearer(key))
                assert r.status_code == 401, (path, r.text)
            r = httpx.post(f"{s.url}/v1/chat-messages", headers=bearer(key),
                           json={"query": "hi", "user": "u", "inputs": {}})
            assert r.status_code == 401
        assert time.monotonic() - revoked_at < 5
    finally:
        for s in servers:
            s.stop()


# ---- 5. open mode ------------------------------------------------------------------------------------------


@pytest.fixture
def open_server(oai, tmp_path):
    settings = two_app_settings(f"sqlite+aiosqlite:///{tmp_path}/open.db", oai[1])
    srv = LiveServer(create_app(settings, open_access=True, listen_host="127.0.0.1")).start()
    yield srv, settings
    srv.stop()


def test_open_mode_refuses_cross_site_requests(open_server):
    srv, _ = open_server
    body = '{"query": "hi", "user": "u", "inputs": {}, "response_mode": "blocking"}'
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        # A cross-site form/fetch with a "simple" content type: no preflight in a browser.
        r = c.post("/v1/chat-messages", content=body, headers={"Content-Type": "text/plain"})
        assert r.status_code == 415
        r = c.post("/v1/chat/completions", content='{"model": "default", "messages": [{"role": "user", "content": "x"}]}',
                   headers={"Content-Type": "text/plain"})
        assert r.status_code == 415
        # Another site's page, whatever its method and content type.
        r = c.post("/v1/chat-messages", content=body,
                   headers={"Content-Type": "application/json", "Origin": "https://evil.example"})
        assert r.status_code == 403 and r.json()["code"] == "origin_not_allowed"
        r = c.get("/v1/conversations", params={"user": "u"}, headers={"Origin": "null"})
        assert r.status_code == 403
        # DNS rebinding: the attacker's name resolves to 127.0.0.1, the Host header still says its name.
        r = c.get("/v1/conversations", params={"user": "u"}, headers={"Host": f"rebind.evil.example:{srv.port}"})
        assert r.status_code == 403 and r.json()["code"] == "host_not_allowed"
        # The page itself (same origin) and plain local clients are served.
        r = c.post("/v1/chat-messages", content=body,
                   headers={"Content-Type": "application/json", "Origin": srv.url})
        assert r.status_code == 200, r.text
        r = c.get("/v1/conversations", params={"user": "u"}, headers={"Host": f"localhost:{srv.port}"})
        assert r.status_code == 200
        assert [x["id"] for x in r.json()["data"]] == [c.get("/v1/conversations", params={"user": "u"}).json()["data"][0]["id"]]


def test_open_mode_refuses_a_presented_bad_or_revoked_key(open_server):
    srv, settings = open_server
    key = asyncio.run(create_key(settings, "beta"))
    with httpx.Client(base_url=srv.url) as c:
        assert c.get("/v1/info").json()["name"] == "default"  # no key: the default app
        assert c.get("/v1/info", headers=bearer(key)).json()["name"] == "beta"
        r = c.get("/v1/info", headers=bearer("app-not-a-real-key-000000"))
        assert r.status_code == 401
        asyncio.run(revoke_key(settings, key[:10]))
        time.sleep(0.7)
        assert c.get("/v1/info", headers=bearer(key)).status_code == 401


def test_open_mode_allowed_hosts_and_origins_are_configurable(oai, tmp_path):
    settings = Settings.build(database_url=f"sqlite+aiosqlite:///{tmp_path}/cfg.db", include_presets=False,
                              engines={"acc": {"kind": "openai", "base_url": f"{oai[1]}/v1", "model": "m", "api_key": "sk-test-double-key"}},
                              server={"allowed_hosts": ["chat.lan"], "allowed_origins": ["https://tools.lan"]})
    srv = LiveServer(create_app(settings, open_access=True)).start()
    try:
        with httpx.Client(base_url=srv.url) as c:
            assert c.get("/v1/info", headers={"Host": "chat.lan:8080"}).status_code == 200
            assert c.get("/v1/info", headers={"Origin": "https://tools.lan"}).status_code == 200
            assert c.get("/v1/info", headers={"Host": "other.lan"}).status_code == 403
    finally:
        srv.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_open_mode_beyond_loopback_warns_loudly(tmp_path):
    toml = tmp_path / "threadline.toml"
    toml.write_text('database_url = "sqlite+aiosqlite:///./w.db"\n'
                    '[engines.acc]\nkind = "openai"\nbase_url = "http://127.0.0.1:9/v1"\nmodel = "m"\n')
    exe = os.path.join(os.path.dirname(sys.executable), "threadline")
    port = free_port()
    p = subprocess.Popen([exe, "serve", "--config", str(toml), "--open", "--host", "0.0.0.0", "--port", str(port)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
    finally:
        p.send_signal(signal.SIGINT)
        _, stderr = p.communicate(timeout=15)
    assert "WARNING" in stderr and "open mode" in stderr and "0.0.0.0" in stderr


# ---- 11. bad input -------------------------------------------------------------------------------------------


@pytest.fixture
def any_db_server(oai, database_url):
    settings = two_app_settings(database_url, oai[1])
    key = asyncio.run(create_key(settings, "alpha"))
    srv = LiveServer(create_app(settings)).start()
    yield srv.url, key, settings
    srv.stop()


async def conversation_count(settings: Settings) -> tuple[int, int]:
    store = Store(settings.database_url)
    try:
        from sqlalchemy import func, select

        from threadline.store.schema import conversations, messages
        async with store.engine.connect() as conn:
            convs = (await conn.execute(select(func.count()).select_from(conversations))).scalar_one()
            msgs = (await conn.execute(select(func.count()).select_from(messages))).scalar_one()
        return convs, msgs
    finally:
        await store.close()


def test_bad_input_gets_a_clear_4xx_and_writes_nothing(any_db_server):
    base, key, settings = any_db_server
    long_user = "u" * 300
    history = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
               {"role": "user", "content": "three"}]
    cases = [
        ("/v1/chat/completions", {"model": "alpha", "messages": [{"role": "user", "content": "x"}],
                                  "stream": True, "stream_options": "yes"}, 400),
        ("/v1/chat/completions", {"model": "alpha", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": "http://example.com/a.png"}]}]}, 400),
        ("/v1/chat/completions", {"model": "alpha", "messages": [{"role": "user", "content": [
            {"type": "text", "text": 5}]}]}, 400),
        ("/v1/chat/completions", {"model": "alpha", "messages": [{"role": "user", "content": 5}]}, 400),
        ("/v1/chat/completions", {"model": "alpha", "messages": history, "user": long_user}, 400),
        ("/v1/chat/completions", {"model": "alpha", "messages": history, "user": "nul\x00user"}, 400),
        ("/v1/chat/completions", {"model": "alpha", "messages": "hi"}, 400),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, 400),
        ("/v1/chat-messages", {"query": "hi", "user": long_user, "inputs": {}}, 400),
        ("/v1/chat-messages", {"query": "hi", "user": "nul\x00user", "inputs": {}}, 400),
        ("/v1/chat-messages", {"query": "hi", "user": "u", "inputs": "x"}, 400),
        ("/v1/chat-messages", {"query": 5, "user": "u", "inputs": {}}, 400),
        ("/v1/chat-messages", {"query": "hi", "user": "u", "files": [{"type": "image", "transfer_method": "remote_url",
                                                                       "url": 7}]}, 400),
    ]
    with httpx.Client(base_url=base, headers=bearer(key), timeout=30) as c:
        for path, body, status in cases:
            r = c.post(path, json=body)
            assert r.status_code == status, (path, body, r.status_code, r.text)
            shape = r.json()
            assert ("error" in shape and shape["error"]["message"]) if "completions" in path else shape["code"]
        assert c.get("/v1/conversations", params={"user": long_user}).status_code == 400
    assert asyncio.run(conversation_count(settings)) == (0, 0)


def test_nul_bytes_in_text_are_dropped_not_a_500_on_every_store(any_db_server):
    base, key, settings = any_db_server
    with httpx.Client(base_url=base, headers=bearer(key), timeout=30) as c:
        r = c.post("/v1/chat-messages", json={"query": "he\x00llo", "user": "u", "inputs": {"k": "v\x00"}})
        assert r.status_code == 200, r.text
        cid = r.json()["conversation_id"]
        r = c.post("/v1/chat/completions", json={"model": "alpha", "user": "u", "messages": [
            {"role": "user", "content": "a\x00b"}, {"role": "assistant", "content": "c\x00"},
            {"role": "user", "content": "d"}]})
        assert r.status_code == 200, r.text
        r = c.post(f"/v1/conversations/{cid}/name", json={"name": "n\x00ame", "user": "u"})
        assert r.status_code == 200 and r.json()["name"] == "name"
        m = c.get("/v1/messages", params={"user": "u", "conversation_id": cid}).json()["data"]
        assert m[0]["query"] == "hello"


def test_request_bodies_over_the_limit_are_refused_before_they_are_read(oai, tmp_path):
    settings = Settings.build(database_url=f"sqlite+aiosqlite:///{tmp_path}/big.db", include_presets=False,
                              engines={"acc": {"kind": "openai", "base_url": f"{oai[1]}/v1", "model": "m", "api_key": "sk-test-double-key"}},
                              server={"max_body_bytes": 100_000, "max_upload_bytes": 50_000, "max_text_chars": 1000})
    key = asyncio.run(create_key(settings, "default"))
    srv = LiveServer(create_app(settings)).start()
    try:
        with httpx.Client(base_url=srv.url, headers=bearer(key), timeout=30) as c:
            big = {"query": "x" * 200_000, "user": "u", "inputs": {}}
            r = c.post("/v1/chat-messages", json=big)
            assert r.status_code == 413 and r.json()["code"] == "request_too_large"
            r = c.post("/v1/chat/completions", json={"model": "default", "messages": [{"role": "user", "content": "x" * 200_000}]})
            assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

            def chunks():  # no Content-Length: counted as it arrives
                for _ in range(30):
                    yield b" " * 10_000
                yield b'{"query": "hi", "user": "u"}'

            r = c.post("/v1/chat-messages", content=chunks(), headers={"Content-Type": "application/json"})
            assert r.status_code == 413
            r = c.post("/v1/files/upload", files={"file": ("a.png", PNG + b"0" * 60_000, "image/png")}, data={"user": "u"})
            assert r.status_code == 413 and r.json()["code"] == "file_too_large"
            r = c.post("/v1/chat-messages", json={"query": "x" * 2000, "user": "u", "inputs": {}})
            assert r.status_code == 400 and "limit of 1000" in r.json()["message"]
            assert c.post("/v1/chat-messages", json={"query": "hi", "user": "u", "inputs": {}}).status_code == 200
    finally:
        srv.stop()
    assert asyncio.run(conversation_count(settings)) == (1, 2)


def test_postgres_rejects_nothing_the_server_accepted(oai, pg_database):
    """The probe's PostgreSQL 500s: NUL bytes and over-long users. Counted straight in the database."""
    async def reset() -> None:
        conn = await asyncpg.connect(pg_database.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")
        finally:
            await conn.close()

    asyncio.run(reset())
    settings = two_app_settings(pg_database, oai[1])
    key = asyncio.run(create_key(settings, "alpha"))
    srv = LiveServer(create_app(settings)).start()
    try:
        with httpx.Client(base_url=srv.url, headers=bearer(key), timeout=30) as c:
            for user in ("\x00", "x" * 256):
                r = c.post("/v1/chat-messages", json={"query": "q", "user": user, "inputs": {}})
                assert r.status_code == 400, r.text
                r = c.post("/v1/chat/completions", json={"model": "alpha", "user": user, "messages": [
                    {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"}]})
                assert r.status_code == 400, r.text
            r = c.post("/v1/chat/completions", json={"model": "alpha", "user": "u", "messages": [
                {"role": "user", "content": "\x00"}, {"role": "assistant", "content": "b\x00"},
                {"role": "user", "content": "c\x00"}]})
            assert r.status_code == 200, r.text
    finally:
        srv.stop()
    assert asyncio.run(conversation_count(settings)) == (1, 4)


# ---- 4. no SQL parameters or tracebacks in logs --------------------------------------------------------------


def test_a_database_error_on_a_non_chat_route_logs_no_parameters_and_no_traceback(two_apps, caplog):
    import logging

    import sqlalchemy.exc

    base, ka, _, _ = two_apps
    srv_app = None
    import gc
    gc.collect()  # apps of earlier tests' stopped servers may still be uncollected garbage
    for obj in gc.get_objects():  # the live server's app (its gateway's store)
        if type(obj).__name__ == "ThreadlineApp":
            srv_app = obj
    assert srv_app is not None
    store = srv_app.state.tl.gateway.store

    async def failing(**kwargs):
        raise sqlalchemy.exc.OperationalError("SELECT * FROM conversations WHERE user = ?",
                                              ("user-text-7f3a", "sk-live-should-not-log"), Exception("database is locked"))

    original = store.list_conversations
    store.list_conversations = failing
    server_log = logging.getLogger("uvicorn.error")  # uvicorn's own loggers do not propagate to the root
    server_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.DEBUG):
            r = httpx.get(f"{base}/v1/conversations", params={"user": "user-text-7f3a"}, headers=bearer(ka))
    finally:
        store.list_conversations = original
        server_log.removeHandler(caplog.handler)
    assert r.status_code == 500 and r.json()["code"] == "internal_server_error"
    assert "user-text-7f3a" not in r.text and "sk-live" not in r.text
    server_side = [rec for rec in caplog.records if not rec.name.startswith(("httpx", "httpcore"))]  # not the client's
    logged = "\n".join(f"{rec.getMessage()} {rec.exc_text or ''} {rec.exc_info or ''}" for rec in server_side)
    assert "OperationalError" in logged  # the type is logged...
    assert "user-text-7f3a" not in logged and "sk-live" not in logged  # ...never its parameters
    assert not any(rec.exc_info for rec in server_side), "a traceback was logged"


def test_store_errors_never_carry_sql_parameters(tmp_path):
    import sqlalchemy.exc

    async def run() -> str:
        store = Store(f"sqlite+aiosqlite:///{tmp_path}/p.db")
        await store.migrate()
        try:
            await store.add_key(app="a", key_hash="h" * 64, prefix="secret-prefix")
            try:
                await store.add_key(app="a", key_hash="h" * 64, prefix="secret-prefix")  # unique key_hash
            except sqlalchemy.exc.IntegrityError as exc:
                return str(exc)
            return ""
        finally:
            await store.close()

    message = asyncio.run(run())
    assert "UNIQUE" in message and "secret-prefix" not in message and "hhhh" not in message
