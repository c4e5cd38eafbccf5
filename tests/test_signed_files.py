"""Signed file URLs (issue 17, item 1): `/v1/messages` and an upload give a file as an absolute,
signed, expiring `…/files/<id>/file-preview?timestamp=&nonce=&sign=` URL, as Dify does, and that
URL loads without an app key while it is valid and only for its own file.

Against a live server (uvicorn on 127.0.0.1) with the OpenAI double behind the app; the browser side
(the page's history image renders from such a URL after a reload) is in tests/test_web.py."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
from collections.abc import Iterator
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
import pytest

from tests.doubles.images import png_bytes
from tests.doubles.live import LiveServer
from threadline.config import Settings
from threadline.server import signed_files
from threadline.server.app import create_app
from threadline.server.keys import create_key

USER = "alice"
PNG = png_bytes()


def _settings(db: str, oai_url: str, **server: object) -> Settings:
    return Settings.build(database_url=db, include_presets=False,
                          engines={"acc": {"kind": "openai", "base_url": f"{oai_url}/v1",
                                           "api_key": "sk-test-double-key", "model": "m", "max_retries": 0}},
                          apps={"demo": {"engine": "acc"}}, server=dict(server))


class Srv:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.key = asyncio.run(create_key(settings, "demo"))
        self.live = LiveServer(create_app(settings)).start()
        self.url = self.live.url

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=30)

    def upload(self, name: str = "red.png", data: bytes = PNG, mime: str = "image/png") -> dict:
        with self.client() as c:
            r = c.post("/v1/files/upload", files={"file": (name, data, mime)}, data={"user": USER})
        assert r.status_code == 201, r.text
        return r.json()

    def history_image_url(self) -> tuple[str, str]:
        """Chat with an uploaded image; the image's URL as /v1/messages gives it, and its file id."""
        fid = self.upload()["id"]
        with self.client() as c:
            r = c.post("/v1/chat-messages", json={"query": "what is this?", "user": USER, "inputs": {},
                                                  "files": [{"type": "image", "transfer_method": "local_file",
                                                             "upload_file_id": fid}]})
            assert r.status_code == 200, r.text
            msgs = c.get("/v1/messages", params={"user": USER, "conversation_id": r.json()["conversation_id"]})
        files = msgs.json()["data"][0]["message_files"]
        assert [f["upload_file_id"] for f in files] == [fid]
        return files[0]["url"], fid


@pytest.fixture
def srv(oai, tmp_path) -> Iterator[Srv]:
    s = Srv(_settings(f"sqlite+aiosqlite:///{tmp_path}/signed.db", oai[1]))
    yield s
    s.live.stop()


def _refused(r: httpx.Response) -> None:
    assert r.status_code == 404, (r.status_code, r.text)
    assert r.json() == {"code": "not_found", "message": "File not found or signature is invalid", "status": 404}
    assert r.content != PNG and PNG not in r.content


def _with(url: str, **params: str) -> str:
    parts = urlsplit(url)
    q = {k: v[0] for k, v in parse_qs(parts.query).items()}
    q.update(params)
    return parts._replace(query="&".join(f"{k}={v}" for k, v in q.items())).geturl()


def test_history_image_url_is_absolute_signed_and_loads_without_a_key(srv: Srv) -> None:
    url, fid = srv.history_image_url()
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == srv.url  # absolute: the server's own origin
    assert parts.path == f"/files/{fid}/file-preview"
    q = parse_qs(parts.query)
    assert set(q) == {"timestamp", "nonce", "sign"}
    r = httpx.get(url)  # no Authorization header at all
    assert r.status_code == 200, r.text
    assert r.content == PNG and r.headers["content-type"] == "image/png"
    assert r.headers["x-content-type-options"] == "nosniff"
    # The keyed route still checks the owner.
    with srv.client() as c:
        assert c.get(f"/v1/files/{fid}/preview", params={"user": "mallory"}).status_code == 404
    assert httpx.get(f"{srv.url}/v1/files/{fid}/preview", params={"user": USER}).status_code == 401


def test_an_uploads_source_url_is_signed_too(srv: Srv) -> None:
    up = srv.upload()
    assert up["source_url"].startswith(f"{srv.url}/files/{up['id']}/file-preview?timestamp=")
    assert httpx.get(up["source_url"]).content == PNG


def test_wrong_signature_or_another_files_signature_is_refused(srv: Srv) -> None:
    url, fid = srv.history_image_url()
    other = srv.upload("other.png")
    sign = parse_qs(urlsplit(url).query)["sign"][0]
    flipped = ("A" if sign[0] != "A" else "B") + sign[1:]
    _refused(httpx.get(_with(url, sign=flipped)))
    _refused(httpx.get(_with(url, nonce="0" * 32)))  # the nonce is part of what is signed
    _refused(httpx.get(_with(url, timestamp=str(int(parse_qs(urlsplit(url).query)["timestamp"][0]) + 1))))
    # Another file's valid signature, moved onto this file's path (and the other way round).
    _refused(httpx.get(_with(url.replace(fid, other["id"]))))
    _refused(httpx.get(other["source_url"].replace(other["id"], fid)))
    assert httpx.get(url).status_code == 200  # the URL itself still works: the refusals were the changes
    r = httpx.get(f"{srv.url}/files/{fid}/file-preview")  # no signature at all
    assert r.status_code == 400 and r.json()["code"] == "invalid_param"


def test_a_signed_url_expires_after_five_minutes(srv: Srv, monkeypatch: pytest.MonkeyPatch) -> None:
    url, _ = srv.history_image_url()
    signed_at = int(parse_qs(urlsplit(url).query)["timestamp"][0])
    monkeypatch.setattr(signed_files, "clock", lambda: signed_at + 299)
    assert httpx.get(url).status_code == 200
    monkeypatch.setattr(signed_files, "clock", lambda: signed_at + 301)
    _refused(httpx.get(url))


def test_file_url_ttl_public_url_and_a_configured_secret(oai, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "s3cret-for-the-test"
    monkeypatch.setenv("TL_TEST_FILE_SECRET", secret)
    s = Srv(_settings(f"sqlite+aiosqlite:///{tmp_path}/cfg.db", oai[1], file_url_ttl=30,
                      public_url="https://chat.example.com/tl/", file_secret="env:TL_TEST_FILE_SECRET"))
    try:
        assert secret not in repr(s.settings)
        up = s.upload()
        url = up["source_url"]
        assert url.startswith(f"https://chat.example.com/tl/files/{up['id']}/file-preview?")
        q = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
        # Dify's own scheme, so the signature can be checked by anyone holding the secret.
        msg = f"file-preview|{up['id']}|{q['timestamp']}|{q['nonce']}".encode()
        assert unquote(q["sign"]) == base64.urlsafe_b64encode(hmac.new(secret.encode(), msg, hashlib.sha256).digest()).decode()
        local = f"{s.url}/files/{up['id']}/file-preview?{urlsplit(url).query}"  # the proxy's path prefix stripped
        assert httpx.get(local).content == PNG
        monkeypatch.setattr(signed_files, "clock", lambda: int(q["timestamp"]) + 31)
        _refused(httpx.get(local))
    finally:
        s.live.stop()


def test_every_process_of_a_deployment_agrees_on_the_stored_secret(oai, tmp_path, caplog) -> None:
    """No secret configured: the first process makes one and stores it; another process (another app
    on the same database) accepts its URLs, and the secret is never logged."""
    caplog.set_level(logging.DEBUG)
    db = f"sqlite+aiosqlite:///{tmp_path}/shared.db"
    a = Srv(_settings(db, oai[1]))
    b = Srv(_settings(db, oai[1]))
    try:
        up = a.upload()
        assert httpx.get(up["source_url"].replace(a.url, b.url)).content == PNG
        up_b = b.upload()
        assert httpx.get(up_b["source_url"].replace(b.url, a.url)).content == PNG

        async def stored() -> str:
            from sqlalchemy import select
            from sqlalchemy.ext.asyncio import create_async_engine

            from threadline.store.schema import server_secrets
            eng = create_async_engine(db)
            async with eng.connect() as conn:
                value = (await conn.execute(select(server_secrets.c.value))).scalar_one()
            await eng.dispose()
            return str(value)

        secret = asyncio.run(stored())
        assert len(secret) >= 32
        assert secret not in caplog.text
    finally:
        a.live.stop()
        b.live.stop()


def test_signed_route_never_serves_active_content_inline(srv: Srv) -> None:
    for name, data, mime in (("x.html", b"<script>alert(1)</script>", "text/html"),
                             ("x.svg", b"<svg onload='alert(1)'/>", "image/svg+xml")):
        up = srv.upload(name, data, mime)
        r = httpx.get(up["source_url"])
        assert r.status_code == 200 and r.content == data
        assert r.headers["content-disposition"].startswith("attachment")
        assert r.headers["content-type"] == "application/octet-stream"
        assert r.headers["x-content-type-options"] == "nosniff"
        assert "sandbox" in r.headers["content-security-policy"]
