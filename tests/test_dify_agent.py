"""Dify agent apps (issue 13): their `agent_thought` steps are the engine's OWN tool runs. They are
stored with the answer, rendered as Dify renders them (`agent_thought` stream events,
`agent_thoughts` in /messages), told in words to the next engine, and never handed to anyone as
function calls to answer. The Dify double's agent mode follows Dify 1.13's agent runner."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.doubles.dify_double import DifyDouble
from tests.doubles.live import LiveServer
from threadline import AsyncThreadline
from threadline.config import Settings
from threadline.context import transcript
from threadline.engines.dify import step_from_thought, thought_fields
from threadline.messages import AgentStep, FunctionCall, FunctionResult, TextDelta, TurnCompleted, items_to_json
from threadline.server.app import create_app
from threadline.server.keys import create_key

# Key order of Dify's stream events: the envelope, then the event model's fields (reference §3).
THOUGHT_KEYS = ["event", "conversation_id", "message_id", "created_at", "task_id", "id", "position", "thought",
                "observation", "tool", "tool_labels", "tool_input", "message_files"]
AGENT_MESSAGE_KEYS = ["event", "conversation_id", "message_id", "created_at", "task_id", "id", "answer"]
# fields/message_fields.py agent_thought_fields, in order.
LISTED_THOUGHT_KEYS = ["id", "chain_id", "message_id", "position", "thought", "tool", "tool_labels", "tool_input",
                       "created_at", "observation", "files"]


@pytest.fixture(scope="module")
def dify_server():
    d = DifyDouble()
    srv = LiveServer(d.app()).start()
    yield d, srv.url
    srv.stop()


def _engines(dify_url: str, api_key: str, oai_url: str) -> dict[str, dict]:
    return {"dify": {"kind": "dify", "base_url": f"{dify_url}/v1", "api_key": api_key, "max_retries": 0},
            "acc": {"kind": "openai", "base_url": f"{oai_url}/v1", "api_key": "sk-test-double-key", "model": "m"}}


@pytest.fixture
async def agent_tl(dify_server, oai, sqlite_url):
    d, url = dify_server
    d.reset(agent=True)
    tl = AsyncThreadline(database_url=sqlite_url, engines=_engines(url, d.api_key, oai[1]),
                         apps={"ag": {"engine": "dify"}}, include_presets=False)
    yield tl, d
    await tl.aclose()


@pytest.fixture
def agent_server(dify_server, oai, tmp_path):
    d, url = dify_server
    d.reset(agent=True)
    settings = Settings.build(database_url=f"sqlite+aiosqlite:///{tmp_path}/srv.db",
                              engines=_engines(url, d.api_key, oai[1]), apps={"ag": {"engine": "dify"}},
                              include_presets=False)
    key = asyncio.run(create_key(settings, "ag"))
    srv = LiveServer(create_app(settings)).start()
    yield srv.url, {"Authorization": f"Bearer {key}"}, d, url
    srv.stop()


def _the_weather_step(steps: list[AgentStep]) -> AgentStep:
    assert [s.position for s in steps] == [1, 2]
    tool_step = steps[0]
    assert tool_step.calls == (FunctionCall(tool_step.id, "get_weather", '{"city":"Paris"}'),)
    assert tool_step.results == (FunctionResult(tool_step.id, "Sunny, 21°C in Paris", "get_weather"),)
    assert tool_step.tool_labels == {"get_weather": {"en_US": "Get weather", "zh_Hans": "Get weather"}}
    assert steps[1].calls == () and steps[1].thought.startswith("It is sunny in Paris")
    return tool_step


# ---- parsing Dify's thoughts ------------------------------------------------------------------------


def test_a_thought_keyed_by_tool_name_becomes_calls_and_results_and_renders_back_the_same():
    single = {"id": "th1", "position": 1, "thought": "let me look", "tool": "get_weather", "tool_labels": {},
              "tool_input": '{"get_weather": {"city": "Zürich"}}', "observation": '{"get_weather": "Rain"}',
              "message_files": []}
    step = step_from_thought(single, 7)
    assert step.calls == (FunctionCall("th1", "get_weather", '{"city":"Zürich"}'),)
    assert step.results == (FunctionResult("th1", "Rain", "get_weather"),)
    assert thought_fields(step) == {k: single[k] for k in ("tool", "tool_input", "observation")}
    # The function-calling runner joins several tools of one step with ";" and keys both texts by name.
    multi = {"id": "th2", "position": 2, "thought": "", "tool": "search;calc", "tool_labels": {},
             "tool_input": '{"search": {"q": "x"}, "calc": {"expr": "1+1"}}',
             "observation": '{"search": "found x", "calc": "2"}', "message_files": ["f1"]}
    step = step_from_thought(multi, 7)
    assert [(c.call_id, c.name) for c in step.calls] == [("th2.1", "search"), ("th2.2", "calc")]
    assert [(r.call_id, r.output) for r in step.results] == [("th2.1", "found x"), ("th2.2", "2")]
    assert step.files == ("f1",)
    assert thought_fields(step) == {k: multi[k] for k in ("tool", "tool_input", "observation")}
    # A tool that has not returned yet has no result; text not keyed by name is kept whole.
    raw = step_from_thought({**single, "tool_input": "Paris", "observation": ""}, 0)
    assert raw.calls == (FunctionCall("th1", "get_weather", "Paris"),) and raw.results == ()
    assert AgentStep.from_json(step.to_json()) == step


# ---- through the Python API ---------------------------------------------------------------------------


async def test_blocking_chat_on_an_agent_app_streams_upstream_and_keeps_the_steps(agent_tl):
    tl, d = agent_tl
    r = await tl.chat("weather in Paris", user="alice", app="ag")
    assert r.answer == "It is sunny in Paris: Sunny, 21°C in Paris."
    # Dify refused blocking mode; the engine asked again streaming and remembers that for this app.
    assert [b["response_mode"] for b in d.requests] == ["blocking", "streaming"]
    tool_step = _the_weather_step(r.steps)
    assert r.tool_calls == [] and r.finish_reason == "stop"  # nothing for the caller to run
    r2 = await tl.chat("and in Oslo", user="alice", app="ag", conversation_id=r.conversation_id)
    assert [b["response_mode"] for b in d.requests[2:]] == ["streaming"]
    assert r2.steps[0].calls[0].arguments == '{"city":"Oslo"}'
    msgs = await tl.messages(r.conversation_id, user="alice")
    stored = [i for i in msgs[1].items if isinstance(i, AgentStep)]
    assert stored[0] == tool_step and len(stored) == 2
    assert not [i for i in msgs[1].items if isinstance(i, FunctionCall | FunctionResult)]


async def test_streamed_steps_come_before_the_answer_and_grow_in_place(agent_tl):
    tl, _ = agent_tl
    events = [ev async for ev in tl.stream("weather in Paris", user="alice", app="ag")]
    steps = [ev for ev in events if isinstance(ev, AgentStep)]
    # Dify sends a thought whole each time it changes: created, with its call, with its result.
    assert [len(s.calls) + len(s.results) for s in steps if s.position == 1] == [0, 1, 2]
    first_text = next(i for i, ev in enumerate(events) if isinstance(ev, TextDelta))
    assert all(isinstance(ev, AgentStep) for ev in events[first_text - 1:first_text])
    final = events[-1]
    assert isinstance(final, TurnCompleted)
    _the_weather_step(final.reply.steps)
    assert final.reply.tool_calls == []


async def test_the_next_turn_on_a_stateless_engine_hears_the_tool_run_in_words_never_as_calls(agent_tl, oai):
    tl, _ = agent_tl
    od, _ = oai
    r = await tl.chat("weather in Paris", user="alice", app="ag")
    r2 = await tl.chat("should I take an umbrella?", user="alice", app="ag", conversation_id=r.conversation_id,
                       engine="acc")
    assert r2.status == "completed"  # the strict OpenAI double refuses orphan tool messages: none were sent
    msgs = od.requests[-1]["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert not any(m.get("tool_calls") or m.get("tool_call_id") for m in msgs)
    told = msgs[1]["content"]
    assert "get_weather" in told and '{"city":"Paris"}' in told and "Sunny, 21°C in Paris" in told
    assert told.endswith(r.answer)


async def test_a_key_a_tool_returns_is_redacted_before_it_is_streamed_or_stored(agent_tl):
    tl, d = agent_tl
    d.agent_observation = f"token is {d.api_key}"
    events = [ev async for ev in tl.stream("weather in Paris", user="alice", app="ag")]
    outputs = [r.output for ev in events if isinstance(ev, AgentStep) for r in ev.results]
    assert outputs and all(d.api_key not in o and "***" in o for o in outputs)
    msgs = await tl.messages(events[-1].reply.conversation_id, user="alice")
    assert d.api_key not in json.dumps(items_to_json(msgs[1].items))


def test_transcript_tells_an_agents_tool_runs_to_a_stateful_engine():
    step = AgentStep("t", 1, "", (FunctionCall("t", "get_weather", '{"city":"Paris"}'),),
                     (FunctionResult("t", "Sunny", "get_weather"),))
    rows = [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": "Sunny.", "parts": items_to_json([step])}]
    assert transcript(rows) == ('User: weather?\nAssistant: [The assistant ran its tool get_weather with '
                                '{"city":"Paris"}; it returned: Sunny]\nAssistant: Sunny.')


# ---- through Threadline's Dify service API --------------------------------------------------------------


def _frames(body: str) -> list[dict]:
    return [json.loads(x[6:]) for x in body.split("\n\n") if x.startswith("data: ")]


def test_dify_route_streams_agent_thoughts_and_lists_them_in_messages(agent_server):
    base, headers, d, dify_url = agent_server
    with httpx.Client(base_url=base, headers=headers, timeout=30) as c:
        r = c.post("/v1/chat-messages", json={"query": "weather in Paris", "user": "alice", "inputs": {},
                                              "response_mode": "streaming"})
        assert r.status_code == 200
        frames = _frames(r.text)
        kinds = [f["event"] for f in frames]
        # As the agent app streamed it: thoughts, the answer as agent_message, then message_end.
        assert kinds == ["agent_thought"] * 4 + ["agent_message"] * 2 + ["agent_thought", "message_end"]
        thoughts = [f for f in frames if f["event"] == "agent_thought"]
        assert all(list(f) == THOUGHT_KEYS for f in thoughts)
        assert all(list(f) == AGENT_MESSAGE_KEYS for f in frames if f["event"] == "agent_message")
        tool = thoughts[2]
        assert (tool["tool"], tool["tool_input"], tool["observation"]) == (
            "get_weather", '{"get_weather": {"city": "Paris"}}', '{"get_weather": "Sunny, 21°C in Paris"}')
        assert tool["tool_labels"] == {"get_weather": {"en_US": "Get weather", "zh_Hans": "Get weather"}}
        # The same thought (its id) grows: created empty, then its tool and input, then the observation.
        assert thoughts[0]["id"] == tool["id"] and thoughts[0]["tool"] == thoughts[1]["observation"] == ""
        cid = frames[-1]["conversation_id"]
        m = c.get("/v1/messages", params={"conversation_id": cid, "user": "alice"}).json()["data"][0]
        listed = m["agent_thoughts"]
        assert [list(t) for t in listed] == [LISTED_THOUGHT_KEYS] * 2
        assert [t["position"] for t in listed] == [1, 2] and all(t["message_id"] == m["id"] for t in listed)
        assert {k: listed[0][k] for k in ("id", "tool", "tool_input", "observation", "tool_labels")} == {
            k: tool[k] for k in ("id", "tool", "tool_input", "observation", "tool_labels")}
        assert listed[1]["thought"] == m["answer"] and listed[1]["tool"] == ""
        # What the agent app itself lists for that answer, field for field but the message id.
        remote_cid, conv = next(iter(d.conversations.items()))
        theirs = httpx.get(f"{dify_url}/v1/messages", headers={"Authorization": f"Bearer {d.api_key}"},
                           params={"conversation_id": remote_cid, "user": conv["user"]}).json()["data"][0]
        assert [{k: v for k, v in t.items() if k != "message_id"} for t in listed] == [
            {k: v for k, v in t.items() if k != "message_id"} for t in theirs["agent_thoughts"]]


def test_dify_route_blocking_answers_and_lists_the_thoughts(agent_server):
    base, headers, d, _ = agent_server
    with httpx.Client(base_url=base, headers=headers, timeout=30) as c:
        r = c.post("/v1/chat-messages", json={"query": "weather in Oslo", "user": "bob", "inputs": {},
                                              "response_mode": "blocking"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["answer"] == "It is sunny in Oslo: Sunny, 21°C in Oslo."
        m = c.get("/v1/messages", params={"conversation_id": body["conversation_id"], "user": "bob"}).json()
        thoughts = m["data"][0]["agent_thoughts"]
        assert thoughts[0]["tool_input"] == '{"get_weather": {"city": "Oslo"}}'
        assert thoughts[0]["observation"] == '{"get_weather": "Sunny, 21°C in Oslo"}'
