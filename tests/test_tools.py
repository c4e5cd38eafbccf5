"""Tool calls, structured output and request parameters, end to end: the Python API and the
OpenAI-compatible route (driven by the official openai SDK) against the strict OpenAI double, which
refuses what the real service refuses (a tool message answering no call, a call left unanswered,
fields a provider does not document)."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from pydantic import BaseModel

from tests.conftest import engines_for
from tests.doubles.live import LiveServer
from threadline import AsyncThreadline
from threadline.config import Settings
from threadline.errors import InvalidParamError
from threadline.messages import (
    FunctionCall,
    FunctionResult,
    GenerationParams,
    ResponseFormat,
    ToolCallDelta,
    ToolSpec,
    TurnCompleted,
)
from threadline.server.app import create_app
from threadline.server.keys import create_key

WEATHER = ToolSpec("get_weather", "The weather in a city", {"type": "object", "properties": {"city": {"type": "string"}},
                                                              "required": ["city"]})
WEATHER_WIRE = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                                 "parameters": WEATHER.parameters}}


# ---- Python API --------------------------------------------------------------------------------------


async def test_python_api_tool_loop_blocking(atl, oai):
    d, _ = oai
    r = await atl.chat("weather in Paris?", user="u", app="demo", tools=[WEATHER])
    assert r.finish_reason == "tool_calls"
    assert r.answer == ""
    [call] = r.tool_calls
    assert call.name == "get_weather" and json.loads(call.arguments) == {"q": "weather in Paris?"}
    assert d.requests[-1]["tools"] == [WEATHER_WIRE]

    r2 = await atl.chat(user="u", app="demo", conversation_id=r.conversation_id, tools=[WEATHER],
                        tool_results=[FunctionResult(call.call_id, "sunny, 21C")])
    assert r2.answer == "Tool said: sunny, 21C" and r2.finish_reason == "stop" and not r2.tool_calls
    sent = d.requests[-1]["messages"]
    # the history the double accepted: user, the assistant's call, the tool result answering it
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "tool"]
    assert sent[2]["tool_calls"][0]["id"] == call.call_id and sent[2]["content"] is None
    assert sent[3] == {"role": "tool", "tool_call_id": call.call_id, "content": "sunny, 21C"}

    msgs = await atl.messages(r.conversation_id, user="u", app="demo")
    assert [type(i) for i in msgs[1].items] == [FunctionCall]
    assert msgs[1].finish_reason == "tool_calls"
    assert msgs[2].items == [FunctionResult(call.call_id, "sunny, 21C", "get_weather")]  # the name filled from the call
    assert msgs[3].content == "Tool said: sunny, 21C"


async def test_python_api_tool_call_streams_as_deltas(atl, oai):
    deltas, final = [], None
    async for ev in atl.stream("weather in Rome?", user="u", app="demo", tools=[WEATHER]):
        if isinstance(ev, ToolCallDelta):
            deltas.append(ev)
        elif isinstance(ev, TurnCompleted):
            final = ev.reply
    assert final is not None and len(deltas) > 2  # the name first, then the arguments in pieces
    assert deltas[0].name == "get_weather" and deltas[0].call_id
    assert "".join(d.arguments for d in deltas) == final.tool_calls[0].arguments
    assert json.loads(final.tool_calls[0].arguments) == {"q": "weather in Rome?"}


async def test_a_result_answering_no_call_is_refused_before_anything_is_stored(atl, oai):
    d, _ = oai
    r = await atl.chat("hello", user="u", app="demo")
    sent = len(d.requests)
    with pytest.raises(InvalidParamError) as exc:
        await atl.chat(user="u", app="demo", conversation_id=r.conversation_id,
                       tool_results=[FunctionResult("call_nope", "x")])
    assert exc.value.code == "invalid_tool_result"
    assert len(d.requests) == sent  # the engine never saw it
    assert len(await atl.messages(r.conversation_id, user="u", app="demo")) == 2  # and nothing was written
    with pytest.raises(InvalidParamError):  # results with no conversation to follow
        await atl.chat(user="u", app="demo", tool_results=[FunctionResult("call_nope", "x")])
    assert len(d.requests) == sent


async def test_moving_on_with_text_leaves_an_unanswered_call_out(atl, oai):
    """The caller ignores the call and writes text: the next request must still be one the provider
    accepts (an unanswered call is a 400 at OpenAI)."""
    d, _ = oai
    r = await atl.chat("weather?", user="u", app="demo", tools=[WEATHER])
    assert r.tool_calls
    r2 = await atl.chat("never mind, say hi", user="u", app="demo", conversation_id=r.conversation_id)
    assert r2.status == "completed" and r2.answer.endswith("never mind, say hi")
    sent = d.requests[-1]["messages"]
    assert all("tool_calls" not in m and m["role"] != "tool" for m in sent)
    # the call-only answer is left out, so the two user turns go as one
    assert [m["role"] for m in sent] == ["system", "user"] and "weather?" in sent[1]["content"]


async def test_parameters_are_forwarded_and_the_callers_max_tokens_wins(atl, oai):
    d, _ = oai
    params = GenerationParams(temperature=0.3, top_p=0.9, stop=("END",), seed=7, max_tokens=33,
                              presence_penalty=0.5, frequency_penalty=-0.5)
    await atl.chat("hi", user="u", app="demo", params=params)
    body = d.requests[-1]
    assert {k: body[k] for k in ("temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty")} == {
        "temperature": 0.3, "top_p": 0.9, "stop": ["END"], "seed": 7, "presence_penalty": 0.5,
        "frequency_penalty": -0.5}
    assert body["max_tokens"] == 33


async def test_structured_output_json_schema(atl, oai):
    d, _ = oai
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "temp": {"type": "number"}},
              "required": ["city", "temp"]}
    r = await atl.chat("weather as JSON", user="u", app="demo",
                       params=GenerationParams(response_format=ResponseFormat("json_schema", schema, "weather", True)))
    assert d.requests[-1]["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "weather", "schema": schema, "strict": True}}
    assert json.loads(r.answer) == {"city": "example", "temp": 1.5}


async def test_an_engine_refuses_what_it_cannot_honour(oai, tmp_path):
    """NIM documents no penalties; a Dify app runs no caller tools: each is a 400 naming the field,
    and nothing is stored or sent."""
    d, url = oai
    tl = AsyncThreadline(database_url=f"sqlite+aiosqlite:///{tmp_path}/t.db", include_presets=False, engines={
        "nim": {"kind": "openai", "base_url": f"{url}/v1", "api_key": "sk-test-double-key", "model": "m",
                "profile": "nim"},
        "dify": {"kind": "dify", "base_url": "http://127.0.0.1:9/v1", "api_key": "app-x"}})
    try:
        sent = len(d.requests)
        with pytest.raises(InvalidParamError) as exc:
            await tl.chat("hi", user="u", engine="nim", params=GenerationParams(presence_penalty=1.0))
        assert exc.value.code == "unsupported_parameter" and exc.value.param == "presence_penalty"
        with pytest.raises(InvalidParamError) as exc:
            await tl.chat("hi", user="u", engine="dify", tools=[WEATHER])
        assert exc.value.code == "unsupported_parameter" and exc.value.param == "tools"
        with pytest.raises(InvalidParamError) as exc:
            await tl.chat("hi", user="u", engine="dify", params=GenerationParams(temperature=0.1))
        assert exc.value.param == "temperature"
        assert len(d.requests) == sent
        assert await tl.conversations(user="u") == []
    finally:
        await tl.aclose()


async def test_deepseek_thinking_mode_gets_its_reasoning_back_on_tool_call_turns(oai, tmp_path):
    d, url = oai
    d.provider, d.answer_mode = "deepseek", "reasoning_content"
    tl = AsyncThreadline(database_url=f"sqlite+aiosqlite:///{tmp_path}/t.db", include_presets=False, engines={
        "ds": {"kind": "openai", "base_url": f"{url}/v1", "api_key": "sk-test-double-key", "model": "deepseek-reasoner",
               "profile": "deepseek-reasoner"}})
    try:
        r = await tl.chat("weather?", user="u", tools=[WEATHER])
        assert r.tool_calls and r.reasoning == d.reasoning
        r2 = await tl.chat(user="u", conversation_id=r.conversation_id, tools=[WEATHER],
                           tool_results=[FunctionResult(r.tool_calls[0].call_id, "rain")])
        assert r2.answer == "Tool said: rain"
        [asst] = [m for m in d.requests[-1]["messages"] if m["role"] == "assistant"]
        assert asst["reasoning_content"] == d.reasoning
    finally:
        await tl.aclose()


# ---- the OpenAI-compatible route, with the official SDK ------------------------------------------------


@pytest.fixture
def server(oai, tmp_path):
    d, url = oai
    settings = Settings.build(
        database_url=f"sqlite+aiosqlite:///{tmp_path}/srv.db", include_presets=False,
        engines={**engines_for(url), "nim": {"kind": "openai", "base_url": f"{url}/v1", "api_key": "sk-test-double-key",
                                             "model": "m", "profile": "nim"}},
        apps={"demo": {"engine": "acc"}})
    key = asyncio.run(create_key(settings, "demo"))
    srv = LiveServer(create_app(settings)).start()
    yield srv.url, key, d
    srv.stop()


def test_openai_sdk_tool_loop_blocking_and_streaming(server):
    base, key, d = server
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
    msgs: list = [{"role": "user", "content": "weather in Oslo?"}]
    r = client.chat.completions.create(model="demo", messages=msgs, tools=[WEATHER_WIRE], user="t1")
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    msgs += [choice.message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": "snow"}]
    r2 = client.chat.completions.create(model="demo", messages=msgs, tools=[WEATHER_WIRE], user="t1")
    assert r2.choices[0].message.content == "Tool said: snow"
    # one conversation: the stored history matched, nothing was imported twice
    sent = d.requests[-1]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"]

    # streaming: the SDK reassembles the call from its deltas
    msgs2: list = [{"role": "user", "content": "weather in Bergen?"}]
    stream = client.chat.completions.create(model="demo", messages=msgs2, tools=[WEATHER_WIRE], stream=True, user="t1")
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for c in chunk.choices:
            for tc in c.delta.tool_calls or ():
                slot = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
                slot["id"] = slot["id"] or tc.id
                slot["name"] = slot["name"] or (tc.function.name if tc.function else None)
                slot["arguments"] += (tc.function.arguments or "") if tc.function else ""
            finish = c.finish_reason or finish
    assert finish == "tool_calls"
    assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == {"q": "weather in Bergen?"}


def test_openai_sdk_structured_output_parses(server):
    base, key, _ = server

    class Weather(BaseModel):
        city: str
        temp: float

    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
    r = client.chat.completions.parse(model="demo", messages=[{"role": "user", "content": "weather"}],
                                      response_format=Weather, user="t2")
    assert r.choices[0].message.parsed == Weather(city="example", temp=1.5)


@pytest.mark.parametrize(("extra", "param", "code"), [
    ({"n": 2}, "n", "unsupported_parameter"),
    ({"logprobs": True}, "logprobs", "unsupported_parameter"),
    ({"store": False}, "store", "unsupported_parameter"),
    ({"logit_bias": {"1": 2}}, "logit_bias", "unsupported_parameter"),
    ({"frobnicate": 1}, "frobnicate", "unrecognized_argument"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type", "invalid_value"),
    ({"tool_choice": "required"}, "tool_choice", "invalid_value"),
    ({"metadata": {"team": "x"}}, "metadata", "unsupported_parameter"),
])
def test_openai_route_refuses_what_it_cannot_honour(server, extra, param, code):
    base, key, d = server
    sent = len(d.requests)
    r = httpx.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                   json={"model": "demo", "messages": [{"role": "user", "content": "hi"}], **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == code and err["type"] == "invalid_request_error"
    assert len(d.requests) == sent


def test_openai_route_engine_specific_refusal_names_the_parameter(server):
    base, key, d = server
    r = httpx.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                   json={"model": "nim", "messages": [{"role": "user", "content": "hi"}], "presence_penalty": 1})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "presence_penalty"
    assert r.json()["error"]["code"] == "unsupported_parameter"


def test_openai_route_tool_message_rules(server):
    base, key, d = server
    h = {"Authorization": f"Bearer {key}"}
    orphan = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
              {"role": "tool", "tool_call_id": "call_x", "content": "?"}]
    r = httpx.post(f"{base}/v1/chat/completions", headers=h, json={"model": "demo", "messages": orphan})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_tool_result"
    unanswered = [{"role": "user", "content": "hi"},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                  {"role": "user", "content": "next"}]
    r = httpx.post(f"{base}/v1/chat/completions", headers=h, json={"model": "demo", "messages": unanswered})
    assert r.status_code == 400 and "call_1" in r.json()["error"]["message"]


def test_openai_route_forwards_parameters_and_finish_reason(server):
    base, key, d = server
    d.reply = "a b c"
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
    r = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "x"}], temperature=0.2,
                                       top_p=0.5, stop=["\n"], seed=3, max_completion_tokens=12, user="t3")
    body = d.requests[-1]
    assert (body["temperature"], body["top_p"], body["stop"], body["seed"], body["max_tokens"]) == (
        0.2, 0.5, ["\n"], 3, 12)
    assert r.choices[0].finish_reason == "stop"


def test_openai_route_continues_a_named_conversation(server):
    """The client names its conversation (header or metadata): only the new message is read, the
    stored history is sent, and the id comes back in the header."""
    base, key, d = server
    h = {"Authorization": f"Bearer {key}"}
    r = httpx.post(f"{base}/v1/chat/completions", headers=h,
                   json={"model": "demo", "messages": [{"role": "user", "content": "one"}], "user": "n1"})
    cid = r.headers["x-threadline-conversation-id"]
    r = httpx.post(f"{base}/v1/chat/completions", headers={**h, "X-Threadline-Conversation-Id": cid},
                   json={"model": "demo", "messages": [{"role": "user", "content": "two"}], "user": "n1"})
    assert r.status_code == 200 and r.headers["x-threadline-conversation-id"] == cid
    assert [m["content"] for m in d.requests[-1]["messages"]] == ["one", "Answer to: one", "two"]
    r = httpx.post(f"{base}/v1/chat/completions", headers=h,
                   json={"model": "demo", "messages": [{"role": "user", "content": "three"}], "user": "n1",
                         "metadata": {"threadline_conversation_id": cid}})
    assert r.status_code == 200 and len(d.requests[-1]["messages"]) == 5
    # another user naming it gets not-found, and nothing is added
    r = httpx.post(f"{base}/v1/chat/completions", headers={**h, "X-Threadline-Conversation-Id": cid},
                   json={"model": "demo", "messages": [{"role": "user", "content": "intrude"}], "user": "n2"})
    assert r.status_code == 404


def test_openai_route_finds_a_conversation_by_its_history_beyond_the_newest_fifty(server):
    """The resent history is matched through an index of history hashes: an old conversation behind
    55 newer ones continues (it used to be looked for among the newest 50 only, then imported anew)."""
    base, key, d = server
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
    first = [{"role": "user", "content": "the oldest one"}]
    r = client.chat.completions.with_raw_response.create(model="demo", messages=first, user="many")
    cid = r.headers["x-threadline-conversation-id"]
    answer = r.parse().choices[0].message.content
    for i in range(55):
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": f"filler {i}"}], user="many")
    again = client.chat.completions.with_raw_response.create(
        model="demo", user="many",
        messages=[*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "and then?"}])
    assert again.headers["x-threadline-conversation-id"] == cid
    assert [m["content"] for m in d.requests[-1]["messages"]] == ["the oldest one", answer, "and then?"]


async def test_a_stale_history_hash_is_recomputed_by_the_next_turn(atl, oai):
    """A turn that ended without its final write leaves the hash behind its messages: the next turn
    recomputes it from the rows, so the conversation stays findable."""
    from threadline.turns import PastMessage

    r1 = await atl.chat("one", user="u", app="demo")
    await atl.gateway.store.set_conversation_fields(r1.conversation_id, history_hash=None)
    r2 = await atl.chat("two", user="u", app="demo", conversation_id=r1.conversation_id)
    svc = atl.service
    history = [PastMessage("user", "one"), PastMessage("assistant", r1.answer), PastMessage("user", "two"),
               PastMessage("assistant", r2.answer)]
    assert await svc.find_conversation(svc.scope("demo", "u"), history) == r1.conversation_id
    assert await svc.find_conversation(svc.scope("demo", "u"), history[:3]) is None


@pytest.mark.parametrize(("message", "param", "code"), [
    ({"role": "user", "content": "hi", "name": "alice"}, "messages[0].name", "unsupported_parameter"),
    ({"role": "user", "content": "hi", "colour": "red"}, "messages[0].colour", "unrecognized_argument"),
    ({"role": "user", "content": "hi", "function_call": {"name": "f", "arguments": "{}"}}, "messages[0].function_call",
     "invalid_value"),
])
def test_openai_route_message_fields_are_read_or_refused(server, message, param, code):
    base, key, d = server
    sent = len(d.requests)
    r = httpx.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                   json={"model": "demo", "messages": [message]})
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["param"], r.json()["error"]["code"]) == (param, code)
    assert len(d.requests) == sent


def test_openai_route_takes_what_clients_echo_of_an_earlier_answer(server):
    """SDKs dump the assistant message they got (refusal, annotations, reasoning_content, null audio):
    accepted, and the stored answer is what goes on."""
    base, key, d = server
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
    r = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "one"}], user="echo")
    echoed = {**r.choices[0].message.model_dump(), "annotations": [], "reasoning_content": "thoughts"}
    r2 = client.chat.completions.create(model="demo", user="echo",
                                        messages=[{"role": "user", "content": "one"}, echoed,
                                                  {"role": "user", "content": "two"}])
    assert r2.choices[0].message.content == "Answer to: two"
    assert [m["content"] for m in d.requests[-1]["messages"]] == ["one", "Answer to: one", "two"]
