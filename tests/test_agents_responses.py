"""openai-agents with its default model class (OpenAIResponsesModel, i.e. `POST /v1/responses`) and
LangChain's `ChatOpenAI(use_responses_api=True)` run tool loops against a live `threadline serve`
process, over the strict OpenAI-compatible double and over the Gemini double.

Each test checks three things: the tool ran, the client's final output is the double's answer to
the tool's result ("Tool said: <result>"), and what the engine behind received — the call and its
result in the provider's own shape (Chat Completions `tool_calls` + `role: tool`; Gemini
`functionCall` + `functionResponse`), after the whole history."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.doubles.gemini_double import GeminiDouble
from tests.doubles.live import serve_process
from tests.doubles.openai_double import OpenAIDouble

APPS = {"demo": "openai", "gdemo": "gemini"}


@pytest.fixture(scope="module")
def live(openai_double: tuple[OpenAIDouble, str], gemini_double: tuple[GeminiDouble, str],
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`threadline serve` in its own process: app `demo` on the OpenAI-compatible double, `gdemo` on the
    Gemini double (an engine of kind "gemini")."""
    tmp = tmp_path_factory.mktemp("agents")
    with serve_process(f'''database_url = "sqlite+aiosqlite:///{tmp}/serve.db"
[engines.acc]
kind = "openai"
base_url = "{openai_double[1]}/v1"
api_key = "sk-test-double-key"
model = "m"
[engines.gem]
kind = "gemini"
base_url = "{gemini_double[1]}/v1beta"
api_key = "AIza-test-double-key-0000"
model = "gemini-2.5-pro"
[apps.demo]
engine = "acc"
[apps.gdemo]
engine = "gem"
''', tmp, "demo", "gdemo") as (url, keys):
        yield {"url": url, "keys": keys, "oai": openai_double[0], "gem": gemini_double[0]}


@pytest.fixture
def env(live: dict[str, Any]) -> dict[str, Any]:
    live["oai"].reset()
    live["gem"].reset()
    return live


@pytest.fixture
def agents_sdk() -> Iterator[None]:
    """The Agents SDK's process-wide defaults, restored after the test."""
    from agents.models import _openai_shared

    saved = (_openai_shared.get_default_openai_client(), _openai_shared.get_use_responses_by_default())
    yield
    _openai_shared.set_default_openai_client(saved[0])  # type: ignore[arg-type]
    _openai_shared.set_use_responses_by_default(saved[1])


# ---- what the engine double received --------------------------------------------------------------


def _openai_received(d: OpenAIDouble, question: str, result: str, *, index: int = -1) -> dict[str, Any]:
    """The Chat Completions request carries the user's question, the assistant's call and the tool
    message answering it, in that order; the call it answers is returned."""
    sent = d.requests[index]["messages"]
    convo = [m for m in sent if m["role"] != "system"]
    assert [m["role"] for m in convo][-3:] == ["user", "assistant", "tool"], sent
    user, call, tool = convo[-3:]
    assert user["content"] == question
    [tc] = call["tool_calls"]
    assert tool == {"role": "tool", "tool_call_id": tc["id"], "content": result}
    return tc


def _gemini_received(d: GeminiDouble, question: str, result: str, *, index: int = -1) -> dict[str, Any]:
    """The generateContent request carries the user's text, the model's functionCall (with the
    thoughtSignature Gemini signed it with) and a user functionResponse of the same name."""
    contents = d.requests[index]["contents"]
    assert [c["role"] for c in contents][-3:] == ["user", "model", "user"], contents
    user, model, answer = contents[-3:]
    assert [p.get("text") for p in user["parts"]] == [question]
    [call] = [p for p in model["parts"] if "functionCall" in p]
    assert call.get("thoughtSignature") in d.signatures
    [resp] = answer["parts"]
    assert resp["functionResponse"]["name"] == call["functionCall"]["name"]
    assert resp["functionResponse"]["response"] == {"result": result}
    return call["functionCall"]


def _received(env: dict[str, Any], app: str, question: str, result: str, *, index: int = -1) -> tuple[str, Any]:
    """(tool name, arguments) of the call the engine got the result of."""
    if APPS[app] == "openai":
        tc = _openai_received(env["oai"], question, result, index=index)
        return tc["function"]["name"], json.loads(tc["function"]["arguments"])
    fc = _gemini_received(env["gem"], question, result, index=index)
    return fc["name"], fc["args"]


def _engine_requests(env: dict[str, Any], app: str) -> list[dict[str, Any]]:
    return env["oai"].requests if APPS[app] == "openai" else env["gem"].requests


# ---- openai-agents, default model class -------------------------------------------------------------


class Wire:
    """What the client sent to Threadline and the conversation each answer named (an httpx hook)."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.conversations: list[str] = []

    async def request(self, req: Any) -> None:
        if req.url.path.endswith("/responses"):
            self.bodies.append(json.loads(req.content))

    async def response(self, resp: Any) -> None:
        if resp.request.url.path.endswith("/responses"):
            self.conversations.append(resp.headers.get("x-threadline-conversation-id"))


def _agent(env: dict[str, Any], app: str, ran: list[str]) -> tuple[Any, Any, Wire]:
    """An Agent with a function tool and no model class named: the SDK's default (Responses) model,
    on a default client pointed at Threadline, model name = the app."""
    from agents import Agent, function_tool, set_default_openai_api, set_default_openai_client, set_tracing_disabled
    from openai import AsyncOpenAI

    wire = Wire()
    http = httpx.AsyncClient(event_hooks={"request": [wire.request], "response": [wire.response]})
    client = AsyncOpenAI(base_url=f"{env['url']}/v1", api_key=env["keys"][app], max_retries=0, http_client=http)
    set_default_openai_client(client, use_for_tracing=False)
    set_default_openai_api("responses")
    set_tracing_disabled(True)

    @function_tool
    def get_weather(q: str) -> str:
        """The weather for a question."""
        ran.append(q)
        return f"sunny, 21C ({len(ran)})"

    return Agent(name="weather", instructions="Use the tool.", tools=[get_weather], model=app), client, wire


async def _run(agent: Any, text: str, *, streamed: bool, **kw: Any) -> Any:
    from agents import Runner

    if not streamed:
        return await Runner.run(agent, text, **kw)
    res = Runner.run_streamed(agent, text, **kw)
    raw = set()
    async for ev in res.stream_events():
        if ev.type == "raw_response_event":
            raw.add(ev.data.type)
    # the semantic Responses events reached the runner: a call's arguments, the answer's text
    assert {"response.created", "response.function_call_arguments.delta", "response.output_text.delta",
            "response.completed"} <= raw, raw
    return res


def _instructions_reached(env: dict[str, Any], app: str) -> None:
    for req in _engine_requests(env, app):
        if APPS[app] == "openai":
            assert req["messages"][0] == {"role": "system", "content": "Use the tool."}
        else:
            assert req["systemInstruction"] == {"parts": [{"text": "Use the tool."}]}


@pytest.mark.parametrize("streamed", [False, True], ids=["run", "run_streamed"])
@pytest.mark.parametrize("app", list(APPS))
def test_agents_default_model_runs_a_tool_to_the_final_answer(env, agents_sdk, app, streamed):
    """Without server state the SDK resends every item: the second request replays the question and
    the call, and Threadline continues the conversation it stored rather than starting a copy (for
    Gemini, the call goes back with the thoughtSignature Gemini signed it with)."""
    from agents.models.multi_provider import MultiProvider
    from agents.models.openai_responses import OpenAIResponsesModel

    ran: list[str] = []
    agent, client, wire = _agent(env, app, ran)
    assert type(MultiProvider().get_model(app)) is OpenAIResponsesModel  # the default class, not chat

    async def go() -> Any:
        try:
            return await _run(agent, "weather in Oslo?", streamed=streamed)
        finally:
            await client.close()

    result = asyncio.run(go())
    assert ran == ["weather in Oslo?"]  # the doubles call the first tool with {"q": <the user's text>}
    assert result.final_output == "Tool said: sunny, 21C (1)"
    assert _received(env, app, "weather in Oslo?", "sunny, 21C (1)") == ("get_weather", {"q": "weather in Oslo?"})
    assert len(_engine_requests(env, app)) == 2
    _instructions_reached(env, app)
    assert [bool(b.get("stream")) for b in wire.bodies] == [streamed, streamed]
    # (with the reasoning item Gemini's thoughts came back as, when there are some)
    assert [i.get("type", "message") for i in wire.bodies[1]["input"] if i.get("type") != "reasoning"] == [
        "message", "function_call", "function_call_output"]
    assert "previous_response_id" not in wire.bodies[1]
    assert wire.conversations[0] and wire.conversations == [wire.conversations[0]] * 2


@pytest.mark.parametrize("streamed", [False, True], ids=["run", "run_streamed"])
@pytest.mark.parametrize("app", list(APPS))
def test_agents_previous_response_id_chain_sends_only_new_items(env, agents_sdk, app, streamed):
    """`auto_previous_response_id=True`, then a second run continuing from the first's last response:
    every request after the first carries previous_response_id and only its new items (the tool's
    output, then the next question), and the engine still receives the whole history each time."""
    ran: list[str] = []
    agent, client, wire = _agent(env, app, ran)

    async def go() -> tuple[Any, Any]:
        try:
            r1 = await _run(agent, "weather in Oslo?", streamed=streamed, auto_previous_response_id=True)
            r2 = await _run(agent, "and in Rome?", streamed=streamed, auto_previous_response_id=True,
                            previous_response_id=r1.last_response_id)
            return r1, r2
        finally:
            await client.close()

    r1, r2 = asyncio.run(go())
    assert ran == ["weather in Oslo?", "and in Rome?"]
    assert (r1.final_output, r2.final_output) == ("Tool said: sunny, 21C (1)", "Tool said: sunny, 21C (2)")
    assert r1.last_response_id.startswith("resp_") and r2.last_response_id.startswith("resp_")

    # the client: four requests, each after the first chained to the one before, with only new items
    b = wire.bodies
    assert len(b) == 4
    assert "previous_response_id" not in b[0]
    assert [x.get("previous_response_id") for x in b[1:]] == [r1.raw_responses[0].response_id,
                                                               r1.last_response_id, r2.raw_responses[0].response_id]
    assert b[1]["input"] == [{"type": "function_call_output", "call_id": b[1]["input"][0]["call_id"],
                              "output": "sunny, 21C (1)"}]
    assert b[2]["input"] == [{"role": "user", "content": "and in Rome?"}]
    assert [i["type"] for i in b[3]["input"]] == ["function_call_output"]
    assert len(set(wire.conversations)) == 1  # one stored conversation throughout

    # the engine: the whole history on the last request, in the provider's own shape
    assert _received(env, app, "and in Rome?", "sunny, 21C (2)") == ("get_weather", {"q": "and in Rome?"})
    reqs = _engine_requests(env, app)
    assert len(reqs) == 4
    _instructions_reached(env, app)
    if APPS[app] == "openai":
        convo = [m for m in reqs[-1]["messages"] if m["role"] != "system"]
        assert [m["role"] for m in convo] == ["user", "assistant", "tool", "assistant", "user", "assistant", "tool"]
        assert convo[0]["content"] == "weather in Oslo?" and convo[2]["content"] == "sunny, 21C (1)"
        assert convo[3]["content"] == "Tool said: sunny, 21C (1)"
    else:
        contents = reqs[-1]["contents"]
        assert [c["role"] for c in contents] == ["user", "model", "user", "model", "user", "model", "user"]
        assert contents[0]["parts"] == [{"text": "weather in Oslo?"}]
        assert contents[2]["parts"][0]["functionResponse"]["response"] == {"result": "sunny, 21C (1)"}
        assert contents[3]["parts"] == [{"text": "Tool said: sunny, 21C (1)"}]
        # every call goes back signed, the older one included
        assert all(p.get("thoughtSignature") in env["gem"].signatures
                   for c in contents for p in c["parts"] if "functionCall" in p)


# ---- LangChain ChatOpenAI over the Responses API ----------------------------------------------------------


def _langchain_loop(env: dict[str, Any], app: str, **kw: Any) -> tuple[Any, Any, list[dict[str, Any]]]:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(q: str) -> str:
        """The weather for a question."""
        return "fog, 9C"

    bodies: list[dict[str, Any]] = []
    client = httpx.Client(event_hooks={"request": [lambda r: bodies.append(json.loads(r.content))]})
    llm = ChatOpenAI(base_url=f"{env['url']}/v1", api_key=env["keys"][app], model=app, max_retries=0,
                     use_responses_api=True, http_client=client, **kw)
    bound = llm.bind_tools([get_weather])
    msgs: list[Any] = [HumanMessage("weather in Paris?")]
    ai = bound.invoke(msgs)
    msgs.append(ai)
    for tc in ai.tool_calls:
        out = get_weather.invoke(tc)
        assert isinstance(out, ToolMessage) and out.tool_call_id == tc["id"]
        msgs.append(out)
    return ai, bound.invoke(msgs), bodies


@pytest.mark.parametrize("mode", ["blocking", "streaming", "previous_response_id"])
@pytest.mark.parametrize("app", list(APPS))
def test_langchain_responses_api_tool_round_trip(env, app, mode):
    kw = {"streaming": True} if mode == "streaming" else {"use_previous_response_id": True} \
        if mode == "previous_response_id" else {}
    ai, final, bodies = _langchain_loop(env, app, **kw)
    assert [(c["name"], c["args"]) for c in ai.tool_calls] == [("get_weather", {"q": "weather in Paris?"})]
    assert final.text == "Tool said: fog, 9C" and not final.tool_calls
    assert _received(env, app, "weather in Paris?", "fog, 9C") == ("get_weather", {"q": "weather in Paris?"})
    assert len(bodies) == 2 and all(bool(b.get("stream")) is (mode == "streaming") for b in bodies)
    kinds = [i.get("type", "message") for i in bodies[1]["input"] if i.get("type") != "reasoning"]
    if mode == "previous_response_id":
        assert bodies[1]["previous_response_id"] == ai.response_metadata["id"]
        assert kinds == ["function_call_output"]
    else:
        assert "previous_response_id" not in bodies[1]
        assert kinds == ["message", "function_call", "function_call_output"]
