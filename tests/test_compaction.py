"""Conversation compaction: a summary written by the engine stands in for older turns.

The doubles play the summariser too (`answer_hook`): asked with the summarising instruction, they
answer with the facts (`fact-NN`) they find in what they were sent, so what the summary holds is
exactly what the gateway gave the summariser. The turns' requests are then checked as the provider
received them: the summary in the system text, the turns it covers absent, the newest turns in order.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
from typing import Any

import pytest

from tests.conftest import engines_for
from threadline import (
    AsyncThreadline,
    CompactionUnavailableError,
    ConfigError,
    Settings,
    Threadline,
)
from threadline.errors import EngineNotAllowedError
from threadline.store import Store

FACT = re.compile(r"fact-\d+[a-z]?")
FILLER = "please keep this detail in mind for later " * 3


def _system_text(body: dict[str, Any]) -> str:
    """The system text of a request in either wire format (OpenAI messages, Gemini systemInstruction)."""
    if "systemInstruction" in body:
        return " ".join(p.get("text", "") for p in body["systemInstruction"]["parts"])
    return " ".join(m["content"] for m in body.get("messages", []) if m["role"] == "system")


def _all_text(body: dict[str, Any]) -> str:
    if "contents" in body:
        return " ".join(p.get("text", "") for c in body["contents"] for p in c["parts"])
    return " ".join(m["content"] if isinstance(m["content"], str) else "" for m in body["messages"])


def _is_summary_request(body: dict[str, Any]) -> bool:
    return "running summary of a conversation" in _system_text(body) + _all_text(body)[:2000]


def summariser(body: dict[str, Any]) -> str | None:
    """The double as a summariser: the facts it was sent, in order of first mention."""
    if not _is_summary_request(body):
        return None
    seen: list[str] = []
    for f in FACT.findall(_all_text(body)):
        if f not in seen:
            seen.append(f)
    return "Known facts: " + ", ".join(seen)


def turns(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [b for b in requests if not _is_summary_request(b)]


def summaries(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [b for b in requests if _is_summary_request(b)]


def _facts(text: str) -> list[str]:
    return FACT.findall(text)


def _small(url: str, **extra: Any) -> dict[str, Any]:
    """An OpenAI-compatible engine on the double whose window holds about six short turns."""
    return {"kind": "openai", "base_url": f"{url}/v1", "api_key": "sk-test-double-key", "model": "m",
            "context_window": 1000, "max_output_tokens": 200, "max_retries": 0, **extra}


async def _talk(tl: AsyncThreadline, n: int, *, app: str, cid: str | None = None, start: int = 0,
                user: str = "u") -> tuple[str, list[Any]]:
    replies = []
    for i in range(start, start + n):
        r = await tl.chat(f"Turn {i}: fact-{i:02d} {FILLER}", user=user, app=app, conversation_id=cid)
        cid = r.conversation_id
        replies.append(r)
    assert cid is not None
    return cid, replies


# ---- automatic rolling summary -------------------------------------------------------------------


async def test_a_conversation_past_its_window_keeps_its_early_facts_in_a_rolling_summary(oai, sqlite_url):
    d, url = oai
    d.answer_hook = summariser
    async with AsyncThreadline(database_url=sqlite_url, engines={"acc": _small(url)},
                               apps={"a": {"engine": "acc", "system": ["Be brief."]}}, include_presets=False) as tl:
        cid = None
        folded_at = []  # the turns that asked for a summary
        for i in range(24):
            n = len(d.requests)
            cid = (await tl.chat(f"Turn {i}: fact-{i:02d} {FILLER}", user="u", app="a", conversation_id=cid)
                   ).conversation_id
            if summaries(d.requests[n:]):
                folded_at.append(i)
        sent = turns(d.requests)
        assert len(sent) == 24
        last = sent[-1]
        system = _system_text(last)
        assert system.startswith("Be brief.")
        assert "Summary of the earlier conversation" in system
        msgs = [m for m in last["messages"] if m["role"] != "system"]
        # the newest turns, in order, ending with the new question; the oldest ones are not resent
        numbers = [int(f[5:7]) for m in msgs for f in _facts(m["content"])]
        assert numbers == sorted(numbers) and numbers[-1] == 23 and 0 not in numbers
        assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2) + ["user"]
        # nothing was lost: every fact is in the summary or in the turns sent
        told = set(_facts(system)) | {f"fact-{n:02d}" for n in numbers}
        assert told == {f"fact-{i:02d}" for i in range(24)}
        # made once and reused, extended when it fell behind (the extension carries the summary so far)
        assert 2 <= len(folded_at) <= 6, folded_at
        assert min(b - a for a, b in itertools.pairwise(folded_at)) >= 3, folded_at
        made = summaries(d.requests)
        assert "[Summary so far]" in _all_text(made[-1])
        assert "fact-00" in _all_text(made[-1])
        # the turn before the first fold sent no summary; every turn after it does
        with_summary = ["Summary of the earlier conversation" in _system_text(b) for b in sent]
        first = with_summary.index(True)
        assert first > 2 and all(with_summary[first:])
        # summaries are no messages: listings and paging show the turns only
        assert len(await tl.messages(cid, user="u")) == 48
        assert "#summary" not in (await tl.conversation(cid, user="u")).remote


async def test_compaction_off_truncates_as_before(oai, sqlite_url):
    d, url = oai
    d.answer_hook = summariser
    async with AsyncThreadline(database_url=sqlite_url, engines={"acc": _small(url)},
                               apps={"a": {"engine": "acc", "compaction": "off"}}, include_presets=False) as tl:
        await _talk(tl, 16, app="a")
        assert summaries(d.requests) == []
        last = d.requests[-1]
        assert "Summary" not in _system_text(last)
        assert "fact-00" not in _all_text(last) and "fact-15" in _all_text(last)


async def test_a_conversation_that_fits_costs_no_extra_store_read(oai, sqlite_url, monkeypatch):
    """The common case: the same turns with compaction on and off make the same store calls."""
    d, url = oai
    calls: list[str] = []
    for name in ("get_conversation", "get_message", "history_newest", "history_range", "history_rows",
                 "summaries", "branch", "list_memory", "claim_turn", "begin_turn", "finish_turn"):
        real = getattr(Store, name)

        def counted(self: Store, *a: Any, _real: Any = real, _name: str = name, **kw: Any) -> Any:
            calls.append(_name)
            return _real(self, *a, **kw)

        monkeypatch.setattr(Store, name, counted)
    counts = {}
    for mode in ("auto", "off"):
        async with AsyncThreadline(database_url=sqlite_url.replace("t.db", f"{mode}.db"),
                                   engines=engines_for(url), apps={"a": {"engine": "acc", "compaction": mode}},
                                   include_presets=False) as tl:
            await tl.gateway.start()
            calls.clear()
            await _talk(tl, 5, app="a")
            counts[mode] = list(calls)
    assert counts["auto"] == counts["off"]
    assert "summaries" not in counts["auto"] and "history_rows" not in counts["auto"]
    assert summaries(d.requests) == []


# ---- explicit compaction -------------------------------------------------------------------------


async def test_compact_then_the_next_turn_sends_the_summary_instead_of_the_turns(oai, database_url):
    d, url = oai
    d.answer_hook = summariser
    async with AsyncThreadline(database_url=database_url, engines=engines_for(url),
                               apps={"a": {"engine": "acc", "system": ["Be brief."]}}, include_presets=False) as tl:
        cid, replies = await _talk(tl, 3, app="a")
        c = await tl.compact(cid, user="u")
        asked = summaries(d.requests)
        assert len(asked) == 1
        prompt = _all_text(asked[0])
        assert prompt.index("fact-00") < prompt.index("fact-01") < prompt.index("fact-02")
        assert c.text == "Known facts: fact-00, fact-01, fact-02"
        assert c.through_id == replies[-1].message_id and c.conversation_id == cid
        assert c.usage.total_tokens > 0 and c.engine == "acc"

        await tl.chat("Turn 3: fact-03", user="u", conversation_id=cid)
        body = d.requests[-1]
        assert _system_text(body).startswith("Be brief.")
        assert c.text in _system_text(body)
        assert [m["content"] for m in body["messages"] if m["role"] != "system"] == ["Turn 3: fact-03"]

        await tl.chat("Turn 4: fact-04", user="u", conversation_id=cid)
        body = d.requests[-1]
        assert c.text in _system_text(body)
        assert [m["content"] for m in body["messages"] if m["role"] != "system"] == [
            "Turn 3: fact-03", "Answer to: Turn 3: fact-03", "Turn 4: fact-04"]

        # no turn since: the same summary; after a turn: extended from the summary so far
        assert (await tl.compact(cid, user="u", tip_id=None)).id != c.id
        again = await tl.compact(cid, user="u")
        assert again.usage.total_tokens == 0 and again.text == "Known facts: fact-00, fact-01, fact-02, fact-03, fact-04"
        assert "[Summary so far]" in _all_text(summaries(d.requests)[-1])

        # the summary is no message: listings, Dify-style paging and history matching are unchanged
        assert len(await tl.messages(cid, user="u")) == 10
        svc = tl.service
        pairs, _ = await svc.turns(svc.scope("a", "u"), cid, first_id=None, limit=100)
        assert len(pairs) == 5 and all(a["role"] == "assistant" for _, a in pairs)
        with pytest.raises(Exception) as e:
            await tl.regenerate(c.id, user="u")
        assert getattr(e.value, "code", None) == "not_found"


async def test_compact_on_a_branch_covers_that_branch_only(oai, sqlite_url):
    d, url = oai
    d.answer_hook = summariser
    async with AsyncThreadline(database_url=sqlite_url, engines=engines_for(url), apps={"a": {"engine": "acc"}},
                               include_presets=False) as tl:
        cid, (r0, r1, r2) = await _talk(tl, 3, app="a")
        b1 = await tl.edit(r1.message_id, "Turn 1b: fact-01b", user="u")  # branch B: 0, 1b
        assert b1.conversation_id == cid

        a = await tl.compact(cid, user="u", tip_id=r2.message_id)  # branch A: 0, 1, 2
        assert a.text == "Known facts: fact-00, fact-01, fact-02" and a.through_id == r2.message_id

        await tl.chat("Turn 3 on B: fact-03", user="u", conversation_id=cid)  # the newest branch is B
        body = d.requests[-1]
        assert "Summary" not in _system_text(body)
        assert _facts(_all_text(body)) == ["fact-00", "fact-00", "fact-01b", "fact-01b", "fact-03"]

        await tl.chat("Turn 3 on A: fact-13", user="u", conversation_id=cid, parent_id=r2.message_id)
        body = d.requests[-1]
        assert a.text in _system_text(body)
        assert [m["content"] for m in body["messages"] if m["role"] != "system"] == ["Turn 3 on A: fact-13"]

        b_tip = (await tl.messages(cid, user="u", tip_id=None))[-1]  # newest: A's continuation
        assert "fact-13" in b_tip.content
        b = await tl.compact(cid, user="u", tip_id=b1.message_id)
        assert b.text == "Known facts: fact-00, fact-01b"
        assert b.through_id == b1.message_id

        # each branch goes on with its own summary
        await tl.chat("more on B: fact-04", user="u", conversation_id=cid, parent_id=b1.message_id)
        assert b.text in _system_text(d.requests[-1]) and a.text not in _system_text(d.requests[-1])


async def test_a_summary_reaches_every_provider_as_system_text(oai, gem, sqlite_url):
    """Gemini: systemInstruction. DeepSeek-R1 (NIM): no system role, folded into the first user
    turn; the summariser's reasoning is not part of the summary."""
    (od, ourl), (gd, gurl) = oai, gem
    od.reset(provider="nim", answer_mode="think_tags", answer_hook=summariser)
    gd.answer_hook = summariser
    engines = {"r1": {**_small(ourl), "profile": "deepseek-r1"},
               "gem": {"kind": "gemini", "base_url": f"{gurl}/v1beta", "api_key": "AIza-test-double-key-0000",
                       "model": "gemini-2.5-pro", "max_retries": 0}}
    async with AsyncThreadline(database_url=sqlite_url, engines=engines,
                               apps={"r": {"engine": "r1", "system": ["Be brief."]},
                                     "g": {"engine": "gem", "system": ["Be brief."]}}, include_presets=False) as tl:
        gcid, _ = await _talk(tl, 2, app="g")
        await tl.compact(gcid, user="u")
        await tl.chat("next: fact-09", user="u", conversation_id=gcid)
        body = gd.requests[-1]
        assert "Known facts: fact-00, fact-01" in _system_text(body)
        assert [c["role"] for c in body["contents"]] == ["user"]

        await _talk(tl, 16, app="r")
        assert summaries(od.requests)
        last = od.requests[-1]
        assert all(m["role"] in ("user", "assistant") for m in last["messages"])
        first = last["messages"][0]
        assert first["role"] == "user" and "Summary of the earlier conversation" in first["content"]
        assert "Known facts: fact-00" in first["content"]
        assert od.reasoning not in first["content"]


# ---- failures and refusals -----------------------------------------------------------------------


async def test_a_failing_summariser_leaves_the_turn_to_plain_truncation(oai, gem, sqlite_url, caplog):
    (d, url), (gd, gurl) = oai, gem
    gd.reset(fault="500")
    engines = {"acc": _small(url), "sum": {"kind": "gemini", "base_url": f"{gurl}/v1beta",
                                           "api_key": "AIza-test-double-key-0000", "model": "gemini-2.5-pro",
                                           "max_retries": 0}}
    caplog.set_level(logging.DEBUG)
    async with AsyncThreadline(database_url=sqlite_url, engines=engines,
                               apps={"a": {"engine": "acc", "summary_engine": "sum"}}, include_presets=False) as tl:
        cid, replies = await _talk(tl, 16, app="a")
        assert all(r.status == "completed" for r in replies)
        assert len(gd.requests) == 1  # asked once; later turns of the conversation do not wait for it again
        last = d.requests[-1]
        assert "Summary" not in _system_text(last)
        assert "fact-00" not in _all_text(last) and "fact-15" in _all_text(last)
        assert await tl.gateway.store.summaries(cid) == []
    warned = [r for r in caplog.records if "summarising older turns" in r.getMessage()]
    assert len(warned) == 1
    assert "AIza-test-double-key-0000" not in caplog.text and "sk-test-double-key" not in caplog.text


async def test_a_slow_summariser_cannot_hold_the_turn_past_its_timeout(oai, gem, sqlite_url):
    (_, url), (gd, gurl) = oai, gem
    engines = {"acc": _small(url), "sum": {"kind": "gemini", "base_url": f"{gurl}/v1beta",
                                           "api_key": "AIza-test-double-key-0000", "model": "gemini-2.5-pro",
                                           "max_retries": 0}}
    async with AsyncThreadline(database_url=sqlite_url, engines=engines,
                               apps={"a": {"engine": "acc", "summary_engine": "sum", "summary_timeout": 0.5}},
                               include_presets=False) as tl:
        cid, _ = await _talk(tl, 5, app="a")
        gd.reset(fault="timeout", stall=10)
        slowest = 0.0
        for i in range(5, 12):
            t = time.monotonic()
            r = await tl.chat(f"Turn {i}: fact-{i:02d} {FILLER}", user="u", conversation_id=cid)
            slowest = max(slowest, time.monotonic() - t)
            assert r.status == "completed"
        assert gd.requests, "the summariser was asked"
        assert slowest < 3.0


async def test_a_dify_app_without_summary_engine_is_refused(oai, sqlite_url):
    d, url = oai
    d.answer_hook = summariser
    dify = {"kind": "dify", "base_url": "http://127.0.0.1:9/v1", "api_key": "app-not-called"}
    async with AsyncThreadline(database_url=sqlite_url, engines=engines_for(url, difyapp=dify),
                               apps={"d": {"engine": "difyapp"}, "d2": {"engine": "difyapp", "summary_engine": "acc"},
                                     "a": {"engine": "acc"}},
                               include_presets=False) as tl:
        await tl.gateway.start()
        turns_ = [{"query": "Turn 0: fact-00", "answer": "noted"}, {"query": "Turn 1: fact-01", "answer": "ok"}]
        cid = await tl.gateway.import_pairs(app="d", user="u", engine="difyapp", turns=turns_)
        with pytest.raises(CompactionUnavailableError) as e:
            await tl.compact(cid, user="u")
        assert e.value.code == "compaction_unavailable" and e.value.status == 400
        assert "summary_engine" in e.value.message and "[apps.d]" in e.value.message
        assert await tl.gateway.store.summaries(cid) == [] and summaries(d.requests) == []
        with pytest.raises(CompactionUnavailableError):
            await tl.compact(cid, user="u", engine="difyapp")

        cid2 = await tl.gateway.import_pairs(app="d2", user="u", engine="difyapp", turns=turns_)
        c = await tl.compact(cid2, user="u")
        assert c.engine == "acc" and c.text == "Known facts: fact-00, fact-01"

        acid, _ = await _talk(tl, 1, app="a")
        with pytest.raises(EngineNotAllowedError):
            await tl.compact(acid, user="u", engine="nope")
        with pytest.raises(Exception) as e2:  # another user's conversation: not found, as a missing one
            await tl.compact(acid, user="someone-else")
        assert getattr(e2.value, "code", None) == "not_found"


def test_python_api_sync_twin(oai, tmp_path):
    d, url = oai
    d.answer_hook = summariser
    with Threadline(database_url=f"sqlite+aiosqlite:///{tmp_path}/t.db", engines=engines_for(url),
                    apps={"a": {"engine": "acc"}}, include_presets=False) as tl:
        r = tl.chat("Turn 0: fact-00", user="u", app="a")
        c = tl.compact(r.conversation_id, user="u")
        assert c.text == "Known facts: fact-00" and c.through_id == r.message_id
        tl.chat("next", user="u", conversation_id=r.conversation_id)
        assert c.text in _system_text(d.requests[-1])


# ---- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize("app,message", [
    ({"compaction": "sometimes"}, "compaction must be one of 'auto', 'off'"),
    ({"compact_at": 1.5}, "compact_at must be a number from 0.1 to 1.0"),
    ({"compact_at": "80%"}, "compact_at must be a number"),
    ({"compact_at": True}, "compact_at must be a number"),
    ({"summary_timeout": 0}, "summary_timeout must be a positive number"),
    ({"summary_engine": "nope"}, "summary_engine 'nope' is not configured"),
    ({"summary_engine": "difyapp"}, "keeps its own conversations"),
])
def test_bad_compaction_settings_are_refused_clearly(app, message):
    engines = {"acc": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": "k"},
               "difyapp": {"kind": "dify", "base_url": "http://127.0.0.1:9/v1", "api_key": "k"}}
    with pytest.raises(ConfigError) as e:
        Settings.build(database_url="sqlite+aiosqlite:///x.db", engines=engines, apps={"a": {"engine": "acc", **app}},
                       include_presets=False)
    assert message in e.value.message and "[apps.a]" in e.value.message


def test_compaction_defaults_and_the_reserved_engine_name():
    s = Settings.build(database_url="sqlite+aiosqlite:///x.db",
                       engines={"acc": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": "k"}},
                       apps={"a": {"engine": "acc"}, "b": {"engine": "acc", "compaction": "off", "compact_at": 0.5,
                                                           "summary_engine": "acc", "summary_timeout": 5}},
                       include_presets=False)
    a, b = s.apps["a"], s.apps["b"]
    assert (a.compaction, a.compact_at, a.summary_engine, a.summary_timeout) == ("auto", 0.8, None, 30.0)
    assert (b.compaction, b.compact_at, b.summary_engine, b.summary_timeout) == ("off", 0.5, "acc", 5.0)
    with pytest.raises(ConfigError):
        Settings.build(database_url="sqlite+aiosqlite:///x.db",
                       engines={"#summary": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": "k"}},
                       include_presets=False)


async def test_two_compactions_at_once_store_two_summaries_in_turn(oai, sqlite_url):
    """Compaction holds the conversation's turn lock: a second one waits, then finds the first."""
    d, url = oai
    d.answer_hook = summariser
    d.slow = 0.3
    async with AsyncThreadline(database_url=sqlite_url, engines=engines_for(url), apps={"a": {"engine": "acc"}},
                               include_presets=False) as tl:
        cid, _ = await _talk(tl, 2, app="a")
        before = len(summaries(d.requests))
        x, y = await asyncio.gather(tl.compact(cid, user="u"), tl.compact(cid, user="u"))
        assert x.id == y.id
        assert len(summaries(d.requests)) == before + 1
        rows = await tl.gateway.store.summaries(cid)
        assert [r["seq"] for r in rows] == [-1]
