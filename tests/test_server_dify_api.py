"""The Dify-compatible and OpenAI-compatible surfaces against a live `threadline serve`-style server
on 127.0.0.1, with a stateless engine double behind the app."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import SHARED
from tests.doubles.live import LiveServer
from threadline.config import Settings
from threadline.server import dify_api
from threadline.server.app import create_app
from threadline.server.keys import create_key

FIXTURES = SHARED / "fixtures" / "dify"
SEEDS = SHARED / "seeds"


@pytest.fixture
def server(oai, image_host, tmp_path):
    d, url = oai
    settings = Settings.build(
        database_url=f"sqlite+aiosqlite:///{tmp_path}/srv.db",
        engines={"acc": {"kind": "openai", "base_url": f"{url}/v1", "api_key": "sk-test-double-key", "model": "m"}},
        apps={"demo": {"engine": "acc", "system": ["You are terse."], "opening_statement": "Hi!"}},
        include_presets=False,
    )
    import asyncio

    key = asyncio.run(create_key(settings, "demo"))
    srv = LiveServer(create_app(settings)).start()
    yield srv.url, key, d
    srv.stop()


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def same_shape(ours, theirs, path="$"):
    """Same keys (ours may add), same JSON types, recursively (first list item)."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict), path
        missing = set(theirs) - set(ours)
        assert not missing, f"{path}: missing keys {missing}"
        for k in theirs:
            if k in ("inputs", "tool_icons"):  # app-defined contents
                assert isinstance(ours[k], dict)
                continue
            if theirs[k] is not None and ours[k] is not None:
                same_shape(ours[k], theirs[k], f"{path}.{k}")
    elif isinstance(theirs, list):
        assert isinstance(ours, list), path
        if theirs and ours:
            same_shape(ours[0], theirs[0], f"{path}[0]")
    elif isinstance(theirs, bool):
        assert isinstance(ours, bool), path
    elif isinstance(theirs, int | float):
        assert isinstance(ours, int | float) and not isinstance(ours, bool), path
    else:
        assert type(ours) is type(theirs), f"{path}: {type(ours)} vs {type(theirs)}"


def run_seed(script: str, base: str, key: str, tmp_path: Path, image_url: str) -> str:
    """Run the user's own script unchanged except API_BASE, the key, and the public image URL."""
    src = (SEEDS / script).read_text()
    src = src.replace('API_BASE = "https://api.dify.ai/v1"', f'API_BASE = "{base}/v1"')
    src = src.replace("https://cloud.dify.ai/logo/logo-site.png", image_url)
    p = tmp_path / script
    p.write_text(src)
    env = {**os.environ, "DIFY_API_KEY": key}
    out = subprocess.run([sys.executable, str(p)], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_seed_single_turn_script_runs_unchanged(server, tmp_path, image_host):
    base, key, d = server
    out = run_seed("single_turn.py", base, key, tmp_path, f"{image_host}/img/blue.png")
    assert "Answer: Answer to:" in out and "Conversation ID:" in out
    last = d.requests[-1]["messages"][-1]["content"]
    assert {"type": "image_url", "image_url": {"url": f"{image_host}/img/blue.png"}} in last


def test_seed_multi_turn_script_carries_turn_one_into_turn_two(server, tmp_path, image_host):
    base, key, d = server
    out = run_seed("multi_turn.py", base, key, tmp_path, f"{image_host}/img/blue.png")
    assert "[Turn 2] Answer: Answer to: 好的" in out
    turn2 = d.requests[-1]["messages"]
    assert [m["role"] for m in turn2] == ["system", "user", "assistant", "user"]
    assert "请根据这张图片" in json.dumps(turn2[1]["content"], ensure_ascii=False)
    assert "[History] has_more: False" in out
    assert out.count("  A: Answer to:") == 2


def test_blocking_and_streaming_shapes_match_recorded_dify(server):
    base, key, _ = server
    h = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=base, headers=h) as c:
        r = c.post("/v1/chat-messages", json={"inputs": {}, "query": "hello", "user": "alice", "response_mode": "blocking",
                                              "conversation_id": ""})
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/json")
        assert float(r.headers["x-threadline-overhead-ms"]) >= 0
        same_shape(r.json(), fixture("010-blocking-new")["response"]["json"])
        assert list(r.json()) == list(fixture("010-blocking-new")["response"]["json"])
        cid = r.json()["conversation_id"]
        with c.stream("POST", "/v1/chat-messages", json={"inputs": {}, "query": "stream me", "user": "alice",
                                                          "response_mode": "streaming", "conversation_id": cid}) as s:
            raw = s.read().decode()
        assert raw.startswith("event: ping\n\n")
        events = [json.loads(line[6:]) for line in raw.split("\n\n") if line.startswith("data: ")]
        kinds = [e["event"] for e in events]
        assert kinds[-1] == "message_end" and "message" in kinds
        recorded = [json.loads(x[6:]) for x in (FIXTURES / "020-stream-new.sse").read_text().split("\n\n") if x.startswith("data: ")]
        rec = {e["event"]: e for e in recorded}
        same_shape(next(e for e in events if e["event"] == "message"), rec["message"])
        end = events[-1]
        same_shape(end, rec["message_end"])
        assert all(isinstance(end["metadata"]["usage"][k], str) for k in ("prompt_price", "total_price"))
        assert "".join(e["answer"] for e in events if e["event"] == "message") == "Answer to: stream me"
        m = c.get("/v1/messages", params={"conversation_id": cid, "user": "alice"}).json()
        same_shape(m, fixture("040-messages-default")["response"]["json"])
        assert [x["query"] for x in m["data"]] == ["hello", "stream me"]
        convs = c.get("/v1/conversations", params={"user": "alice", "limit": 2}).json()
        same_shape(convs, fixture("050-conversations-limit2")["response"]["json"])
        renamed = c.post(f"/v1/conversations/{cid}/name", json={"name": "Renamed chat", "user": "alice"})
        same_shape(renamed.json(), fixture("054-rename")["response"]["json"])
        assert renamed.json()["name"] == "Renamed chat"
        assert c.post(f"/v1/messages/{m['data'][0]['id']}/feedbacks", json={"rating": "like", "user": "alice"}).json() == {"result": "success"}
        for path, name in [("/v1/parameters", "001-parameters"), ("/v1/info", "002-info"), ("/v1/meta", "003-meta")]:
            same_shape(c.get(path).json(), fixture(name)["response"]["json"])
        d = c.request("DELETE", f"/v1/conversations/{cid}", json={"user": "alice"})
        assert d.status_code == 204 and d.content == b""


ERROR_CASES = ["061-delete-again", "080-err-unknown-conversation", "081-err-other-users-conversation",
               "083-err-conversation-id-not-uuid", "084-err-missing-query", "085-err-empty-query",
               "086-err-missing-user", "087-err-bad-api-key", "088-err-no-auth-header", "089-err-auth-not-bearer",
               "090-err-empty-body-json", "091-err-no-body", "092-err-empty-object", "093-err-invalid-json",
               "094-err-invalid-response-mode", "095-err-files-missing-upload-id", "096-err-files-unknown-upload-id",
               "098-err-files-bad-transfer-method", "100-err-files-not-a-list", "113-err-upload-no-file",
               "115-err-upload-json", "116-err-messages-unknown-conversation",
               "117-err-messages-missing-conversation-id", "118-err-conversations-limit-too-big",
               "119-err-rename-other-user", "120-err-delete-unknown", "122-err-wrong-method",
               "056-rename-missing-name", "111-err-upload-blocked-extension", "110-err-upload-too-large",
               "114-err-upload-two-files"]


@pytest.mark.parametrize("name", ERROR_CASES)
def test_recorded_error_cases_get_the_same_status_and_shape(server, name):
    base, key, _ = server
    fx = fixture(name)
    req = fx["request"]
    headers = {k: v for k, v in req["headers"].items() if k.lower() not in ("content-length", "host")}
    if "Authorization" in headers:
        headers["Authorization"] = headers["Authorization"].replace("<KEY>", key)
    with httpx.Client(base_url=base) as c:
        # conversations the recording refers to exist here under our own ids
        own = c.post("/v1/chat-messages", headers={"Authorization": f"Bearer {key}"},
                     json={"query": "hello", "user": "alice", "inputs": {}}).json()["conversation_id"]
        url = req["url"]
        for old in ("9d3e3d72-a6a8-4a7e-989c-12cbe5bd7524",):
            url = url.replace(old, own)
        params = dict(req.get("query") or {})
        if params.get("conversation_id") == "9d3e3d72-a6a8-4a7e-989c-12cbe5bd7524":
            params["conversation_id"] = own
        kwargs: dict = {"headers": headers, "params": params}
        if "json" in req and req["json"] is not None:
            body = dict(req["json"]) if isinstance(req["json"], dict) else req["json"]
            if isinstance(body, dict) and body.get("conversation_id") == "9d3e3d72-a6a8-4a7e-989c-12cbe5bd7524":
                body["conversation_id"] = own
            kwargs["content"] = json.dumps(body)
        elif "body_raw" in req:
            kwargs["content"] = req["body_raw"] or b""
        elif "multipart" in req:
            mp = req["multipart"]
            headers.pop("Content-Type", None)
            files = []
            flist = mp.get("files") or ([mp["file"]] if mp.get("file") else [])
            for f in flist:
                if isinstance(f, str):  # "field=filename"
                    field, _, fname = f.partition("=")
                    f = {"field": field, "filename": fname, "size": 10}
                size = f.get("size", 10)
                files.append((f.get("field", "file"), (f.get("filename", "x.png"), b"\x89PNG" + b"0" * max(0, size - 4),
                                                       f.get("content_type", "image/png"))))
            kwargs["data"] = mp.get("fields", {})
            kwargs["files"] = files or None
        r = c.request(req["method"], url, **kwargs)
    want = fx["response"]
    assert r.status_code == want["status"], (r.status_code, r.text)
    if want["json"] is not None:
        same_shape(r.json(), want["json"])
        assert r.json()["code"] == want["json"]["code"]


def test_other_user_gets_404_and_stop_of_unknown_task_succeeds(server):
    base, key, _ = server
    h = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=base, headers=h) as c:
        cid = c.post("/v1/chat-messages", json={"query": "hi", "user": "alice", "inputs": {}}).json()["conversation_id"]
        r = c.post("/v1/chat-messages", json={"query": "hi", "user": "bob", "inputs": {}, "conversation_id": cid})
        assert r.status_code == 404 and r.json()["message"].startswith("Conversation Not Exists.")
        assert c.get("/v1/messages", params={"conversation_id": cid, "user": "bob"}).status_code == 404
        r = c.post("/v1/chat-messages/00000000-0000-0000-0000-000000000001/stop", json={"user": "alice"})
        assert r.status_code == 200 and r.json() == {"result": "success"}


def test_stop_during_slow_stream_ends_within_a_second_and_keeps_partial(server):
    base, key, d = server
    d.reset(reply="word " * 400, chunk_size=5, slow=0.05)
    h = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=base, headers=h, timeout=30) as c:
        got, task_id, cid = "", None, None
        with c.stream("POST", "/v1/chat-messages", json={"query": "long", "user": "alice", "inputs": {},
                                                         "response_mode": "streaming"}) as s:
            t_stop = None
            for line in s.iter_lines():
                if not line.startswith("data: "):
                    continue
                ev = json.loads(line[6:])
                if ev["event"] == "message":
                    got += ev["answer"]
                    task_id, cid = ev["task_id"], ev["conversation_id"]
                    if len(got) >= 50 and t_stop is None:
                        t_stop = time.monotonic()
                        with httpx.Client(base_url=base, headers=h) as c2:
                            assert c2.post(f"/v1/chat-messages/{task_id}/stop", json={"user": "alice"}).status_code == 200
                last = ev
                assert ev["event"] != "message_end"  # Dify ends a stopped stream without one (fixture 070)
            elapsed = time.monotonic() - t_stop
        assert elapsed < 1.0
        assert last["event"] == "workflow_finished" and last["data"]["status"] == "stopped"
        m = c.get("/v1/messages", params={"conversation_id": cid, "user": "alice"}).json()["data"][-1]
        assert m["answer"] == got and 50 <= len(got) < len("word " * 400)
        assert m["threadline_status"] == "stopped"


def test_dify_client_sdk_end_to_end(server, tmp_path):
    from dify_client import ChatClient

    base, key, d = server
    client = ChatClient(key)
    client.base_url = f"{base}/v1"
    r = client.create_chat_message(inputs={}, query="hello sdk", user="sdk", response_mode="blocking")
    r.raise_for_status()
    cid = r.json()["conversation_id"]
    s = client.create_chat_message(inputs={}, query="stream sdk", user="sdk", response_mode="streaming",
                                   conversation_id=cid)
    answer = ""
    for line in s.iter_lines(decode_unicode=True):
        if line and line.startswith("data: "):
            ev = json.loads(line[6:])
            if ev["event"] == "message":
                answer += ev["answer"]
    assert answer == "Answer to: stream sdk"
    msgs = client.get_conversation_messages("sdk", cid).json()
    assert [m["query"] for m in msgs["data"]] == ["hello sdk", "stream sdk"]
    convs = client.get_conversations("sdk").json()
    assert convs["data"][0]["id"] == cid
    assert client.rename_conversation(cid, "named", "sdk").json()["name"] == "named"
    png = tmp_path / "red.png"
    png.write_bytes((FIXTURES / "assets" / "red.png").read_bytes())
    with png.open("rb") as fh:
        up = client.file_upload("sdk", {"file": ("red.png", fh, "image/png")})
    assert up.status_code == 201
    fid = up.json()["id"]
    r = client.create_chat_message(inputs={}, query="see upload", user="sdk", response_mode="blocking",
                                   files=[{"type": "image", "transfer_method": "local_file", "upload_file_id": fid}])
    assert r.status_code == 200, r.text
    img = d.requests[-1]["messages"][-1]["content"][1]["image_url"]["url"]
    assert img.startswith("data:image/png;base64,")
    # dify-client 0.1.10 has no delete method; delete as its newer releases do (DELETE with a JSON {user})
    r = httpx.request("DELETE", f"{base}/v1/conversations/{cid}", headers={"Authorization": f"Bearer {key}"},
                      json={"user": "sdk"})
    assert r.status_code == 204
    assert client.get_conversation_messages("sdk", cid).status_code == 404


def test_openai_sdk_blocking_and_streaming_continue_one_conversation(server):
    import openai

    base, key, d = server
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
    msgs = [{"role": "user", "content": "first"}]
    r = client.chat.completions.create(model="demo", messages=msgs, user="o1")
    assert r.choices[0].message.content == "Answer to: first"
    msgs += [{"role": "assistant", "content": r.choices[0].message.content}, {"role": "user", "content": "second"}]
    text, usage = "", None
    for chunk in client.chat.completions.create(model="demo", messages=msgs, user="o1", stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text == "Answer to: second" and usage.total_tokens > 0
    # mapped onto the same stored conversation: one conversation, two turns
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}) as c:
        convs = c.get("/v1/conversations", params={"user": "o1"}).json()["data"]
        assert len(convs) == 1
        m = c.get("/v1/messages", params={"conversation_id": convs[0]["id"], "user": "o1"}).json()["data"]
        assert [x["query"] for x in m] == ["first", "second"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=msgs)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="bad", max_retries=0).chat.completions.create(model="demo", messages=msgs)
    assert {m.id for m in client.models.list()} >= {"demo", "acc"}



async def test_only_a_server_that_owns_its_process_freezes_its_startup_heap(sqlite_url):
    """`threadline serve` moves its startup objects out of the collector's sight (server/app.py says
    why); an app built by someone else's program leaves their process's GC alone."""
    import gc

    from threadline.config import Settings
    from threadline.server.app import create_app

    settings = Settings.build(database_url=sqlite_url, engines={}, apps={}, include_presets=False)
    gc.unfreeze()
    thresholds = gc.get_threshold()
    try:
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            assert gc.get_freeze_count() == 0 and gc.get_threshold() == thresholds
        app = create_app(settings, own_process=True)
        async with app.router.lifespan_context(app):
            assert gc.get_freeze_count() > 10_000  # the modules and the app, at least
            assert gc.get_threshold()[0] == 10_000
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def test_chat_routes_fail_unexpectedly_in_their_own_shape_and_keep_details_private(oai, tmp_path, caplog):
    """The chat routes run in the server's fast lane (server/app.py): an unexpected failure there must
    still be the surface's own generic 500, carry the overhead header, and keep its message (which
    might hold a secret) out of both the answer and the log."""
    from threadline.gateway import Gateway

    settings = Settings.build(database_url=f"sqlite+aiosqlite:///{tmp_path}/x.db",
                              engines={"acc": {"kind": "openai", "base_url": f"{oai[1]}/v1", "model": "m"}},
                              apps={"demo": {"engine": "acc"}}, include_presets=False)
    gw = Gateway(settings)

    async def broken(*args, **kwargs):
        raise RuntimeError("sk-live-0123456789 leaked into a message")
        yield

    gw.turn = broken  # type: ignore[method-assign]
    srv = LiveServer(create_app(settings, open_access=True, gateway=gw)).start()
    try:
        with httpx.Client(base_url=srv.url) as c:
            r = c.post("/v1/chat-messages", json={"query": "hi", "user": "u", "inputs": {}, "response_mode": "blocking"})
            assert r.status_code == 500
            assert r.json() == {"code": "internal_server_error", "status": 500,
                                "message": "Internal Server Error, please contact support."}
            assert float(r.headers["x-threadline-overhead-ms"]) >= 0
            r = c.post("/v1/chat/completions", json={"model": "default", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 500
            assert r.json()["error"]["type"] == "api_error" and r.json()["error"]["code"] == "internal_server_error"
            assert "sk-live" not in r.text
            # Other methods on the same path still take the full stack.
            r = c.get("/v1/chat-messages")
            assert r.status_code == 405 and r.json()["code"] == "method_not_allowed"
    finally:
        srv.stop()
    assert "unhandled RuntimeError on /v1/chat-messages" in caplog.text
    assert "sk-live" not in caplog.text


def test_a_slow_stream_is_kept_alive_with_pings_and_loses_nothing(server, monkeypatch):
    url, key, d = server
    monkeypatch.setattr(dify_api, "PING_INTERVAL", 0.05)
    d.reset(reply="one two three four", chunk_size=4, slow=0.15)
    frames = []
    with httpx.stream("POST", f"{url}/v1/chat-messages", headers={"Authorization": f"Bearer {key}"}, timeout=30,
                      json={"inputs": {}, "query": "q", "user": "u", "response_mode": "streaming"}) as r:
        for line in r.iter_lines():
            if line.startswith("event: ping"):
                frames.append("ping")
            elif line.startswith("data: "):
                frames.append(json.loads(line[6:]))
    answer = "".join(f["answer"] for f in frames if isinstance(f, dict) and f["event"] == "message")
    assert answer == "one two three four"
    first_message = next(i for i, f in enumerate(frames) if isinstance(f, dict))
    assert "ping" in frames[first_message:]  # pinged while waiting between chunks, not only at the start
    assert frames[-1]["event"] == "message_end"


@pytest.mark.parametrize("route", ["dify", "openai"])
def test_a_client_hanging_up_mid_stream_stops_the_turn_and_keeps_the_partial(server, route):
    """Nobody is reading any more: the engine call must end (not run on for nobody) and what came
    must be stored as stopped."""
    url, key, d = server
    d.reset(reply="w " * 200, chunk_size=2, slow=0.02)
    h = {"Authorization": f"Bearer {key}"}
    if route == "dify":
        path, body = "/v1/chat-messages", {"inputs": {}, "query": "q", "user": "u", "response_mode": "streaming"}
    else:
        path, body = "/v1/chat/completions", {"model": "demo", "messages": [{"role": "user", "content": "q"}],
                                              "stream": True, "user": "u"}
    with httpx.Client(base_url=url, headers=h, timeout=30) as c:
        with c.stream("POST", path, json=body) as r:
            seen = 0
            for line in r.iter_lines():
                if '"answer"' in line or '"content": "w' in line or '"content":"w' in line:
                    seen += 1
                    if seen == 3:
                        cid = json.loads(line[6:]).get("conversation_id") or r.headers["x-threadline-conversation-id"]
                        break
        # The connection is closed here, mid-answer.
        deadline = time.monotonic() + 5
        while True:
            msgs = c.get("/v1/messages", params={"conversation_id": cid, "user": "u"}).json()["data"]
            if (msgs and msgs[-1]["threadline_status"] != "streaming") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert msgs[-1]["threadline_status"] == "stopped"
    assert msgs[-1]["answer"].startswith("w w") and len(msgs[-1]["answer"]) < 400
    requests_before = len(d.requests)
    time.sleep(0.3)
    assert len(d.requests) == requests_before  # and nothing retried the call behind the client's back


# GET /app/feedbacks as the reference describes it (../shared/reference/dify-api.md §2.7; no recording):
# `{"data": [...]}`, times as ISO strings (MessageFeedback.to_dict), no has_more.
DIFY_APP_FEEDBACKS = {"data": [{
    "id": "8c0fbed8-e2f9-49ff-9f0e-15a35bdd0e25", "app_id": "f252d396-fe48-450e-94ec-e184218e7346",
    "conversation_id": "2397604b-9deb-430e-b285-4726e51fd62d", "message_id": "709c0b0f-0a96-4a4e-91a4-ec0889937b11",
    "rating": "like", "content": "message feedback information-3", "from_source": "user",
    "from_end_user_id": "74286412-9a1a-42c1-929c-01edb1d381d5", "from_account_id": None,
    "created_at": "2025-04-24T09:24:38", "updated_at": "2025-04-24T09:24:38"}]}


def test_app_feedbacks_lists_the_apps_feedbacks_paged_as_dify(server):
    base, key, _ = server
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}) as c:
        assert c.get("/v1/app/feedbacks").json() == {"data": []}
        answers = []
        for user, q in (("alice", "one"), ("bob", "two"), ("alice", "three")):
            r = c.post("/v1/chat-messages", json={"query": q, "user": user, "inputs": {}})
            answers.append((user, r.json()["conversation_id"], r.json()["message_id"]))
        (u1, c1, m1), (u2, c2, m2), (u3, _, m3) = answers
        started = time.time()
        for (user, _, mid), rating, content in zip(answers, ("like", "dislike", "like"), ("nice", None, "ok"),
                                                   strict=True):
            r = c.post(f"/v1/messages/{mid}/feedbacks", json={"rating": rating, "user": user, "content": content})
            assert r.json() == {"result": "success"}
            time.sleep(0.01)
        page = c.get("/v1/app/feedbacks").json()
        same_shape(page, DIFY_APP_FEEDBACKS)
        assert set(page) == {"data"}
        assert [(f["message_id"], f["rating"], f["content"], f["from_end_user_id"]) for f in page["data"]] == [
            (m3, "like", "ok", "alice"), (m2, "dislike", None, "bob"), (m1, "like", "nice", "alice")]
        first = page["data"][-1]
        assert first["conversation_id"] == c1 and first["app_id"] == "demo" and first["from_source"] == "user"
        assert first["from_account_id"] is None
        stamp = datetime.datetime.fromisoformat(first["created_at"]).replace(tzinfo=datetime.UTC).timestamp()
        assert started - 2 <= stamp <= time.time() + 1 and first["updated_at"] == first["created_at"]
        assert len({f["id"] for f in page["data"]}) == 3
        # paging: page and limit, as Dify's offset pages
        assert [f["message_id"] for f in c.get("/v1/app/feedbacks", params={"limit": 2}).json()["data"]] == [m3, m2]
        assert [f["message_id"] for f in c.get("/v1/app/feedbacks", params={"limit": 2, "page": 2}).json()["data"]] == [m1]
        assert c.get("/v1/app/feedbacks", params={"limit": 2, "page": 3}).json() == {"data": []}
        # changing a rating moves it to the front and keeps its id and first time; removing drops it
        keep = next(f for f in page["data"] if f["message_id"] == m1)
        time.sleep(1.1)
        c.post(f"/v1/messages/{m1}/feedbacks", json={"rating": "dislike", "user": u1})
        now = c.get("/v1/app/feedbacks").json()["data"]
        assert now[0]["message_id"] == m1 and now[0]["rating"] == "dislike" and now[0]["id"] == keep["id"]
        assert now[0]["created_at"] == keep["created_at"] and now[0]["updated_at"] > keep["updated_at"]
        c.post(f"/v1/messages/{m2}/feedbacks", json={"rating": None, "user": u2})
        assert [f["message_id"] for f in c.get("/v1/app/feedbacks").json()["data"]] == [m1, m3]
        # /messages still shows a feedback as before: its rating (and content)
        msgs = c.get("/v1/messages", params={"conversation_id": c1, "user": u1}).json()["data"]
        assert msgs[0]["feedback"] == {"rating": "dislike", "content": None}
        # a deleted conversation's feedback is gone with it
        c.request("DELETE", f"/v1/conversations/{c1}", json={"user": u1})
        assert [f["message_id"] for f in c.get("/v1/app/feedbacks").json()["data"]] == [m3]
        assert u3 == "alice"
        for bad in ({"limit": 0}, {"limit": 102}, {"page": 0}, {"page": "x"}):
            r = c.get("/v1/app/feedbacks", params=bad)
            assert r.status_code == 400 and r.json()["code"] == "invalid_param", (bad, r.text)
    r = httpx.get(f"{base}/v1/app/feedbacks")
    assert r.status_code == 401


# ---- suggested questions after an answer (issue 17, item 5) ------------------------------------------


@pytest.fixture
def suggest_server(oai, tmp_path):
    """Apps: `plain` (suggestions off), `sugg` (on, the stateless double), `dsugg` (on, the Dify double)."""
    from tests.doubles.dify_double import DifyDouble

    d, url = oai
    dd = DifyDouble()
    dsrv = LiveServer(dd.app()).start()
    settings = Settings.build(
        database_url=f"sqlite+aiosqlite:///{tmp_path}/sugg.db",
        engines={"acc": {"kind": "openai", "base_url": f"{url}/v1", "api_key": "sk-test-double-key", "model": "m"},
                 "dify": {"kind": "dify", "base_url": f"{dsrv.url}/v1", "api_key": dd.api_key, "max_retries": 0}},
        apps={"plain": {"engine": "acc"}, "sugg": {"engine": "acc", "suggested_questions_after_answer": True},
              "dsugg": {"engine": "dify", "suggested_questions_after_answer": True}},
        include_presets=False,
    )
    import asyncio

    keys = {a: asyncio.run(create_key(settings, a)) for a in ("plain", "sugg", "dsugg")}
    srv = LiveServer(create_app(settings)).start()
    yield srv.url, keys, d, dd
    srv.stop()
    dsrv.stop()


def _ask(c: httpx.Client, query: str, user: str = "alice", cid: str = "") -> dict:
    r = c.post("/v1/chat-messages", json={"query": query, "user": user, "inputs": {}, "conversation_id": cid})
    assert r.status_code == 200, r.text
    return r.json()


def test_suggested_disabled_answers_as_recorded_dify(suggest_server):
    base, keys, _, _ = suggest_server
    rec = fixture("121-err-suggested-disabled")["response"]
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {keys['plain']}"}) as c:
        mid = _ask(c, "hello")["message_id"]
        params = c.get("/v1/parameters").json()
        assert params["suggested_questions_after_answer"] == {"enabled": False}
        r = c.get(f"/v1/messages/{mid}/suggested", params={"user": "alice"})
        assert (r.status_code, r.json()) == (rec["status"], rec["json"])  # 400 bad_request, recording 121
        assert r.headers["content-type"] == "application/json"
        # Dify looks the message up first: someone else's (or none) is not found, feature or not
        for who, ident in (("mallory", mid), ("alice", "6b1f4f2e-0000-4000-8000-000000000000")):
            r = c.get(f"/v1/messages/{ident}/suggested", params={"user": who})
            assert (r.status_code, r.json()) == (404, {"code": "not_found", "message": "Message Not Exists.",
                                                       "status": 404})
        r = c.get(f"/v1/messages/{mid}/suggested")
        assert (r.status_code, r.json()["message"]) == (400, "Arg user must be provided.")


def test_suggested_asks_the_stateless_engine_once_about_the_exchange(suggest_server):
    base, keys, d, _ = suggest_server
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {keys['sugg']}"}) as c:
        assert c.get("/v1/parameters").json()["suggested_questions_after_answer"] == {"enabled": True}
        first = _ask(c, "Tell me about tea")
        second = _ask(c, "And green tea?", cid=first["conversation_id"])
        before = len(d.requests)
        d.answer_hook = lambda body: '["What is matcha?", "How hot should the water be?", "Is it healthy?"]'
        r = c.get(f"/v1/messages/{second['message_id']}/suggested", params={"user": "alice"})
        assert r.status_code == 200, r.text
        # Dify's answer (reference §2.7 and its docs): {"result": "success", "data": [three strings]}
        assert r.json() == {"result": "success",
                            "data": ["What is matcha?", "How hot should the water be?", "Is it healthy?"]}
        assert list(r.json()) == ["result", "data"]
        asked = d.requests[before:]
        assert len(asked) == 1  # once, stateless: an instruction and this exchange, no earlier turn
        msgs = asked[0]["messages"]
        assert [m["role"] for m in msgs] == ["system", "user"]
        assert "three follow-up questions" in msgs[0]["content"]
        assert "And green tea?" in msgs[1]["content"] and "Answer to: And green tea?" in msgs[1]["content"]
        assert "Tell me about tea" not in json.dumps(asked)
        # an answer that is no JSON array: its lines; a failing engine: no suggestions (as Dify's)
        d.answer_hook = lambda body: "1. Why?\n2. How?\n3. When?\n4. Where?"
        r = c.get(f"/v1/messages/{first['message_id']}/suggested", params={"user": "alice"})
        assert r.json() == {"result": "success", "data": ["Why?", "How?", "When?"]}
        d.answer_hook = None
        d.fault = "500"
        r = c.get(f"/v1/messages/{first['message_id']}/suggested", params={"user": "alice"})
        assert (r.status_code, r.json()) == (200, {"result": "success", "data": []})
        d.fault = None
        # nothing was stored: the conversation has its two turns, as before
        m = c.get("/v1/messages", params={"conversation_id": first["conversation_id"], "user": "alice"}).json()
        assert [x["query"] for x in m["data"]] == ["Tell me about tea", "And green tea?"]
        # ownership as every message route: another user's or another app's message is not found
        r = c.get(f"/v1/messages/{second['message_id']}/suggested", params={"user": "mallory"})
        assert r.status_code == 404 and r.json()["message"] == "Message Not Exists."
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {keys['dsugg']}"}) as c:
        r = c.get(f"/v1/messages/{second['message_id']}/suggested", params={"user": "alice"})
        assert r.status_code == 404 and r.json()["message"] == "Message Not Exists."


def test_suggested_over_a_dify_engine_relays_difys_own(suggest_server):
    base, keys, _, dd = suggest_server
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {keys['dsugg']}"}) as c:
        mid = _ask(c, "hello dify")["message_id"]
        remote = dd.conversations[dd.conversations_by_query("hello dify")]["messages"][-1]["id"]
        dd.suggestions = ["one?", "two?", "three?"]
        r = c.get(f"/v1/messages/{mid}/suggested", params={"user": "alice"})
        assert r.json() == {"result": "success", "data": ["one?", "two?", "three?"]}
        assert dd.suggest_calls[-1]["message_id"] == remote  # Dify's own id for the message, its own user
        assert dd.suggest_calls[-1]["user"] != "alice" and dd.suggest_calls[-1]["user"]
        dd.suggestions = None  # Dify's app has the feature off: Dify's refusal, as Dify words it
        r = c.get(f"/v1/messages/{mid}/suggested", params={"user": "alice"})
        assert (r.status_code, r.json()) == (400, {"code": "bad_request", "message": "Suggested Questions Is Disabled.",
                                                   "status": 400})
