"""OpenAI's Responses API against a live server, driven by the official `openai` SDK, over the strict
OpenAI-compatible, Gemini and Dify doubles: each test checks what the client sees and what the
engine behind was sent (the whole chain for a stateless engine; Dify's own id and only the new
query for Dify)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import openai
import pytest

from tests.conftest import engines_for
from tests.doubles.dify_double import DifyDouble
from tests.doubles.live import LiveServer
from threadline.config import Settings
from threadline.server.app import create_app
from threadline.server.keys import create_key

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather for a question",
           "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def live(request, openai_double, gemini_double, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """A live server on each store (both run every test: the chain, fork and scratch paths use
    store queries of their own), with an app on the OpenAI, Gemini and Dify doubles each."""
    tmp = tmp_path_factory.mktemp("responses")
    database_url = f"sqlite+aiosqlite:///{tmp}/r.db"
    if request.param == "postgresql":
        database_url = request.getfixturevalue("pg_database")

        async def reset() -> None:
            conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
            try:
                await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")
            finally:
                await conn.close()

        asyncio.run(reset())
    dd = DifyDouble()
    dify = LiveServer(dd.app()).start()
    engines = engines_for(openai_double[1], gemini_double[1],
                          dify={"kind": "dify", "base_url": f"{dify.url}/v1", "api_key": dd.api_key},
                          small={"kind": "openai", "base_url": f"{openai_double[1]}/v1", "api_key": "sk-test-double-key",
                                 "model": "m", "context_window": 700, "max_output_tokens": 100})
    settings = Settings.build(database_url=database_url, include_presets=False, engines=engines,
                              apps={"demo": {"engine": "acc", "engines": ["acc", "gem", "small"]},
                                    "gdemo": {"engine": "gem"}, "ddemo": {"engine": "dify"},
                                    "other": {"engine": "acc"}})
    keys = {app: asyncio.run(create_key(settings, app)) for app in ("demo", "gdemo", "ddemo", "other")}
    srv = LiveServer(create_app(settings)).start()
    try:
        yield {"url": srv.url, "keys": keys, "oai": openai_double[0], "gem": gemini_double[0], "dify": dd}
    finally:
        srv.stop()
        dify.stop()


@pytest.fixture
def env(live) -> dict[str, Any]:
    live["oai"].reset()
    live["gem"].reset()
    return live


def client(env: dict[str, Any], app: str = "demo") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{env['url']}/v1", api_key=env["keys"][app], max_retries=0)


def sent_texts(req: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(m["role"], m.get("content")) for m in req["messages"] if m["role"] != "system"]


# ---- chains ------------------------------------------------------------------------------------------

def test_three_step_chain_sends_the_whole_history_upstream(env):
    c = client(env)
    r1 = c.responses.create(model="demo", input="first", instructions="Be brief.")
    assert r1.id.startswith("resp_") and r1.status == "completed"
    assert r1.output_text == "Answer to: first" and r1.output[0].id.startswith("msg_")
    assert r1.instructions == "Be brief." and r1.usage.total_tokens > 0
    r2 = c.responses.create(model="demo", input="second", previous_response_id=r1.id)
    r3 = c.responses.create(model="demo", input=[{"role": "user", "content": "third"}], previous_response_id=r2.id)
    assert r3.previous_response_id == r2.id and r3.output_text == "Answer to: third"
    req = env["oai"].requests[-1]
    assert sent_texts(req) == [("user", "first"), ("assistant", "Answer to: first"), ("user", "second"),
                               ("assistant", "Answer to: second"), ("user", "third")]
    # instructions belong to their own response only
    assert not any(m["role"] == "system" and "Be brief." in (m.get("content") or "") for m in req["messages"])


def test_an_immediate_follow_up_has_its_context_when_streaming(env):
    """The answer is stored before response.completed goes out: a follow-up sent at once sees it."""
    c = client(env)
    with c.responses.stream(model="demo", input="alpha") as s:
        final = s.get_final_response()
    r2 = c.responses.create(model="demo", input="beta", previous_response_id=final.id)
    assert sent_texts(env["oai"].requests[-1])[:2] == [("user", "alpha"), ("assistant", "Answer to: alpha")]
    assert r2.status == "completed"


def test_continuing_an_older_response_forks_a_branch(env):
    c = client(env)
    r1 = c.responses.create(model="demo", input="root")
    c.responses.create(model="demo", input="branch A", previous_response_id=r1.id)
    c.responses.create(model="demo", input="branch B", previous_response_id=r1.id)
    assert sent_texts(env["oai"].requests[-1]) == [("user", "root"), ("assistant", "Answer to: root"),
                                                   ("user", "branch B")]


def test_unknown_and_unstored_previous_response_is_not_found(env):
    c = client(env)
    for bad in ("resp_0123", "resp_" + "0" * 32, "nonsense"):
        with pytest.raises(openai.BadRequestError) as e:
            c.responses.create(model="demo", input="x", previous_response_id=bad)
        assert e.value.code == "previous_response_not_found" and e.value.param == "previous_response_id"
    r = c.responses.create(model="demo", input="secret", store=False)
    assert r.output_text == "Answer to: secret" and r.store is False
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model="demo", input="x", previous_response_id=r.id)
    assert e.value.code == "previous_response_not_found"
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(r.id)
    # another app's key cannot see or continue this app's responses
    mine = c.responses.create(model="demo", input="mine")
    with pytest.raises(openai.BadRequestError) as e:
        client(env, "other").responses.create(model="other", input="x", previous_response_id=mine.id)
    assert e.value.code == "previous_response_not_found"
    with pytest.raises(openai.NotFoundError):
        client(env, "other").responses.retrieve(mine.id)


def test_store_false_continues_a_stored_chain_without_keeping_anything(env):
    c = client(env)
    r1 = c.responses.create(model="demo", input="kept")
    r2 = c.responses.create(model="demo", input="not kept", previous_response_id=r1.id, store=False)
    assert sent_texts(env["oai"].requests[-1])[:2] == [("user", "kept"), ("assistant", "Answer to: kept")]
    assert r2.status == "completed"
    r3 = c.responses.create(model="demo", input="next", previous_response_id=r1.id)
    assert ("user", "not kept") not in sent_texts(env["oai"].requests[-1])
    items = c.responses.input_items.list(r3.id)
    assert [i.content[0].text for i in items.data] == ["next"]


# ---- streaming ---------------------------------------------------------------------------------------

def _raw_events(env: dict[str, Any], body: dict[str, Any], app: str = "demo") -> list[tuple[str, dict[str, Any]]]:
    with httpx.stream("POST", f"{env['url']}/v1/responses", json={**body, "stream": True}, timeout=30,
                      headers={"Authorization": f"Bearer {env['keys'][app]}"}) as r:
        assert r.status_code == 200, r.read()
        text = r.read().decode()
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        if lines.get("data") == "[DONE]":
            out.append(("[DONE]", {}))
            continue
        data = json.loads(lines["data"])
        assert lines["event"] == data["type"]
        out.append((data["type"], data))
    return out


def test_stream_events_are_ordered_with_one_id_and_deltas_that_add_up(env):
    env["oai"].reset(answer_mode="reasoning_content", chunk_size=3)
    events = _raw_events(env, {"model": "demo", "input": "stream me"})
    kinds = [k for k, _ in events]
    assert kinds[0] == "response.created" and kinds[1] == "response.in_progress"
    assert kinds[-2] == "response.completed" and kinds[-1] == "[DONE]"
    seqs = [d["sequence_number"] for _, d in events[:-1]]
    assert seqs == list(range(len(seqs)))
    rid = events[0][1]["response"]["id"]
    final = events[-2][1]["response"]
    assert final["id"] == rid
    text = "".join(d["delta"] for k, d in events if k == "response.output_text.delta")
    reasoning = "".join(d["delta"] for k, d in events if k == "response.reasoning_text.delta")
    assert text == "Answer to: stream me" and reasoning
    msg = next(o for o in final["output"] if o["type"] == "message")
    assert msg["content"][0]["text"] == text
    rs = next(o for o in final["output"] if o["type"] == "reasoning")
    assert rs["content"][0]["text"] == reasoning
    # every event about an item names the same id as its output_item.added
    added = {d["output_index"]: d["item"]["id"] for k, d in events if k == "response.output_item.added"}
    for k, d in events:
        if "item_id" in d:
            assert added[d["output_index"]] == d["item_id"], (k, d)
    assert [o["id"] for o in final["output"]] == [added[i] for i in sorted(added)]
    # retrieval shows the same items, same ids
    stored = client(env).responses.retrieve(rid)
    assert [o.id for o in stored.output] == [o["id"] for o in final["output"]]
    assert stored.output_text == text


def test_sdk_stream_helper_accepts_the_stream(env):
    c = client(env)
    deltas = []
    with c.responses.stream(model="demo", input="hello there") as s:
        for ev in s:
            if ev.type == "response.output_text.delta":
                deltas.append(ev.delta)
        final = s.get_final_response()
    assert "".join(deltas) == final.output_text == "Answer to: hello there"


# ---- tools -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("app", ["demo", "gdemo"])
def test_function_tool_round_trip_by_previous_response_id(env, app):
    c = client(env, app)
    r1 = c.responses.create(model=app, input="weather in Paris?", tools=[WEATHER])
    [call] = [o for o in r1.output if o.type == "function_call"]
    assert call.id.startswith("fc_") and call.name == "get_weather" and json.loads(call.arguments)
    r2 = c.responses.create(model=app, previous_response_id=r1.id, tools=[WEATHER],
                            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert r2.status == "completed" and "sunny" in r2.output_text
    if app == "demo":
        sent = env["oai"].requests[-1]["messages"]
        assert [m["role"] for m in sent if m["role"] != "system"] == ["user", "assistant", "tool"]
        assert sent[-1] == {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}
    else:
        contents = env["gem"].requests[-1]["contents"]
        assert contents[-1]["parts"][0]["functionResponse"]["name"] == "get_weather"


def test_streamed_function_call_events(env):
    events = _raw_events(env, {"model": "demo", "input": "weather?", "tools": [WEATHER]})
    kinds = [k for k, _ in events]
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    done = next(d for k, d in events if k == "response.function_call_arguments.done")
    args = "".join(d["delta"] for k, d in events if k == "response.function_call_arguments.delta")
    assert done["arguments"] == args and done["name"] == "get_weather"
    final = events[-2][1]["response"]
    [fc] = [o for o in final["output"] if o["type"] == "function_call"]
    assert fc["arguments"] == args and fc["status"] == "completed"


def test_full_replay_without_previous_response_id_continues_the_stored_conversation(env):
    """A client that keeps history itself (openai-agents' default) resends every item: it is matched
    to the conversation it continues, not stored again."""
    c = client(env)
    raw1 = c.responses.with_raw_response.create(model="demo", input="weather in Rome?", tools=[WEATHER])
    r1 = raw1.parse()
    [call] = [o for o in r1.output if o.type == "function_call"]
    replay = [{"role": "user", "content": "weather in Rome?"}, call.model_dump(exclude_none=True),
              {"type": "function_call_output", "call_id": call.call_id, "output": "warm"}]
    raw2 = c.responses.with_raw_response.create(model="demo", input=replay, tools=[WEATHER])
    assert raw2.parse().output_text == "Tool said: warm"
    cid = raw1.headers["x-threadline-conversation-id"]
    assert raw2.headers["x-threadline-conversation-id"] == cid
    # one conversation of two turns, not a copy
    r3 = c.responses.create(model="demo", input="and tomorrow?", conversation=cid)
    assert sent_texts(env["oai"].requests[-1])[-2:] == [("assistant", "Tool said: warm"), ("user", "and tomorrow?")]
    assert r3.conversation.id == "conv_" + cid.replace("-", "")


# ---- retrieve, delete, cancel, input items, tokens ---------------------------------------------------

def test_retrieve_delete_and_input_items(env):
    c = client(env)
    r = c.responses.create(model="demo", input=[{"role": "user", "content": [
        {"type": "input_text", "text": "look"}, {"type": "input_text", "text": "closely"}]}], metadata={"k": "v"})
    got = c.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text and got.metadata == {"k": "v"}
    items = c.responses.input_items.list(r.id)
    assert items.data[0].type == "message" and items.data[0].content[0].text == "look\nclosely"
    c.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(r.id)
    with pytest.raises(openai.BadRequestError):
        c.responses.create(model="demo", input="x", previous_response_id=r.id)


def test_cancel_a_background_response_keeps_its_partial_output(env):
    env["oai"].reset(slow=0.2, chunk_size=1)
    c = client(env)
    r = c.responses.create(model="demo", input="a long answer please", background=True)
    assert r.status == "in_progress"
    time.sleep(0.8)
    cancelled = c.responses.cancel(r.id)
    assert cancelled.status == "cancelled"
    again = c.responses.retrieve(r.id)
    assert again.status == "cancelled" and again.output_text and "Answer to: a long answer please".startswith(
        again.output_text)
    with pytest.raises(openai.BadRequestError):
        c.responses.cancel(c.responses.create(model="demo", input="done").id)


def test_background_response_is_polled_to_completion(env):
    c = client(env)
    r = c.responses.create(model="demo", input="later", background=True)
    deadline = time.monotonic() + 10
    while (got := c.responses.retrieve(r.id)).status == "in_progress":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert got.status == "completed" and got.output_text == "Answer to: later"


def test_input_tokens_counts_the_chain(env):
    c = client(env)
    r1 = c.responses.create(model="demo", input="count " * 50)
    alone = c.responses.input_tokens.count(model="demo", input="next").input_tokens
    chained = c.responses.input_tokens.count(model="demo", input="next", previous_response_id=r1.id).input_tokens
    assert chained > alone + 40


# ---- parameters --------------------------------------------------------------------------------------

def test_max_output_tokens_and_json_schema_are_forwarded(env):
    c = client(env)
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    r = c.responses.create(model="demo", input="json please", max_output_tokens=50, temperature=0.3, top_p=0.9,
                           text={"format": {"type": "json_schema", "name": "City", "schema": schema, "strict": True}})
    req = env["oai"].requests[-1]
    assert req["temperature"] == 0.3 and req["top_p"] == 0.9
    assert (req.get("max_completion_tokens") or req.get("max_tokens")) == 50
    assert req["response_format"]["json_schema"]["schema"] == schema
    assert json.loads(r.output_text) == {"city": "string"} or "city" in json.loads(r.output_text)


def test_length_finish_is_incomplete(env):
    env["oai"].reset(finish="length")
    r = client(env).responses.create(model="demo", input="cut me", max_output_tokens=16)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"


@pytest.mark.parametrize("body,param", [
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"include": ["file_search_call.results"]}, "include"),
    ({"text": {"verbosity": "high"}}, "text.verbosity"),
    ({"prompt": {"id": "p"}}, "prompt"),
    ({"tool_choice": {"type": "allowed_tools", "tools": []}, "tools": [WEATHER]}, "tool_choice"),
])
def test_fields_that_cannot_be_honoured_are_refused_by_name(env, body, param):
    r = httpx.post(f"{env['url']}/v1/responses", headers={"Authorization": f"Bearer {env['keys']['demo']}"},
                   json={"model": "demo", "input": "x", **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] in ("unsupported_parameter", "unrecognized_argument"), err


def test_truncation_disabled_refuses_an_over_long_conversation(env):
    c = client(env)
    r1 = c.responses.create(model="small", input="word " * 300)
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model="small", input="more", previous_response_id=r1.id, truncation="disabled")
    assert e.value.code == "context_length_exceeded"
    ok = c.responses.create(model="small", input="more", previous_response_id=r1.id, truncation="auto")
    assert ok.status == "completed"


# ---- Dify --------------------------------------------------------------------------------------------

def test_dify_app_continues_difys_own_conversation(env):
    dd: DifyDouble = env["dify"]
    c = client(env, "ddemo")
    r1 = c.responses.create(model="ddemo", input="hello dify")
    remote = dd.requests[-1]
    r2 = c.responses.create(model="ddemo", input="and again", previous_response_id=r1.id)
    last = dd.requests[-1]
    assert last["query"] == "and again"
    assert last["conversation_id"] and last["conversation_id"] in dd.conversations
    assert remote.get("conversation_id") in ("", None)
    assert r2.status == "completed" and r2.output_text


def test_store_false_is_refused_for_a_stateful_engine(env):
    with pytest.raises(openai.BadRequestError) as e:
        client(env, "ddemo").responses.create(model="ddemo", input="x", store=False)
    assert e.value.param == "store"


@pytest.mark.parametrize("stream", [False, True])
def test_dify_agent_thoughts_come_out_as_done_function_call_items(env, stream):
    dd: DifyDouble = env["dify"]
    dd.reset(agent=True)
    try:
        body = {"model": "ddemo", "input": "weather in Paris?"}
        if stream:
            events = _raw_events(env, body, "ddemo")
            final = events[-2][1]["response"]
            added = [d["item"]["type"] for k, d in events if k == "response.output_item.added"]
            assert added[:2] == ["function_call", "function_call_output"]
        else:
            r = httpx.post(f"{env['url']}/v1/responses", json=body,
                           headers={"Authorization": f"Bearer {env['keys']['ddemo']}"})
            assert r.status_code == 200, r.text
            final = r.json()
        call = next(o for o in final["output"] if o["type"] == "function_call")
        out = next(o for o in final["output"] if o["type"] == "function_call_output")
        assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": "Paris"}
        assert out["call_id"] == call["call_id"] and out["output"] == "Sunny, 21°C in Paris"
        assert call["id"].startswith("fc_") and out["id"].startswith("fco_") and call["status"] == "completed"
        assert final["output"][-1]["type"] == "message" and final["status"] == "completed"
        stored = client(env, "ddemo").responses.retrieve(final["id"])
        assert [o.id for o in stored.output if o.type != "reasoning"] == [o["id"] for o in final["output"]
                                                                         if o["type"] != "reasoning"]
    finally:
        dd.reset()


def test_sdk_parse_with_a_pydantic_text_format(env):
    from pydantic import BaseModel

    class City(BaseModel):
        city: str

    r = client(env).responses.parse(model="demo", input="which city?", text_format=City)
    assert isinstance(r.output_parsed, City)
    sent = env["oai"].requests[-1]["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["name"] == "City"


def test_an_engine_failing_mid_stream_ends_with_response_failed_and_keeps_the_partial(env):
    env["oai"].reset(fault="reset", fault_after=2, chunk_size=2)
    events = _raw_events(env, {"model": "demo", "input": "break please"})
    kinds = [k for k, _ in events]
    assert kinds[0] == "response.created" and kinds[-2] == "response.failed" and "error" in kinds
    failed = events[-2][1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] and failed["error"]["message"]
    partial = "".join(d["delta"] for k, d in events if k == "response.output_text.delta")
    stored = client(env).responses.retrieve(failed["id"])
    assert stored.status == "failed" and stored.output_text == partial and partial


@pytest.mark.parametrize("tool,param", [
    ({**WEATHER, "parameters": "not a schema"}, "tools[0].parameters"),
    ({**WEATHER, "strict": "yes"}, "tools[0].strict"),
    ({**WEATHER, "extra": 1}, "tools[0].extra"),
    ({"type": "function"}, "tools[0].name"),
])
def test_malformed_function_tools_are_400_in_openai_shape(env, tool, param):
    r = httpx.post(f"{env['url']}/v1/responses", headers={"Authorization": f"Bearer {env['keys']['demo']}"},
                   json={"model": "demo", "input": "x", "tools": [tool]})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_errors_on_responses_paths_have_openai_shape(env):
    h = {"Authorization": f"Bearer {env['keys']['demo']}"}
    r = httpx.post(f"{env['url']}/v1/responses", headers={**h, "Content-Type": "application/json"}, content=b"{")
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(f"{env['url']}/v1/responses/resp_{'a' * 32}", headers=h)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.post(f"{env['url']}/v1/responses", json={"model": "demo", "input": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


# ---- compaction ----------------------------------------------------------------------------------------

def _summariser(body: dict[str, Any]) -> str | None:
    system = " ".join(m["content"] for m in body.get("messages", []) if m["role"] == "system")
    everything = system + " ".join(str(m.get("content")) for m in body.get("messages", []))
    if "running summary of a conversation" not in everything:
        return None
    return "SUMMARY: the user said apples and pears."


def test_compact_a_chain_then_continue_from_the_compaction_item(env):
    env["oai"].reset(answer_hook=_summariser)
    c = client(env)
    r1 = c.responses.create(model="demo", input="I like apples")
    r2 = c.responses.create(model="demo", input="and pears", previous_response_id=r1.id)
    compacted = c.responses.compact(model="demo", previous_response_id=r2.id)
    assert compacted.object == "response.compaction"
    [item] = compacted.output
    assert item.type == "compaction" and item.encrypted_content.startswith("tlsum_")
    r3 = c.responses.create(model="demo", input=[item.model_dump(exclude_none=True),
                                                  {"role": "user", "content": "what do I like?"}])
    sent = env["oai"].requests[-1]["messages"]
    system = " ".join(m["content"] for m in sent if m["role"] == "system")
    assert "SUMMARY: the user said apples and pears." in system
    assert [(m["role"], m["content"]) for m in sent if m["role"] != "system"] == [("user", "what do I like?")]
    assert r3.output_text == "Answer to: what do I like?"
    # the chain goes on from there by previous_response_id, summary still in place of the old turns
    c.responses.create(model="demo", input="more", previous_response_id=r3.id)
    sent = env["oai"].requests[-1]["messages"]
    assert [m["content"] for m in sent if m["role"] == "user"] == ["what do I like?", "more"]
    # a client that keeps its own window resends the items after the compaction item: same conversation
    r5 = c.responses.create(model="demo", input=[item.model_dump(exclude_none=True),
                                                  {"role": "user", "content": "what do I like?"},
                                                  {"role": "assistant", "content": r3.output_text},
                                                  {"role": "user", "content": "again"}])
    assert r5.status == "completed"
    assert [m["content"] for m in env["oai"].requests[-1]["messages"] if m["role"] == "user"] == [
        "what do I like?", "again"]


def test_compact_given_input_items_and_refusals(env):
    env["oai"].reset(answer_hook=_summariser)
    c = client(env)
    window = [{"role": "user", "content": "I like apples"}, {"role": "assistant", "content": "Noted."}]
    compacted = c.responses.compact(model="demo", input=window)
    item = compacted.output[0]
    r = c.responses.create(model="demo", input=[item.model_dump(exclude_none=True), {"role": "user", "content": "so?"}])
    assert "SUMMARY" in " ".join(m["content"] for m in env["oai"].requests[-1]["messages"] if m["role"] == "system")
    assert r.status == "completed"
    with pytest.raises(openai.BadRequestError):  # a forged token
        c.responses.create(model="demo", input=[{"type": "compaction", "id": "cmp_x", "encrypted_content": "forged"},
                                                 {"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):  # another app's summary
        client(env, "other").responses.create(model="other", input=[item.model_dump(exclude_none=True),
                                                                    {"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.compact(model="demo", previous_response_id="resp_" + "0" * 32)
    assert e.value.code == "previous_response_not_found"
    with pytest.raises(openai.BadRequestError):  # nothing to compact
        c.responses.compact(model="demo")


def test_format_description_and_image_detail_are_forwarded_and_tiers_refused(env):
    """Found by review: these were accepted and dropped on the way (forward or refuse, never drop)."""
    c = client(env)
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    c.responses.create(model="demo", input=[{"role": "user", "content": [
        {"type": "input_text", "text": "look"},
        {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}]}],
        text={"format": {"type": "json_schema", "name": "A", "schema": schema, "description": "One letter."}})
    req = env["oai"].requests[-1]
    assert req["response_format"]["json_schema"]["description"] == "One letter."
    image = req["messages"][-1]["content"][-1]
    assert image["image_url"]["detail"] == "low"
    gc = client(env, "gdemo")
    gc.responses.create(model="gdemo", input="x",
                        text={"format": {"type": "json_schema", "name": "A", "schema": schema, "description": "D."}})
    assert env["gem"].requests[-1]["generationConfig"]["responseJsonSchema"]["description"] == "D."
    for bad, param in (({"service_tier": "priority"}, "service_tier"),
                       ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png",
                                                                 "detail": "huge"}]}]}, "input[0].content[0].detail")):
        r = httpx.post(f"{env['url']}/v1/responses", headers={"Authorization": f"Bearer {env['keys']['demo']}"},
                       json={"model": "demo", "input": "x", **bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    ok = c.responses.create(model="demo", input="x", service_tier="auto")
    assert ok.service_tier == "default"
