"""Tools, parameters and structured output on the Gemini engine, and a conversation with tool turns
moving between the OpenAI engine and Gemini and back: every request is checked by the strict doubles
(the Gemini double refuses what the real service refuses: a function response that answers no call,
a count or name mismatch, unknown fields, a signature it never issued, and on Gemini 3 a call turn
without its thought signature)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import orjson
import pytest

from tests.conftest import engines_for
from threadline import AsyncThreadline
from threadline.config import EngineConfig
from threadline.engines.base import EngineRequest
from threadline.engines.gemini import SKIP_SIGNATURE, GeminiEngine
from threadline.errors import InvalidParamError, UnsupportedParameterError
from threadline.messages import (
    ChatMessage,
    Finished,
    FunctionCall,
    FunctionResult,
    GenerationParams,
    ResponseFormat,
    TextDelta,
    ToolCallDelta,
    ToolChoice,
    ToolSpec,
    TurnCompleted,
)

PROVIDERS = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "providers" / "gemini"
WEATHER = ToolSpec("get_weather", "The weather in a city", {"type": "object", "properties": {"city": {"type": "string"}},
                                                              "required": ["city"], "additionalProperties": False})
TIME = ToolSpec("get_time", None, {"type": "object", "properties": {}})
GEM_WEATHER = {"functionDeclarations": [{"name": "get_weather", "description": "The weather in a city",
                                         "parametersJsonSchema": WEATHER.parameters}]}
KEY = "AIza-test-double-key-0000"


async def _post(url: str, body: dict, model: str = "gemini-2.5-pro") -> httpx.Response:
    async with httpx.AsyncClient() as c:
        return await c.post(f"{url}/v1beta/models/{model}:generateContent", json=body, headers={"x-goog-api-key": KEY})


@pytest.fixture(params=["gemini-2.5-pro", "gemini-3-pro-preview"])
async def xtl(request, oai, gem, tmp_path):
    """Apps demo→acc (OpenAI double) and gdemo→gem (Gemini double), Gemini 2.5 and the stricter 3."""
    engines = engines_for(oai[1], gem[1])
    engines["gem"]["model"] = request.param
    tl = AsyncThreadline(database_url=f"sqlite+aiosqlite:///{tmp_path}/x.db", engines=engines, include_presets=False,
                         apps={"demo": {"engine": "acc", "system": ["You are terse."]},
                               "gdemo": {"engine": "gem", "system": ["You are terse."]}})
    yield tl, request.param
    await tl.aclose()


# ---- the tool loop on Gemini ---------------------------------------------------------------------


async def test_gemini_tool_loop_blocking(atl, gem):
    d, _ = gem
    r = await atl.chat("weather in Paris?", user="u", app="gdemo", tools=[WEATHER])
    assert r.finish_reason == "tool_calls" and r.answer == ""
    [call] = r.tool_calls
    assert call.name == "get_weather" and json.loads(call.arguments) == {"q": "weather in Paris?"}
    assert call.call_id.startswith("call_0_")
    assert call.provider == "gemini" and call.signature in d.signatures  # kept to send back
    body = d.requests[-1]
    assert body["tools"] == [GEM_WEATHER] and "toolConfig" not in body

    r2 = await atl.chat(user="u", app="gdemo", conversation_id=r.conversation_id, tools=[WEATHER],
                        tool_results=[FunctionResult(call.call_id, "sunny, 21C")])
    assert r2.answer == "Tool said: sunny, 21C" and r2.finish_reason == "stop" and not r2.tool_calls
    contents = d.requests[-1]["contents"]
    assert [c["role"] for c in contents] == ["user", "model", "user"]
    assert contents[1]["parts"] == [{"functionCall": {"name": "get_weather", "args": {"q": "weather in Paris?"}},
                                     "thoughtSignature": call.signature}]
    assert contents[2]["parts"] == [{"functionResponse": {"name": "get_weather", "response": {"result": "sunny, 21C"}}}]

    msgs = await atl.messages(r.conversation_id, user="u", app="gdemo")
    assert msgs[1].items == [call] and msgs[1].finish_reason == "tool_calls"
    assert msgs[2].items == [FunctionResult(call.call_id, "sunny, 21C", "get_weather")]


async def test_gemini_tool_loop_streaming_with_a_json_result(atl, gem):
    d, _ = gem
    deltas, final = [], None
    async for ev in atl.stream("weather in Rome?", user="u", app="gdemo", tools=[WEATHER]):
        if isinstance(ev, ToolCallDelta):
            deltas.append(ev)
        elif isinstance(ev, TurnCompleted):
            final = ev.reply
    assert final is not None and final.finish_reason == "tool_calls"
    [delta] = deltas  # Gemini sends a call whole
    [call] = final.tool_calls
    assert (delta.call_id, delta.name, delta.arguments, delta.signature) == (
        call.call_id, "get_weather", call.arguments, call.signature)
    assert call.signature in d.signatures

    text = ""
    async for ev in atl.stream(user="u", app="gdemo", conversation_id=final.conversation_id, tools=[WEATHER],
                               tool_results=[FunctionResult(call.call_id, '{"temp": 18, "sky": "clear"}')]):
        if isinstance(ev, TurnCompleted):
            final = ev.reply
        elif isinstance(ev, TextDelta):
            text += ev.text
    assert final.answer == text == 'Tool said: {"temp":18,"sky":"clear"}' and final.finish_reason == "stop"
    # a JSON object result goes as the object itself
    assert d.requests[-1]["contents"][2]["parts"] == [
        {"functionResponse": {"name": "get_weather", "response": {"temp": 18, "sky": "clear"}}}]


async def test_parallel_calls_answered_out_of_order_go_back_in_call_order(atl, gem):
    d, _ = gem
    d.parallel_calls = 2
    r = await atl.chat("weather and time?", user="u", app="gdemo", tools=[WEATHER, TIME])
    first, second = r.tool_calls
    assert (first.name, second.name) == ("get_weather", "get_time") and first.call_id != second.call_id
    assert first.signature and second.signature is None  # Gemini signs the first call part only
    r2 = await atl.chat(user="u", app="gdemo", conversation_id=r.conversation_id, tools=[WEATHER, TIME],
                        tool_results=[FunctionResult(second.call_id, "noon"), FunctionResult(first.call_id, "rain")])
    assert r2.answer == "Tool said: rain; noon"
    contents = d.requests[-1]["contents"]
    assert [p["functionCall"]["name"] for p in contents[1]["parts"]] == ["get_weather", "get_time"]
    assert "thoughtSignature" not in contents[1]["parts"][1]
    assert [p["functionResponse"]["name"] for p in contents[2]["parts"]] == ["get_weather", "get_time"]


@pytest.mark.parametrize("choice,config,calls", [
    ("auto", {"mode": "AUTO"}, True),
    ("none", {"mode": "NONE"}, False),
    ("required", {"mode": "ANY"}, True),
    (ToolChoice("function", "get_time"), {"mode": "ANY", "allowedFunctionNames": ["get_time"]}, True),
])
async def test_tool_choice_becomes_function_calling_config(atl, gem, choice, config, calls):
    d, _ = gem
    r = await atl.chat("what now?", user="u", app="gdemo", tools=[WEATHER, TIME], tool_choice=choice)
    assert d.requests[-1]["toolConfig"] == {"functionCallingConfig": config}
    assert bool(r.tool_calls) is calls
    if isinstance(choice, ToolChoice):
        assert [c.name for c in r.tool_calls] == ["get_time"]


# ---- parameters ----------------------------------------------------------------------------------


async def test_parameters_are_forwarded_into_generation_config(atl, gem):
    d, _ = gem
    params = GenerationParams(temperature=0.3, top_p=0.9, stop=("END",), seed=7, max_tokens=33,
                              presence_penalty=0.5, frequency_penalty=-0.5, reasoning_effort="low")
    r = await atl.chat("hi", user="u", app="gdemo", params=params)
    assert r.status == "completed"
    assert d.requests[-1]["generationConfig"] == {
        "temperature": 0.3, "topP": 0.9, "stopSequences": ["END"], "seed": 7, "presencePenalty": 0.5,
        "frequencyPenalty": -0.5, "maxOutputTokens": 33,
        "thinkingConfig": {"includeThoughts": True, "thinkingBudget": 1024}}


async def test_structured_output_json_schema_and_json_object(atl, gem):
    d, _ = gem
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "temp": {"type": "number"}},
              "required": ["city", "temp"]}
    r = await atl.chat("weather as JSON", user="u", app="gdemo",
                       params=GenerationParams(response_format=ResponseFormat("json_schema", schema, "weather", True)))
    gen = d.requests[-1]["generationConfig"]
    assert gen["responseMimeType"] == "application/json" and gen["responseJsonSchema"] == schema
    assert json.loads(r.answer) == {"city": "example", "temp": 1.5}
    r = await atl.chat("any JSON", user="u", app="gdemo", params=GenerationParams(response_format=ResponseFormat("json_object")))
    gen = d.requests[-1]["generationConfig"]
    assert gen["responseMimeType"] == "application/json" and "responseJsonSchema" not in gen
    assert json.loads(r.answer) == {"answer": "ok"}


@pytest.mark.parametrize("kw,param", [
    ({"params": GenerationParams(parallel_tool_calls=False)}, "parallel_tool_calls"),
    ({"params": GenerationParams(reasoning_effort="none")}, "reasoning_effort"),  # 2.5 Pro cannot stop thinking
    ({"params": GenerationParams(reasoning_effort="xhigh")}, "reasoning_effort"),
])
async def test_what_gemini_cannot_honour_is_refused_naming_it(atl, gem, kw, param):
    d, _ = gem
    with pytest.raises(UnsupportedParameterError) as exc:
        await atl.chat("hi", user="u", app="gdemo", **kw)
    assert exc.value.code == "unsupported_parameter" and exc.value.param == param and exc.value.status == 400
    assert d.requests == []  # nothing sent
    assert await atl.conversations(user="u", app="gdemo") == []  # nothing stored


async def test_reasoning_effort_is_a_thinking_level_on_gemini_3(oai, gem, tmp_path):
    d, url = gem
    engines = engines_for(None, url)
    engines["gem"]["model"] = "gemini-3-pro-preview"
    tl = AsyncThreadline(database_url=f"sqlite+aiosqlite:///{tmp_path}/g3.db", engines=engines, include_presets=False)
    try:
        await tl.chat("hi", user="u", engine="gem", params=GenerationParams(reasoning_effort="high"))
        assert d.requests[-1]["generationConfig"]["thinkingConfig"] == {"includeThoughts": True, "thinkingLevel": "HIGH"}
        with pytest.raises(InvalidParamError) as exc:
            await tl.chat("hi", user="u", engine="gem", params=GenerationParams(reasoning_effort="none"))
        assert exc.value.param == "reasoning_effort"
    finally:
        await tl.aclose()


# ---- across engines ------------------------------------------------------------------------------


async def test_a_tool_conversation_moves_to_gemini_and_back(xtl, oai, gem):
    """OpenAI tool loop → Gemini (history in Gemini's shape, no OpenAI id posing as a signature) →
    Gemini tool loop → OpenAI (Gemini's signature never reaches it); every request accepted."""
    tl, model = xtl
    o, g = oai[0], gem[0]
    r = await tl.chat("weather in Paris?", user="u", app="demo", tools=[WEATHER])
    [ocall] = r.tool_calls
    assert ocall.provider is None and ocall.call_id.startswith("call_")
    r = await tl.chat(user="u", app="demo", conversation_id=r.conversation_id, tools=[WEATHER],
                      tool_results=[FunctionResult(ocall.call_id, "sunny")])
    assert r.answer == "Tool said: sunny"
    cid = r.conversation_id

    r = await tl.chat("and in Rome?", user="u", app="demo", conversation_id=cid, engine="gem", tools=[WEATHER])
    assert r.status == "completed" and r.engine == "gem"
    contents = g.requests[-1]["contents"]
    assert [c["role"] for c in contents] == ["user", "model", "user", "model", "user"]
    call_part = contents[1]["parts"][0]
    assert call_part["functionCall"] == {"name": "get_weather", "args": {"q": "weather in Paris?"}}
    # Gemini 3 gets Google's sentinel for a call it did not make; 2.5 gets no signature at all
    assert call_part.get("thoughtSignature") == (SKIP_SIGNATURE if "gemini-3" in model else None)
    assert contents[2]["parts"] == [{"functionResponse": {"name": "get_weather", "response": {"result": "sunny"}}}]
    assert ocall.call_id not in orjson.dumps(contents).decode()
    [gcall] = r.tool_calls
    assert gcall.provider == "gemini" and gcall.signature in g.signatures

    r = await tl.chat(user="u", app="demo", conversation_id=cid, engine="gem", tools=[WEATHER],
                      tool_results=[FunctionResult(gcall.call_id, "rain")])
    assert r.answer == "Tool said: rain"
    assert g.requests[-1]["contents"][5]["parts"][0]["thoughtSignature"] == gcall.signature

    sent = len(o.requests)
    r = await tl.chat("thanks, and Oslo?", user="u", app="demo", conversation_id=cid, tools=[WEATHER])
    assert r.engine == "acc" and r.status == "completed" and len(o.requests) == sent + 1
    body = o.requests[-1]
    raw = orjson.dumps(body).decode()
    assert gcall.signature not in raw and "thoughtSignature" not in raw and "signature" not in raw
    tool_msgs = [m for m in body["messages"] if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tool_msgs] == [ocall.call_id, gcall.call_id]
    asst = [m for m in body["messages"] if m.get("tool_calls")]
    assert [m["tool_calls"][0]["id"] for m in asst] == [ocall.call_id, gcall.call_id]


async def test_a_tool_loop_switching_engine_between_call_and_result(xtl, oai, gem):
    """The call comes from one provider and its result goes to the other, within one turn: on Gemini 3
    the unsigned foreign call is in the current turn, where Gemini checks signatures."""
    tl, model = xtl
    o, g = oai[0], gem[0]
    r = await tl.chat("weather in Lima?", user="u", app="demo", tools=[WEATHER])
    [ocall] = r.tool_calls
    r = await tl.chat(user="u", app="demo", conversation_id=r.conversation_id, engine="gem", tools=[WEATHER],
                      tool_results=[FunctionResult(ocall.call_id, "fog")])
    assert r.answer == "Tool said: fog"
    sig = g.requests[-1]["contents"][1]["parts"][0].get("thoughtSignature")
    assert sig == (SKIP_SIGNATURE if "gemini-3" in model else None)

    r = await tl.chat("and Quito?", user="u", app="gdemo", tools=[WEATHER])
    [gcall] = r.tool_calls
    r = await tl.chat(user="u", app="gdemo", conversation_id=r.conversation_id, engine="acc", tools=[WEATHER],
                      tool_results=[FunctionResult(gcall.call_id, "hail")])
    assert r.answer == "Tool said: hail"
    assert gcall.signature not in orjson.dumps(o.requests[-1]).decode()


# ---- the double is as strict as the service -------------------------------------------------------


def _call_turns(name="get_weather", sig=None, responses=None):
    part = {"functionCall": {"name": name, "args": {}}}
    if sig:
        part["thoughtSignature"] = sig
    return [{"role": "user", "parts": [{"text": "hi"}]}, {"role": "model", "parts": [part]},
            {"role": "user", "parts": responses if responses is not None else [
                {"functionResponse": {"name": name, "response": {"result": "x"}}}]}]


@pytest.mark.parametrize("body,model,message", [
    ({"contents": [{"role": "user", "parts": [{"functionResponse": {"name": "f", "response": {}}}]}]}, "gemini-2.5-pro",
     "function response turn comes immediately after a function call turn"),
    ({"contents": _call_turns(responses=[{"functionResponse": {"name": "get_weather", "response": {}}}] * 2)},
     "gemini-2.5-pro", "number of function response parts is equal to the number of function call parts"),
    ({"contents": _call_turns(responses=[{"functionResponse": {"name": "other", "response": {}}}])},
     "gemini-2.5-pro", "names the function"),
    ({"contents": _call_turns(sig="call_abc123")}, "gemini-2.5-pro", "Corrupted thought signature."),
    ({"contents": _call_turns()}, "gemini-3-pro-preview", "missing a thought_signature"),
    ({"contents": _call_turns()[:1], "generationConfig": {"parallelToolCalls": False}}, "gemini-2.5-pro",
     'Unknown name "parallelToolCalls"'),
    ({"contents": _call_turns()[:1], "toolConfig": {"functionCallingConfig": {"mode": "ANY", "strict": True}}},
     "gemini-2.5-pro", 'Unknown name "strict"'),
    ({"contents": _call_turns()[:1], "tools": [{"functionDeclarations": [
        {"name": "f", "parameters": {"type": "object", "additionalProperties": False}}]}]},
     "gemini-2.5-pro", 'Unknown name "additionalProperties"'),
    ({"contents": _call_turns()[:1], "tools": [{"functionDeclarations": [{"name": "f"}]}],
      "toolConfig": {"functionCallingConfig": {"mode": "AUTO", "allowedFunctionNames": ["f"]}}},
     "gemini-2.5-pro", "only be set when mode is ANY"),
])
async def test_the_gemini_double_refuses_what_gemini_refuses(gem, body, model, message):
    _, url = gem
    resp = await _post(url, body, model)
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["status"] == "INVALID_ARGUMENT" and err["code"] == 400 and message in err["message"]


async def test_the_gemini_double_accepts_the_sentinel_on_gemini_3_and_old_turns_unsigned(gem):
    _, url = gem
    assert (await _post(url, {"contents": _call_turns(sig=SKIP_SIGNATURE)}, "gemini-3-pro-preview")).status_code == 200
    # a call turn before the last user text is not the current turn: no signature needed there
    older = {"contents": [*_call_turns(), {"role": "model", "parts": [{"text": "ok"}]},
                          {"role": "user", "parts": [{"text": "next"}]}]}
    assert (await _post(url, older, "gemini-3-pro-preview")).status_code == 200


# ---- the engine parses what Gemini really sent -----------------------------------------------------


def _replay(body: bytes, ctype: str, model: str) -> GeminiEngine:
    cfg = EngineConfig(name="g", kind="gemini", model=model, base_url="https://x/v1beta", api_key="k")
    return GeminiEngine(cfg, httpx.AsyncClient(transport=httpx.MockTransport(
        lambda _: httpx.Response(200, content=body, headers={"content-type": ctype}))))


async def _events(engine: GeminiEngine, stream: bool) -> list:
    req = EngineRequest(messages=[ChatMessage("user", "x")], stream=stream, tools=[TIME])
    return [ev async for ev in engine.events(req)]


async def test_recorded_gemini_3_streamed_call_keeps_its_signature():
    raw = (PROVIDERS / "pydantic-ai_stream_toolcall_thought_signature_gemini-3-pro.0.sse").read_bytes()
    evs = await _events(_replay(raw, "text/event-stream", "gemini-3-pro-preview"), True)
    [call] = [e for e in evs if isinstance(e, ToolCallDelta)]
    assert call.name == "get_country" and call.arguments == "{}" and call.signature.startswith("EpwICpkI")
    assert call.call_id.startswith("call_0_")
    assert evs[-1] == Finished("tool_calls")


async def test_recorded_gemini_3_parallel_calls_get_distinct_ids():
    raw = (PROVIDERS / "pydantic-ai_generate_parallel_functioncalls_gemini-3-flash.0.json").read_bytes()
    evs = await _events(_replay(raw, "application/json", "gemini-3-flash-preview"), False)
    calls = [e for e in evs if isinstance(e, ToolCallDelta)]
    assert [c.name for c in calls] == ["generate_topic"] * 3 and len({c.call_id for c in calls}) == 3
    assert [c.index for c in calls] == [0, 1, 2]
    assert calls[0].signature and calls[1].signature is None and calls[2].signature is None
    assert evs[-1] == Finished("tool_calls")


async def test_foreign_signatures_never_reach_gemini():
    """A call another provider made (whatever its provider/signature fields say) goes without them."""
    engine = _replay(b"{}", "application/json", "gemini-2.5-pro")
    msgs = [ChatMessage("user", "q"),
            ChatMessage("assistant", "", calls=[FunctionCall("call_1", "get_time", "{}", "openai", "opaque-openai-state"),
                                                FunctionCall("call_2", "get_time", "not json")]),
            ChatMessage("user", "", results=[FunctionResult("call_2", "b", "get_time"),
                                             FunctionResult("call_1", "[1, 2]", "get_time")])]
    body = await engine.build_body(EngineRequest(messages=msgs, tools=[TIME]))
    assert "opaque-openai-state" not in orjson.dumps(body).decode()
    assert body["contents"][1]["parts"] == [{"functionCall": {"name": "get_time", "args": {}}},
                                            {"functionCall": {"name": "get_time", "args": {"arguments": "not json"}}}]
    # call order, and non-object JSON output goes as text
    assert body["contents"][2]["parts"] == [{"functionResponse": {"name": "get_time", "response": {"result": "[1, 2]"}}},
                                            {"functionResponse": {"name": "get_time", "response": {"result": "b"}}}]
    await engine.aclose()


async def test_a_strict_tool_is_honoured_with_validated_mode(atl, gem):
    """OpenAI's `strict` (schema adherence; openai-agents sends it on every function tool) maps to
    Gemini's VALIDATED function-calling mode; with tool_choice required, ANY already adheres."""
    d, _ = gem
    tool = ToolSpec("get_weather", None, {"type": "object", "properties": {"city": {"type": "string"}}}, strict=True)
    r = await atl.chat("weather?", user="u", app="gdemo", tools=[tool])
    assert r.tool_calls
    assert d.requests[-1]["toolConfig"] == {"functionCallingConfig": {"mode": "VALIDATED"}}
    await atl.chat("weather?", user="u", app="gdemo", tools=[tool], tool_choice="required")
    assert d.requests[-1]["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}
