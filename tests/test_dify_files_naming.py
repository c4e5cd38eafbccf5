"""Issue 19 items 1 and 4, against the Dify double made to behave as the real Dify 1.13 server did:
`data:` images and uploads reach Dify as uploaded files (`local_file`), uploaded once per file and
remote user; a seeded new Dify conversation is not auto-named from the transcript but given
Threadline's conversation name."""

from __future__ import annotations

import asyncio
import base64

import httpx
import pytest

from tests.conftest import SHARED
from tests.doubles.dify_double import DifyDouble
from tests.doubles.live import LiveServer
from threadline import AsyncThreadline
from threadline.config import Settings
from threadline.errors import InvalidParamError
from threadline.server.app import create_app
from threadline.server.keys import create_key

FIX = SHARED / "fixtures" / "dify"
RED = (FIX / "assets" / "red.png").read_bytes()
RED_URL = "data:image/png;base64," + base64.b64encode(RED).decode()


@pytest.fixture(scope="module")
def dify_server():
    d = DifyDouble()
    srv = LiveServer(d.app()).start()
    yield d, srv.url
    srv.stop()


def _engines(url: str, key: str, ourl: str) -> dict:
    return {"dify": {"kind": "dify", "base_url": f"{url}/v1", "api_key": key, "max_retries": 0},
            "acc": {"kind": "openai", "base_url": f"{ourl}/v1", "api_key": "sk-test-double-key", "model": "m"}}


@pytest.fixture
async def dtl(dify_server, oai, sqlite_url):
    d, url = dify_server
    d.reset()
    tl = AsyncThreadline(database_url=sqlite_url, engines=_engines(url, d.api_key, oai[1]),
                         apps={"d": {"engine": "dify"}, "s": {"engine": "acc"}}, include_presets=False)
    yield tl, d
    await tl.aclose()


@pytest.fixture
def dify_app_server(dify_server, oai, tmp_path):
    d, url = dify_server
    d.reset()
    settings = Settings.build(database_url=f"sqlite+aiosqlite:///{tmp_path}/srv.db",
                              engines=_engines(url, d.api_key, oai[1]), apps={"dd": {"engine": "dify"}},
                              include_presets=False)
    key = asyncio.run(create_key(settings, "dd"))
    srv = LiveServer(create_app(settings)).start()
    yield srv.url, {"Authorization": f"Bearer {key}"}, d
    srv.stop()


def _local_file(d: DifyDouble, body: dict) -> str:
    files = body["files"]
    assert len(files) == 1 and files[0]["type"] == "image" and files[0]["transfer_method"] == "local_file"
    fid = files[0]["upload_file_id"]
    up = d.uploads[fid]
    assert up["user"] == body["user"] and up["data"] == RED and up["mime_type"] == "image/png"
    return fid


# ---- the double behaves as the real server did -------------------------------------------------

async def test_the_double_refuses_a_data_url_sent_as_remote_url_like_dify(dify_server):
    d, url = dify_server
    d.reset()
    async with httpx.AsyncClient() as c:
        r = await c.post(f"{url}/v1/chat-messages", headers={"Authorization": f"Bearer {d.api_key}"},
                         json={"inputs": {}, "query": "hi", "response_mode": "blocking", "user": "u",
                               "files": [{"type": "image", "transfer_method": "remote_url", "url": RED_URL}]})
    assert r.status_code == 400 and r.json()["code"] == "invalid_param"
    assert r.json()["message"] == f"Reached maximum retries (3) for URL {RED_URL}"


# ---- item 1: data: URLs and uploads go as local_file, uploaded once ---------------------------

async def test_a_data_url_image_is_uploaded_to_dify_once_and_sent_as_local_file(dtl):
    tl, d = dtl
    r1 = await tl.chat("what is this?", user="alice", app="d", images=[RED_URL])
    assert r1.status == "completed"
    fid = _local_file(d, d.requests[-1])
    r2 = await tl.chat("and again?", user="alice", app="d", conversation_id=r1.conversation_id, images=[RED_URL])
    assert r2.status == "completed"
    assert _local_file(d, d.requests[-1]) == fid
    assert len(d.uploads) == 1  # the replay did not upload again


async def test_an_uploaded_image_is_uploaded_to_dify_once_per_remote_user(dtl):
    tl, d = dtl
    fid = await tl.upload(RED, user="alice", app="d", name="red.png")
    r1 = await tl.chat("see", user="alice", app="d", files=[fid])
    first = _local_file(d, d.requests[-1])
    await tl.chat("see again", user="alice", app="d", conversation_id=r1.conversation_id, files=[fid])
    assert _local_file(d, d.requests[-1]) == first and len(d.uploads) == 1
    await tl.chat("bob too", user="bob", app="d", images=[RED_URL])
    bobs = _local_file(d, d.requests[-1])  # another remote user: Dify scopes uploads by user
    assert bobs != first and len(d.uploads) == 2


async def test_a_data_url_that_is_not_base64_is_refused_before_dify_is_asked(dtl):
    tl, d = dtl
    with pytest.raises(InvalidParamError):
        await tl.chat("bad", user="alice", app="d", images=["data:image/png;base64,@@not base64@@"])
    assert d.requests == [] and d.uploads == {}


def test_openai_route_data_url_reaches_dify_as_an_uploaded_file_once(dify_app_server):
    base, headers, d = dify_app_server
    content = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": RED_URL}}]
    with httpx.Client(base_url=base, headers=headers, timeout=30) as c:
        r = c.post("/v1/chat/completions", json={"model": "dd", "messages": [{"role": "user", "content": content}]})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"].startswith("echo: what is this?")
        fid = _local_file(d, d.requests[-1])
        conv = r.headers["X-Threadline-Conversation-Id"]
        msgs = [{"role": "user", "content": content}, r.json()["choices"][0]["message"],
                {"role": "user", "content": [{"type": "text", "text": "again"},
                                             {"type": "image_url", "image_url": {"url": RED_URL}}]}]
        r2 = c.post("/v1/chat/completions", json={"model": "dd", "messages": msgs, "stream": True},
                    headers={"X-Threadline-Conversation-Id": conv})
        assert r2.status_code == 200 and "echo: again" in "".join(r2.text.split('"content":"')[1:])
    assert d.requests[-1]["conversation_id"] == d.conversations_by_query("what is this?")  # Dify's own, continued
    assert _local_file(d, d.requests[-1]) == fid and len(d.uploads) == 1


# ---- item 4: a seeded new Dify conversation is named as Threadline's ---------------------------

@pytest.mark.parametrize("stream", [False, True])
async def test_a_seeded_dify_conversation_gets_threadlines_name_not_the_transcripts(dtl, stream):
    tl, d = dtl
    r1 = await tl.chat("I like blue", user="alice", app="s")
    conv = await tl.conversation(r1.conversation_id, user="alice")
    assert conv.name == "I like blue"
    if stream:
        async for _ in tl.stream("what do I like?", user="alice", app="s", conversation_id=r1.conversation_id,
                                 engine="dify"):
            pass
    else:
        await tl.chat("what do I like?", user="alice", app="s", conversation_id=r1.conversation_id, engine="dify")
    sent = d.requests[-1]
    assert "Earlier conversation" in sent["query"] and sent["auto_generate_name"] is False
    remote = d.conversations[d.conversations_by_query(sent["query"])]
    assert remote["name"] == "I like blue"
    assert d.renames == [{"name": "I like blue", "auto_generate": False, "user": sent["user"]}]
    await tl.chat("more", user="alice", app="s", conversation_id=r1.conversation_id, engine="dify")
    assert len(d.renames) == 1 and remote["name"] == "I like blue"  # named once, when it was created


async def test_a_plain_new_dify_conversation_is_still_named_by_dify(dtl):
    tl, d = dtl
    await tl.chat("hello there", user="alice", app="d")
    assert d.requests[-1]["auto_generate_name"] is True
    assert d.conversations[d.conversations_by_query("hello there")]["name"] == "hello there"
    assert d.renames == []
