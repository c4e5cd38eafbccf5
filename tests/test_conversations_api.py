"""OpenAI's Conversations API against a live server, driven by the official `openai` SDK (and
openai-agents' OpenAIConversationsSession) over the strict OpenAI double: what the client sees, and
what the engine behind is sent once items were added or deleted. Also: the path it shares with
Dify's routes answers each API in its own way, and one conversation continues across surfaces."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import engines_for
from tests.doubles.live import LiveServer
from threadline.config import Settings
from threadline.server.app import create_app
from threadline.server.keys import create_key
from threadline.store import Store

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather for a question",
           "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}


@pytest.fixture(scope="module")
def live(openai_double, tmp_path_factory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("conversations")
    settings = Settings.build(database_url=f"sqlite+aiosqlite:///{tmp}/c.db", include_presets=False,
                              engines=engines_for(openai_double[1]),
                              apps={"demo": {"engine": "acc"}, "other": {"engine": "acc"}})
    keys = {app: asyncio.run(create_key(settings, app)) for app in ("demo", "other")}
    srv = LiveServer(create_app(settings)).start()
    try:
        yield {"url": srv.url, "keys": keys, "oai": openai_double[0], "db": f"sqlite+aiosqlite:///{tmp}/c.db",
               "settings": settings}
    finally:
        srv.stop()


@pytest.fixture
def env(live) -> dict[str, Any]:
    live["oai"].reset()
    return live


def client(env: dict[str, Any], app: str = "demo") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{env['url']}/v1", api_key=env["keys"][app], max_retries=0)


def http(env: dict[str, Any], app: str = "demo") -> httpx.Client:
    return httpx.Client(base_url=env["url"], headers={"Authorization": f"Bearer {env['keys'][app]}"})


def sent(env: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(m["role"], m.get("content")) for m in env["oai"].requests[-1]["messages"] if m["role"] != "system"]


def uuid_of(conv_id: str) -> str:
    h = conv_id.removeprefix("conv_")
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def user(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def assistant(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}


# ---- the conversation object -------------------------------------------------------------------------

def test_create_retrieve_update_delete(env):
    c = client(env)
    conv = c.conversations.create(metadata={"topic": "demo"})
    assert conv.id.startswith("conv_") and conv.object == "conversation" and conv.metadata == {"topic": "demo"}
    assert c.conversations.retrieve(conv.id).created_at == conv.created_at
    assert c.conversations.update(conv.id, metadata={"k": "v"}).metadata == {"k": "v"}
    assert c.conversations.retrieve(conv.id).metadata == {"k": "v"}
    gone = c.conversations.delete(conv.id)
    assert (gone.id, gone.object, gone.deleted) == (conv.id, "conversation.deleted", True)
    with pytest.raises(openai.NotFoundError) as err:
        c.conversations.retrieve(conv.id)
    assert err.value.body["code"] == "not_found"


def test_metadata_and_item_limits_are_openais(env):
    c = client(env)
    with pytest.raises(openai.BadRequestError):
        c.conversations.create(metadata={f"k{i}": "v" for i in range(17)})
    with pytest.raises(openai.BadRequestError) as err:
        c.conversations.create(items=[user(f"q{i}") for i in range(21)])
    assert err.value.body["param"] == "items"
    conv = c.conversations.create()
    with pytest.raises(openai.BadRequestError) as err:
        c.conversations.items.create(conv.id, items=[{"role": "system", "content": "be nice"}])
    assert (err.value.body["code"], err.value.body["param"]) == ("unsupported_parameter", "items[0].role")
    with pytest.raises(openai.BadRequestError) as err:
        c.conversations.items.create(conv.id, items=[user("ok"), {"type": "web_search_call", "id": "ws_1"}])
    assert err.value.body["param"] == "items[1].type"
    assert c.conversations.items.list(conv.id).data == []  # nothing of a refused request was kept


def test_another_apps_conversation_is_not_found(env):
    mine = client(env).conversations.create(items=[user("private")])
    theirs = client(env, "other")
    for call in (lambda: theirs.conversations.retrieve(mine.id),
                 lambda: theirs.conversations.update(mine.id, metadata={}),
                 lambda: theirs.conversations.delete(mine.id),
                 lambda: theirs.conversations.items.list(mine.id),
                 lambda: theirs.conversations.items.create(mine.id, items=[user("x")]),
                 lambda: theirs.responses.create(model="other", input="x", conversation=mine.id)):
        with pytest.raises(openai.NotFoundError) as err:
            call()
        assert err.value.body["code"] == "not_found" and set(err.value.body) == {"message", "type", "param", "code"}
    assert [i.content[0].text for i in client(env).conversations.items.list(mine.id).data] == ["private"]


# ---- items ---------------------------------------------------------------------------------------------

def test_created_items_come_back_with_their_ids_in_order(env):
    c = client(env)
    conv = c.conversations.create(items=[user("weather in Oslo?")])
    added = c.conversations.items.create(conv.id, items=[
        {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "look it up"}]},
        assistant("Let me check."),
        {"type": "function_call", "call_id": "call_a", "name": "get_weather", "arguments": '{"q":"Oslo"}'},
        {"type": "function_call_output", "call_id": "call_a", "output": "cold"},
        assistant("It is cold."),
    ])
    assert [i.type for i in added.data] == ["reasoning", "message", "function_call", "function_call_output", "message"]
    assert added.first_id == added.data[0].id and added.last_id == added.data[-1].id
    prefixes = [i.id.split("_")[0] for i in added.data]
    assert prefixes == ["rs", "msg", "fc", "fco", "msg"]
    listed = c.conversations.items.list(conv.id, order="asc")
    assert [i.id for i in listed.data][1:] == [i.id for i in added.data]
    assert listed.data[0].role == "user" and listed.data[0].content[0].text == "weather in Oslo?"
    # default order is newest first; pages by `after`
    desc = c.conversations.items.list(conv.id, limit=2)
    assert [i.id for i in desc.data] == [added.data[-1].id, added.data[-2].id] and desc.has_more
    nxt = c.conversations.items.list(conv.id, limit=2, after=desc.last_id)
    assert [i.id for i in nxt.data] == [added.data[-3].id, added.data[-4].id]
    one = c.conversations.items.retrieve(added.data[2].id, conversation_id=conv.id)
    assert (one.type, one.call_id, one.name, one.arguments) == ("function_call", "call_a", "get_weather", '{"q":"Oslo"}')
    with pytest.raises(openai.NotFoundError):
        c.conversations.items.retrieve("msg_" + "0" * 32, conversation_id=conv.id)


def test_created_items_are_the_history_a_response_is_sent(env):
    c = client(env)
    conv = c.conversations.create(items=[user("my name is Ada"), assistant("Hello Ada")])
    c.conversations.items.create(conv.id, items=[
        user("weather?"),
        {"type": "function_call", "call_id": "call_w", "name": "get_weather", "arguments": '{"q":"here"}'},
        {"type": "function_call_output", "call_id": "call_w", "output": "sunny"},
        assistant("It is sunny."),
    ])
    r = c.responses.create(model="demo", input="what is my name?", conversation=conv.id)
    assert r.conversation.id == conv.id
    msgs = [m for m in env["oai"].requests[-1]["messages"] if m["role"] != "system"]
    assert [(m["role"], m.get("content")) for m in msgs] == [
        ("user", "my name is Ada"), ("assistant", "Hello Ada"), ("user", "weather?"), ("assistant", None),
        ("tool", "sunny"), ("assistant", "It is sunny."), ("user", "what is my name?")]
    assert msgs[3]["tool_calls"][0]["id"] == "call_w" and msgs[4]["tool_call_id"] == "call_w"
    # the response's own items join the list with the ids the Responses API gave them
    items = c.conversations.items.list(conv.id).data
    assert items[0].id == r.output[0].id and items[0].content[0].text == "Answer to: what is my name?"
    assert items[1].content[0].text == "what is my name?"


def test_a_deleted_item_is_no_longer_sent_and_the_rest_keep_their_ids(env):
    c = client(env)
    conv = c.conversations.create(items=[user("my secret is 42"), assistant("Noted."), user("hello"),
                                         assistant("Hi."),
                                         {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                                         {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
                                         {"type": "function_call_output", "call_id": "c1", "output": "one"},
                                         {"type": "function_call_output", "call_id": "c2", "output": "two"}])
    before = c.conversations.items.list(conv.id, order="asc").data
    secret, noted, first_call = before[0], before[1], before[4]
    assert first_call.call_id == "c1"
    for item in (secret, noted, first_call):
        out = c.conversations.items.delete(item.id, conversation_id=conv.id)
        assert out.id == conv.id and out.object == "conversation"
    after = c.conversations.items.list(conv.id, order="asc").data
    assert [i.id for i in after] == [i.id for i in before if i.id not in (secret.id, noted.id, first_call.id)]
    with pytest.raises(openai.NotFoundError):
        c.conversations.items.retrieve(secret.id, conversation_id=conv.id)
    c.responses.create(model="demo", input="next", conversation=conv.id)
    msgs = [m for m in env["oai"].requests[-1]["messages"] if m["role"] != "system"]
    assert "my secret is 42" not in json.dumps(msgs) and "Noted." not in json.dumps(msgs)
    # the remaining call keeps its answer; the deleted call's output has no call and is left out
    assert [(m["role"], m.get("content")) for m in msgs] == [
        ("user", "hello"), ("assistant", "Hi."), ("tool", "two"), ("user", "next")]
    assert [t["id"] for t in msgs[1]["tool_calls"]] == ["c2"]


def test_a_deletion_reaches_another_server_process(env):
    """Another process had the conversation's history cached from its own turn: after a deletion made
    here, its next turn no longer sends the deleted item (it reads the conversation from the store)."""
    other = LiveServer(create_app(env["settings"])).start()
    try:
        here = client(env)
        there = openai.OpenAI(base_url=f"{other.url}/v1", api_key=env["keys"]["demo"], max_retries=0)
        conv = here.conversations.create(items=[user("my secret is 42"), assistant("Noted.")])
        there.responses.create(model="demo", input="one", conversation=conv.id)  # cached over there
        assert ("user", "my secret is 42") in sent(env)
        secret = here.conversations.items.list(conv.id, order="asc").data[0]
        here.conversations.items.delete(secret.id, conversation_id=conv.id)
        there.responses.create(model="demo", input="two", conversation=conv.id)
        assert "my secret is 42" not in json.dumps(env["oai"].requests[-1])
        assert sent(env)[-3:] == [("user", "one"), ("assistant", "Answer to: one"), ("user", "two")]
    finally:
        other.stop()


def test_items_wait_for_a_running_turn(env):
    """Items are appended under the conversation's lease: while a turn (here: another process's lease)
    holds it, nothing is written."""
    c = client(env)
    conv = c.conversations.create(items=[user("one")])

    async def check() -> None:
        store = Store(env["db"])
        try:
            cid = uuid_of(conv.id)
            assert await store.try_lock(cid, "another-process", 30)
            assert await store.change_messages(cid, owner="me", new_rows=[{"role": "user", "content": "x"}]) is None
            await store.unlock(cid, "another-process")
            rows = await store.change_messages(cid, owner="me", new_rows=[{"role": "user", "content": "two"},
                                                                          {"role": "assistant", "content": "ok"}])
            assert rows is not None and rows[1]["parent_id"] == rows[0]["id"]  # a question and its answer
        finally:
            await store.close()

    asyncio.run(check())
    assert [i.content[0].text for i in c.conversations.items.list(conv.id, order="asc").data] == ["one", "two", "ok"]


# ---- one path, two APIs ----------------------------------------------------------------------------------

def test_the_shared_path_answers_each_api_its_own_way(env):
    c = client(env)
    conv = c.conversations.create(items=[user("from openai")])
    cid = uuid_of(conv.id)
    with http(env) as h:
        # Dify's list (always `user` in its query) shows it, for the user it belongs to
        listed = h.get("/v1/conversations", params={"user": "openai-user"}).json()
        assert cid in [d["id"] for d in listed["data"]] and listed["data"][0]["name"] == "from openai"
        assert h.get("/v1/conversations", params={"user": "alice"}).json()["data"] == []
        # Dify's delete: a bare UUID with {user}; errors in Dify's shape
        r = h.request("DELETE", f"/v1/conversations/{cid}", json={})
        assert r.status_code == 400 and r.json()["code"] == "invalid_param" and "status" in r.json()
        r = h.request("DELETE", f"/v1/conversations/{cid}", json={"user": "alice"})
        assert r.status_code == 404 and r.json() == {"code": "not_found", "message": "Conversation Not Exists.",
                                                     "status": 404}
        # OpenAI's: a conv_ id, no body; errors in OpenAI's shape
        r = h.get("/v1/conversations/conv_" + "0" * 32)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = h.request("DELETE", f"/v1/conversations/{conv.id}")
        assert r.status_code == 200 and r.json() == {"id": conv.id, "object": "conversation.deleted", "deleted": True}
        r = h.request("DELETE", f"/v1/conversations/{conv.id}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        # and a Dify conversation deletes as recorded: 204, empty
        dify = h.post("/v1/chat-messages", json={"query": "hi", "user": "alice", "inputs": {}}).json()
        r = h.request("DELETE", f"/v1/conversations/{dify['conversation_id']}", json={"user": "alice"})
        assert r.status_code == 204 and r.content == b""


# ---- one conversation across surfaces ---------------------------------------------------------------------

def test_a_dify_route_conversation_continues_on_responses_and_lists_its_items(env):
    c = client(env)
    with http(env) as h:
        first = h.post("/v1/chat-messages", json={"query": "hello there", "user": "alice", "inputs": {}}).json()
    cid = first["conversation_id"]
    r = c.responses.create(model="demo", input="and again", conversation=cid)
    assert sent(env) == [("user", "hello there"), ("assistant", "Answer to: hello there"), ("user", "and again")]
    conv_id = "conv_" + cid.replace("-", "")
    assert r.conversation.id == conv_id
    for ref in (cid, conv_id):
        texts = [i.content[0].text for i in c.conversations.items.list(ref, order="asc").data]
        assert texts == ["hello there", "Answer to: hello there", "and again", "Answer to: and again"]
    with http(env) as h:  # still alice's on the Dify route, with the new turn
        page = h.get("/v1/messages", params={"conversation_id": cid, "user": "alice"}).json()
    assert [m["query"] for m in page["data"]] == ["hello there", "and again"]


def test_a_conversations_api_conversation_continues_on_the_dify_route(env):
    conv = client(env).conversations.create(items=[user("I like tea"), assistant("Tea it is.")])
    with http(env) as h:
        r = h.post("/v1/chat-messages", json={"query": "what do I like?", "user": "openai-user", "inputs": {},
                                              "conversation_id": uuid_of(conv.id), "response_mode": "blocking"})
        assert r.status_code == 200, r.text
        assert r.json()["conversation_id"] == uuid_of(conv.id)
        # another user of the same app is not its owner on the Dify route
        r = h.post("/v1/chat-messages", json={"query": "x", "user": "alice", "inputs": {},
                                              "conversation_id": uuid_of(conv.id), "response_mode": "blocking"})
        assert r.status_code == 404
    assert sent(env)[:2] == [("user", "I like tea"), ("assistant", "Tea it is.")]
    assert sent(env)[-1] == ("user", "what do I like?")


def test_tool_items_show_on_the_dify_messages_page(env):
    """The page (and any Dify client) sees a Responses conversation's function calls and outputs."""
    c = client(env)
    r1 = c.responses.create(model="demo", input="weather in Rome?", tools=[WEATHER])
    [call] = [o for o in r1.output if o.type == "function_call"]
    c.responses.create(model="demo", previous_response_id=r1.id, tools=[WEATHER],
                       input=[{"type": "function_call_output", "call_id": call.call_id, "output": "warm"}])
    cid = uuid_of(r1.conversation.id) if r1.conversation else None
    assert cid is None  # a response without `conversation` names none; find it on the page's list
    with http(env) as h:
        convs = h.get("/v1/conversations", params={"user": "openai-user", "limit": 1}).json()["data"]
        page = h.get("/v1/messages", params={"conversation_id": convs[0]["id"], "user": "openai-user"}).json()["data"]
    assert page[0]["tool_calls"] == [{"call_id": call.call_id, "name": "get_weather", "arguments": call.arguments}]
    assert page[1]["tool_results"] == [{"call_id": call.call_id, "name": "get_weather", "output": "warm"}]
    assert page[1]["answer"] == "Tool said: warm"


# ---- openai-agents ------------------------------------------------------------------------------------------

def test_openai_agents_conversations_session_carries_the_first_run(env):
    agents = pytest.importorskip("agents")
    from agents import Agent, OpenAIConversationsSession, OpenAIResponsesModel, Runner, set_tracing_disabled

    set_tracing_disabled(True)

    async def run() -> None:
        oai = openai.AsyncOpenAI(base_url=f"{env['url']}/v1", api_key=env["keys"]["demo"], max_retries=0)
        conv = await oai.conversations.create(items=[])
        session = OpenAIConversationsSession(conversation_id=conv.id, openai_client=oai)
        agent = Agent(name="helper", instructions="Be brief.", model=OpenAIResponsesModel("demo", oai))
        r1 = await Runner.run(agent, "my favourite colour is green", session=session)
        assert r1.final_output == "Answer to: my favourite colour is green"
        r2 = await Runner.run(agent, "what is my favourite colour?", session=session)
        assert r2.final_output == "Answer to: what is my favourite colour?"
        assert sent(env) == [("user", "my favourite colour is green"),
                             ("assistant", "Answer to: my favourite colour is green"),
                             ("user", "what is my favourite colour?")]
        items = await session.get_items()
        assert [i["role"] for i in items] == ["user", "assistant", "user", "assistant"]
        popped = await session.pop_item()
        assert popped is not None and popped["role"] == "assistant"
        assert len(await session.get_items()) == 3
        await oai.close()

    asyncio.run(run())
    assert agents is not None
