"""Real OpenAI-ecosystem clients complete a tool loop against a live `threadline serve` process.

Each client (openai-agents with its Chat Completions model, LangChain `bind_tools`, `llm -T`, LiteLLM)
talks to `threadline serve` run as its own process with an app key; the engine behind it is the
strict OpenAI double, which refuses what OpenAI refuses and calls a tool when tools are offered and
the last message is the user's. Each test checks the double got the tool's result after the call,
and that the client's final answer is the double's answer to that result."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.doubles.live import serve_process
from tests.doubles.openai_double import OpenAIDouble

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def live(openai_double: tuple[OpenAIDouble, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[str, str, OpenAIDouble]]:
    """`threadline serve` in its own process, app `demo` on the double; (base url, app key, double)."""
    d, oai_url = openai_double
    tmp = tmp_path_factory.mktemp("serve")
    with serve_process(f'''database_url = "sqlite+aiosqlite:///{tmp}/serve.db"
[engines.acc]
kind = "openai"
base_url = "{oai_url}/v1"
api_key = "sk-test-double-key"
model = "m"
[engines.alt]
kind = "openai"
base_url = "{oai_url}/v1"
api_key = "sk-test-double-key"
model = "m"
[apps.demo]
engine = "acc"
engines = ["acc"]
[apps.other]
engine = "alt"
''', tmp, "demo") as (url, keys):
        yield url, keys["demo"], d


@pytest.fixture
def srv(live: tuple[str, str, OpenAIDouble]) -> tuple[str, str, OpenAIDouble]:
    live[2].reset()
    return live


def _tool_loop_reached_engine(d: OpenAIDouble, result: str) -> dict[str, Any]:
    """The double's last request carries the tool's result right after the call it answers."""
    sent = d.requests[-1]["messages"]
    assert [m["role"] for m in sent if m["role"] != "system"][-3:] == ["user", "assistant", "tool"], sent
    call, tool = sent[-2], sent[-1]
    assert tool["tool_call_id"] == call["tool_calls"][0]["id"]
    assert tool["content"] == result
    return call["tool_calls"][0]


# ---- openai-agents (Chat Completions model) --------------------------------------------------------------


def test_openai_agents_runner_completes_a_tool_loop(srv):
    from agents import Agent, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled
    from openai import AsyncOpenAI

    base, key, d = srv
    set_tracing_disabled(True)
    ran: list[str] = []

    @function_tool
    def get_weather(q: str) -> str:
        """The weather for a question."""
        ran.append(q)
        return "sunny, 21C"

    async def run() -> Any:
        client = AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
        agent = Agent(name="weather", instructions="Use the tool.", tools=[get_weather],
                      model=OpenAIChatCompletionsModel(model="demo", openai_client=client))
        try:
            return await Runner.run(agent, "weather in Oslo?")
        finally:
            await client.close()

    result = asyncio.run(run())
    assert ran == ["weather in Oslo?"]
    assert result.final_output == "Tool said: sunny, 21C"
    call = _tool_loop_reached_engine(d, "sunny, 21C")
    assert call["function"]["name"] == "get_weather"
    assert d.requests[-1]["messages"][0] == {"role": "system", "content": "Use the tool."}


def test_openai_agents_streamed_run_completes_a_tool_loop(srv):
    from agents import Agent, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled
    from openai import AsyncOpenAI

    base, key, d = srv
    set_tracing_disabled(True)

    @function_tool
    def get_weather(q: str) -> str:
        """The weather for a question."""
        return f"rain for {q}"

    async def run() -> Any:
        client = AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
        agent = Agent(name="weather", tools=[get_weather],
                      model=OpenAIChatCompletionsModel(model="demo", openai_client=client))
        try:
            res = Runner.run_streamed(agent, "weather in Rome?")
            async for _ in res.stream_events():
                pass
            return res
        finally:
            await client.close()

    result = asyncio.run(run())
    assert result.final_output == "Tool said: rain for weather in Rome?"
    assert all(r.get("stream") for r in d.requests[-2:])
    _tool_loop_reached_engine(d, "rain for weather in Rome?")


# ---- LangChain --------------------------------------------------------------------------------------------


def _langchain_loop(base: str, key: str, streaming: bool) -> tuple[Any, Any]:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"fog in {city}"

    llm = ChatOpenAI(base_url=f"{base}/v1", api_key=key, model="demo", max_retries=0, streaming=streaming)
    bound = llm.bind_tools([get_weather])
    msgs: list[Any] = [HumanMessage("weather in Paris?")]
    ai = bound.invoke(msgs)
    assert ai.tool_calls and ai.tool_calls[0]["name"] == "get_weather"
    msgs.append(ai)
    for tc in ai.tool_calls:
        # what LangChain's agents do: the tool runs on the call and answers with a ToolMessage that
        # carries the tool's name (sent as the tool message's `name`)
        out = get_weather.invoke({**tc, "args": {"city": "Paris"}})
        assert isinstance(out, ToolMessage) and out.name == "get_weather" and out.tool_call_id == tc["id"]
        msgs.append(out)
    return ai, bound.invoke(msgs)


@pytest.mark.parametrize("streaming", [False, True], ids=["blocking", "streaming"])
def test_langchain_bind_tools_completes_a_tool_loop(srv, streaming):
    base, key, d = srv
    ai, final = _langchain_loop(base, key, streaming)
    assert ai.tool_calls[0]["args"] == {"q": "weather in Paris?"}  # what the double writes
    assert final.content == "Tool said: fog in Paris"
    assert not final.tool_calls
    _tool_loop_reached_engine(d, "fog in Paris")


# ---- llm -T -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [[], ["--no-stream"]], ids=["streaming", "blocking"])
def test_llm_cli_tool_loop_completes(srv, tmp_path, mode):
    base, key, d = srv
    (tmp_path / "extra-openai-models.yaml").write_text(
        f"- model_id: threadline-demo\n  model_name: demo\n  api_base: {base}/v1\n  api_key_name: threadline\n"
        "  supports_tools: true\n  supports_schema: true\n")
    (tmp_path / "keys.json").write_text(json.dumps({"threadline": key}))
    env = {**os.environ, "LLM_USER_PATH": str(tmp_path), "LLM_LOAD_PLUGINS": ""}
    fn = "def get_weather(q: str) -> str:\n    'The weather for a question.'\n    return 'hail, 3C'\n"
    r = subprocess.run([str(BIN / "llm"), "-m", "threadline-demo", "--functions", fn, "--td", *mode,
                        "weather in Lima?"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("Tool said: hail, 3C"), (r.stdout, r.stderr)
    call = _tool_loop_reached_engine(d, "hail, 3C")
    assert call["function"]["name"] == "get_weather"
    assert all(bool(r.get("stream")) is not bool(mode) for r in d.requests[-2:])


# ---- LiteLLM as a client ----------------------------------------------------------------------------------


def test_litellm_completion_tool_loop(srv, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch from the internet on import
    import litellm

    base, key, d = srv
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    msgs: list[Any] = [{"role": "user", "content": "weather in Quito?"}]
    kw = {"model": "openai/demo", "api_base": f"{base}/v1", "api_key": key, "tools": tools, "num_retries": 0}
    r = litellm.completion(messages=msgs, **kw)
    [tc] = r.choices[0].message.tool_calls
    assert tc.function.name == "get_weather" and r.choices[0].finish_reason == "tool_calls"
    msgs += [r.choices[0].message.model_dump(), {"role": "tool", "tool_call_id": tc.id, "content": "mist"}]
    r2 = litellm.completion(messages=msgs, **kw)
    assert r2.choices[0].message.content == "Tool said: mist"
    _tool_loop_reached_engine(d, "mist")

    # streaming: LiteLLM reassembles the call from the deltas
    chunks = list(litellm.completion(messages=[{"role": "user", "content": "weather in Lima?"}], stream=True, **kw))
    call = litellm.stream_chunk_builder(chunks).choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"q": "weather in Lima?"}


# ---- what the clients send that the route must take -------------------------------------------------------


def test_openai_agents_tool_output_as_text_parts(srv):
    """A tool returning several text outputs reaches the route as a tool message whose content is an
    array of text parts; the result the engine gets is their text."""
    from agents import Agent, OpenAIChatCompletionsModel, Runner, ToolOutputText, function_tool, set_tracing_disabled
    from openai import AsyncOpenAI

    base, key, d = srv
    set_tracing_disabled(True)

    @function_tool
    def lookup(q: str) -> list:  # (not list[ToolOutputText]: the hint is evaluated in module globals)
        """Two facts."""
        return [ToolOutputText(text="first"), ToolOutputText(text="second")]

    async def run() -> Any:
        client = AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
        agent = Agent(name="facts", tools=[lookup], model=OpenAIChatCompletionsModel(model="demo", openai_client=client))
        try:
            return await Runner.run(agent, "facts?")
        finally:
            await client.close()

    assert asyncio.run(run()).final_output == "Tool said: first\nsecond"
    _tool_loop_reached_engine(d, "first\nsecond")


def test_an_image_in_a_tool_message_is_refused_not_dropped(srv):
    """A function result is text: an image part in a tool message used to vanish silently (the turn
    ran without it); it is refused, naming the part, before anything reaches the engine."""
    base, key, d = srv
    msgs = [{"role": "user", "content": "look"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "snap", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": [
                {"type": "text", "text": "here"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]
    r = httpx.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                   json={"model": "demo", "messages": msgs, "user": "img"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"], err["type"]) == ("messages[2].content", "invalid_value", "invalid_request_error")
    assert d.requests == []


# ---- GET /v1/models/{model_id} ------------------------------------------------------------------------------


def test_models_retrieve_names_what_the_key_may_use(srv):
    import openai

    base, key, _ = srv
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
    listed = {m.id: m.owned_by for m in client.models.list()}
    assert listed == {"demo": "threadline-app", "acc": "threadline-engine:openai"}
    for mid, owner in listed.items():
        m = client.models.retrieve(mid)
        assert (m.id, m.object, m.owned_by) == (mid, "model", owner) and m.created > 0
    # another app, an engine the app may not use, and nonsense do not exist for this key
    for mid in ("other", "alt", "gpt-nothing"):
        with pytest.raises(openai.NotFoundError) as exc:
            client.models.retrieve(mid)
        assert exc.value.code == "model_not_found" and exc.value.body["param"] == "model"
        assert mid in exc.value.body["message"]
    r = httpx.get(f"{base}/v1/models/demo")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
