"""Migration from a database the previous release made (issue 13: "a migration test from a database
made by the previous release").

tests/fixtures/prev_release_0003.db was written by commit 73a55f8 (Alembic head 0003) through its
public API with the strict doubles (tests/fixtures/make_prev_release_db.py says how, and how to make
the next one), and prev_release_0003.json holds what that release read back from it through the
Python API, `keys list` and the Dify-compatible HTTP surface. Each test copies the file, opens it with
the current code (the store migrates on start) and compares what this release reads back with what
the old one read, field by field: every conversation, message (content, role order, status,
reasoning, images, usage, engine, error), memory, uploaded file and app key.

Destructive migrations: on SQLite, Alembic's batch mode rebuilds a table to ALTER it (create a copy,
copy the rows, DROP the old table, rename). With `PRAGMA foreign_keys=ON` (the store turns it on for
every connection), dropping and rebuilding `conversations` fires `ON DELETE CASCADE` on `messages`:
such a migration once deleted every message while the conversations looked fine. So the row counts
of every table are checked against the counts the old release left, including the messages of the
deleted conversation that no read shows. Checked by hand on this commit: a scratch revision 0004
doing `batch_alter_table("conversations", recreate="always")` makes 4 tests here fail (messages
40 -> 0, every old history gone); a plain `op.add_column("messages", ...)` passes them all.

When a migration changes what the API shows on purpose (say, images move into a new `parts`
shape), change the comparison for that field here, in the open; never regenerate the fixture from
the new code (it would then test nothing).
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic.script import ScriptDirectory

from tests.doubles.dify_double import DifyDouble
from tests.doubles.live import LiveServer
from tests.fixtures.make_prev_release_db import (
    DB_NAME,
    MANIFEST_NAME,
    api_reads,
    config,
    http_reads,
    key_rows,
    row_counts,
)
from threadline import AsyncThreadline, NotFoundError
from threadline.config import Settings
from threadline.server.app import create_app
from threadline.server.keys import list_keys
from threadline.store import store as store_module

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MANIFEST: dict[str, Any] = json.loads((FIXTURES / MANIFEST_NAME).read_text(encoding="utf-8"))
CONVS = {k: (v["id"], v["app"], v["user"]) for k, v in MANIFEST["conversations"].items()}


def _json(value: Any) -> Any:
    """As the manifest stores it (JSON types: tuples become lists, floats keep their exact value)."""
    return json.loads(json.dumps(value, ensure_ascii=False))


# Fields this release added to what the API returns, with the value every pre-existing row must read
# as: an old message's items are its images (the only items the previous release could store), and
# it has no recorded finish reason.
ADDED_FIELDS: dict[str, Any] = {
    "items": lambda new: [{"type": "image", **{k: v for k, v in i.items() if k != "data" and v is not None}}
                          for i in new["items"]] == new["images"],
    "finish_reason": lambda new: new["finish_reason"] is None,
    # /v1/messages: an answer's function calls and its question's function outputs (none in old rows)
    "tool_calls": lambda new: new["tool_calls"] == [],
    "tool_results": lambda new: new["tool_results"] == [],
}


# Fields whose value this release changed on purpose, with what each old value must read as now.
# Issue 17: an uploaded image's URL in /v1/messages was the keyed, relative `/v1/files/<id>/preview`;
# it is now the absolute, signed `…/files/<id>/file-preview?timestamp=&nonce=&sign=` Dify gives.
CHANGED_FIELDS: list[tuple[re.Pattern[str], Callable[[Any, Any], bool]]] = [
    (re.compile(r"\.message_files\[\d+\]\.url$"),
     lambda new, old: (m := re.fullmatch(r"/v1/files/([0-9a-f-]{36})/preview", old)) is not None
     and re.fullmatch(rf"http://127\.0\.0\.1:\d+/files/{m[1]}/file-preview\?timestamp=\d+&nonce=[0-9a-f]{{32}}"
                      r"&sign=[A-Za-z0-9_%-]+", new) is not None),
]


def assert_same(new: Any, old: Any, path: str = "$") -> None:
    """Field by field, so a failure names the field that changed. A field added by this release
    must hold what an old row means (ADDED_FIELDS); nothing the previous release read may go."""
    if isinstance(old, dict) and isinstance(new, dict):
        added = set(new) - set(old)
        assert set(old) <= set(new) and added <= set(ADDED_FIELDS), \
            f"{path}: fields {sorted(new)} != {sorted(old)}"
        for k in added:
            assert ADDED_FIELDS[k](new), f"{path}.{k}: {new[k]!r} is not what an old row means"
        for k in old:
            assert_same(new[k], old[k], f"{path}.{k}")
    elif isinstance(old, list) and isinstance(new, list):
        assert len(new) == len(old), f"{path}: {len(new)} items, the previous release read {len(old)}"
        for i, (n, o) in enumerate(zip(new, old, strict=True)):
            assert_same(n, o, f"{path}[{i}]")
    else:
        for pattern, same in CHANGED_FIELDS:
            if pattern.search(path) and new != old:
                assert same(new, old), f"{path}: {new!r} is not what {old!r} reads as now"
                return
        assert new == old, f"{path}: {new!r} != {old!r} (previous release)"


@pytest.fixture(scope="module")
def dify_server() -> Iterator[tuple[DifyDouble, str]]:
    d = DifyDouble()
    srv = LiveServer(d.app()).start()
    yield d, srv.url
    srv.stop()


@pytest.fixture
def old_db(tmp_path: Path) -> Path:
    db = tmp_path / DB_NAME
    shutil.copyfile(FIXTURES / DB_NAME, db)
    return db


@pytest.fixture
def settings(old_db: Path, oai, gem, dify_server) -> Settings:
    engines, apps = config(oai[1], gem[1], dify_server[1], dify_server[0].reset().api_key)
    return Settings.build(database_url=f"sqlite+aiosqlite:///{old_db}", engines=engines, apps=apps,
                         include_presets=False)


@pytest.fixture
async def tl(settings: Settings) -> AsyncIterator[AsyncThreadline]:
    async with AsyncThreadline(settings=settings) as t:
        await t._gw()  # start: the store migrates the old file here
        yield t


def test_fixture_is_the_previous_releases_file(old_db: Path) -> None:
    """The file is as the old release left it: revision 0003, the rows the manifest counted."""
    con = sqlite3.connect(old_db)
    try:
        assert con.execute("SELECT version_num FROM alembic_version").fetchall() == [("0003",)]
    finally:
        con.close()
    assert MANIFEST["alembic_revision"] == "0003"
    # Written by the code of 73a55f8 (`git rev-parse 73a55f8:src`), with no uncommitted change in src/.
    assert MANIFEST["src_tree"] == "f4ea18f789c12e98767724fb1d6913d3da8e4847"
    assert MANIFEST["src_uncommitted_changes"] is False
    assert row_counts(old_db) == MANIFEST["row_counts"]
    assert (FIXTURES / DB_NAME).stat().st_size < 1_000_000


async def test_start_migrates_to_head_and_loses_no_row(tl: AsyncThreadline, old_db: Path) -> None:
    heads = ScriptDirectory(str(store_module._MIGRATIONS)).get_heads()
    assert len(heads) == 1
    con = sqlite3.connect(old_db)
    try:
        assert con.execute("SELECT version_num FROM alembic_version").fetchall() == [(heads[0],)]
        assert con.execute("PRAGMA foreign_key_check").fetchall() == []
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        con.close()
    # Every row of the old release is still there (a cascading table rebuild deletes messages).
    assert row_counts(old_db) == MANIFEST["row_counts"]


async def test_python_api_reads_what_the_previous_release_read(tl: AsyncThreadline) -> None:
    new = _json(await api_reads(tl, CONVS))
    assert_same(new, MANIFEST["api"], "api")
    # A few of the things the spread exists for, so the manifest cannot quietly lose them.
    msgs = MANIFEST["api"]["messages"]
    statuses = {m["status"] for ms in msgs.values() for m in ms}
    assert {"completed", "stopped", "failed"} <= statuses
    assert [m["engine"] for m in msgs["switch"]] == ["acc", "acc", "acc", "acc", "gem", "gem", "acc", "acc"]
    assert all(m["reasoning"] for m in msgs["r1"] if m["role"] == "assistant")
    assert all(m["reasoning"] for m in msgs["gemini"] if m["role"] == "assistant")
    assert msgs["images"][0]["images"] == [{"type": "image", "url": MANIFEST["image_url"]}]
    assert msgs["images"][2]["images"][0]["file_id"] in MANIFEST["files"]
    assert msgs["failed"][-1]["error"]["code"] and msgs["failed"][-1]["content"]
    assert all(m["usage"] for ms in msgs.values() for m in ms if m["role"] == "assistant")
    assert MANIFEST["api"]["conversations"]["renamed"]["name"] == "贝叶斯笔记"
    assert MANIFEST["api"]["conversations"]["dify"]["remote"]["dify"]["id"]
    assert sum(len(v) for v in MANIFEST["api"]["memories"].values()) == 3


async def test_deleted_conversation_stays_deleted(tl: AsyncThreadline) -> None:
    cid, app, user = CONVS["deleted"]
    assert cid not in {c.id for c in await tl.conversations(user=user, app=app, limit=100)}
    with pytest.raises(NotFoundError):
        await tl.conversation(cid, user=user, app=app)
    with pytest.raises(NotFoundError):
        await tl.messages(cid, user=user, app=app)


async def test_keys_are_listed_as_before(tl: AsyncThreadline, settings: Settings) -> None:
    assert_same(_json(key_rows(await list_keys(settings))), MANIFEST["keys"]["listed"], "keys")


async def test_http_surface_reads_what_the_previous_release_read(settings: Settings) -> None:
    srv = LiveServer(create_app(settings)).start()
    try:
        files = {fid: (f["app"], f["user"], f["name"]) for fid, f in MANIFEST["files"].items()}
        new = _json(await http_reads(srv.url, MANIFEST["keys"]["secrets"], CONVS, files))
        assert_same(new, MANIFEST["http"], "http")
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
            # The old keys still open their app (and only it); the revoked one stays revoked.
            r = await c.get("/v1/conversations", params={"user": "alice"},
                            headers={"Authorization": f"Bearer {MANIFEST['keys']['revoked_secret']}"})
            assert r.status_code == 401, r.text
            cid, _, user = CONVS["gemini"]
            r = await c.get("/v1/messages", params={"conversation_id": cid, "user": user},
                            headers={"Authorization": f"Bearer {MANIFEST['keys']['secrets']['demo']}"})
            assert r.status_code == 404, r.text
    finally:
        srv.stop()


def _old(label: str) -> list[dict[str, Any]]:
    return MANIFEST["api"]["messages"][label]


async def test_new_turn_continues_an_old_conversation_with_its_full_history(tl: AsyncThreadline, oai, old_db) -> None:
    od, _ = oai
    cid, app, user = CONVS["switch"]
    r = await tl.chat("Continue after the upgrade.", user=user, app=app, conversation_id=cid)
    assert r.status == "completed" and r.conversation_id == cid
    sent = od.requests[-1]["messages"]
    turns = [(m["role"], m["content"]) for m in sent if m["role"] != "system"]
    old = [(m["role"], m["content"]) for m in _old("switch")]
    assert turns == [*old, ("user", "Continue after the upgrade.")]
    system = " ".join(m["content"] for m in sent if m["role"] == "system")
    assert "You are terse." in system
    for mem in MANIFEST["api"]["memories"]["demo/alice"]:  # old long-term memory is packed as before
        assert mem["text"] in system
    msgs = [_json(m.__dict__) for m in await tl.messages(cid, user=user, app=app)]
    assert_same(msgs[:-2], _old("switch"), "messages")
    assert [(m["role"], m["status"]) for m in msgs[-2:]] == [("user", "completed"), ("assistant", "completed")]
    assert msgs[-1]["content"] == r.answer
    counts = dict(MANIFEST["row_counts"], messages=MANIFEST["row_counts"]["messages"] + 2)
    assert row_counts(old_db) == counts


async def test_new_turn_on_gemini_and_r1_replays_old_history_without_reasoning(tl: AsyncThreadline, oai, gem) -> None:
    gd, _ = gem
    cid, app, user = CONVS["gemini"]
    await tl.chat("One more.", user=user, app=app, conversation_id=cid)
    contents = gd.requests[-1]["contents"]
    got = [(c["role"], "".join(p.get("text", "") for p in c["parts"])) for c in contents]
    want = [("user" if m["role"] == "user" else "model", m["content"]) for m in _old("gemini")]
    assert got == [*want, ("user", "One more.")]
    assert "Considering" not in json.dumps(contents)

    od, _ = oai
    od.reset(provider="nim", answer_mode="think_tags")
    cid, app, user = CONVS["r1"]
    await tl.chat("And 89?", user=user, app=app, conversation_id=cid)
    sent = od.requests[-1]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user", "assistant", "user"]
    assert [m["content"] for m in sent[1:4]] == [m["content"] for m in _old("r1")[1:4]]
    assert "Let me think" not in json.dumps(sent)  # old reasoning is never replayed


async def test_new_turn_on_dify_uses_the_stored_remote_conversation(tl: AsyncThreadline, dify_server) -> None:
    d, _ = dify_server
    cid, app, user = CONVS["dify"]
    remote = MANIFEST["api"]["conversations"]["dify"]["remote"]["dify"]["id"]
    r = await tl.chat("after the upgrade", user=user, app=app, conversation_id=cid)
    assert r.status == "completed"
    # The old remote id is what Threadline asks Dify to continue; this double never saw it (it is a
    # fresh process), so Dify says so and Threadline seeds a new remote conversation with the history.
    assert d.requests[0]["conversation_id"] == remote
    assert d.requests[-1]["conversation_id"] == ""
    assert "hello dify" in d.requests[-1]["query"] and d.requests[-1]["query"].endswith("after the upgrade")


async def test_old_conversations_are_found_by_their_history(tl: AsyncThreadline) -> None:
    """Migration 0004 computes every old conversation's history hash: an OpenAI client resending an
    old conversation's messages continues it."""
    from threadline.turns import PastMessage

    await tl._gw()
    svc = tl.service
    found = 0
    for cid, app, user in CONVS.values():
        try:
            msgs = await tl.messages(cid, user=user, app=app)
        except NotFoundError:
            continue  # the deleted one
        history = [PastMessage(m.role, m.content, tuple(m.items)) for m in msgs]  # type: ignore[arg-type]
        assert await svc.find_conversation(svc.scope(app, user), history) == cid
        found += 1
    assert found >= 5
