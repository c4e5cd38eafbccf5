"""Context packing: token budgets, newest first, and no re-tokenizing of stored history."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import insert

from threadline import AsyncThreadline, tokens
from threadline.context import pack
from threadline.messages import ChatMessage
from threadline.store import Store, new_id
from threadline.store.schema import conversations, messages


async def _seed(store: Store, n: int, text_len: int = 40) -> str:
    cid = new_id()
    now = time.time()
    async with store.engine.begin() as conn:
        await conn.execute(insert(conversations).values(
            id=cid, app="demo", user="u", engine="acc", name="big", inputs={}, remote={}, last_seq=n,
            created_at=now, updated_at=now, deleted=False))
        rows = []
        for i in range(1, n + 1):
            role = "user" if i % 2 else "assistant"
            text = f"m{i:05d} " + "x" * text_len
            rows.append({"id": new_id(), "conversation_id": cid, "seq": i, "role": role, "content": text,
                         "parts": None, "reasoning": None, "status": "completed", "error": None, "usage": None,
                         "price": None, "engine": "acc", "model": "m", "token_estimate": tokens.estimate_message(text),
                         "parent_id": None, "task_id": None, "remote_id": None, "inputs": None, "feedback": None,
                         "latency": None, "stop_requested": False, "created_at": now + i, "updated_at": now + i})
        await conn.execute(insert(messages), rows)
    return cid


async def test_ten_thousand_messages_pack_only_what_fits_newest_first(sqlite_url, monkeypatch):
    store = Store(sqlite_url)
    await store.migrate()
    cid = await _seed(store, 10_000)
    calls = []
    real = tokens.estimate_text

    def counting(text: str) -> int:
        calls.append(len(text))
        return real(text)

    monkeypatch.setattr("threadline.context.estimate_text", counting)
    per_msg = tokens.estimate_message("m00001 " + "x" * 40)
    budget = 1000
    packed = await pack(store, cid, before_seq=10_001, system_modules=["sys"], memories=[("likes tea", 3)],
                        new_message=ChatMessage("user", "new"), new_message_tokens=5, budget=budget)
    assert packed.estimated_tokens <= budget
    assert packed.history_dropped
    n = packed.history_used
    assert n == (budget - 5 - 3 - 12 - real("sys")) // per_msg
    texts = [m.text for m in packed.messages]
    # newest history, in order, then the new message; history starts on a user turn
    assert texts[-1] == "new"
    assert texts[-2].startswith("m10000")
    assert packed.messages[0].role == "user"
    # only system modules were tokenized; the 10,000 stored messages were not
    assert len(calls) == 1
    await store.close()


async def test_large_conversation_continues_through_the_api(oai, sqlite_url):
    d, url = oai
    engines = {"acc": {"kind": "openai", "base_url": f"{url}/v1", "api_key": "sk-test-double-key", "model": "m",
                       "context_window": 3000, "max_output_tokens": 500}}
    async with AsyncThreadline(database_url=sqlite_url, engines=engines, apps={"demo": {"engine": "acc"}},
                               include_presets=False) as tl:
        await tl.gateway.start()
        cid = await _seed(tl.gateway.store, 10_000)
        r = await tl.chat("latest question", user="u", app="demo", conversation_id=cid)
        assert r.answer == "Answer to: latest question"
        sent = d.requests[-1]["messages"]
        assert 10 < len(sent) < 200
        assert sent[-1]["content"] == "latest question"
        assert sent[-2]["content"].startswith("m10000")
        assert len(await tl.messages(cid, user="u", limit=20000)) == 10_002


@pytest.mark.parametrize("text,low,high", [("hello world", 2, 4), ("你好世界", 4, 4), ("", 0, 0)])
def test_estimates_are_offline_and_sane(text, low, high):
    assert low <= tokens.estimate_text(text) <= high


def test_calibration_moves_towards_reported_usage():
    c = tokens.Calibration()
    assert c.ratio("e") > 1.0
    for _ in range(10):
        c.observe("e", 100, 200)
    assert 1.9 < c.ratio("e") <= 2.0


def test_token_estimate_counts_ascii_by_fours_and_every_other_character_as_one():
    import random

    from threadline.tokens import estimate_text

    def by_definition(text: str) -> int:
        ascii_count = sum(1 for ch in text if ord(ch) < 128)
        return -(-ascii_count // 4) + len(text) - ascii_count

    rng = random.Random(3)
    alphabet = "ab c\n\x00\x7f" + "é中文😀\u2028" + "\udc80"  # a lone surrogate, as a bad client might send
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert estimate_text(text) == by_definition(text), repr(text)
    assert estimate_text("") == 0
    assert estimate_text("abcde") == 2
    assert estimate_text("中文") == 2
