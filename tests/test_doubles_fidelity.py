"""The doubles must not drift into fiction: the official SDKs parse their output, and our engines
parse the real recorded provider streams the same way they parse the doubles."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from threadline.config import EngineConfig
from threadline.engines.base import EngineRequest
from threadline.engines.gemini import GeminiEngine
from threadline.engines.openai_compat import OpenAICompatEngine
from threadline.engines.profiles import ThinkTagSplitter
from threadline.messages import ChatMessage, ReasoningDelta, TextDelta, UsageReport

PROVIDERS = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "providers"


@pytest.mark.parametrize("provider,mode", [("openai", "plain"), ("deepseek", "reasoning_content"),
                                           ("nim", "think_tags"), ("xai", "reasoning_content")])
async def test_openai_sdk_parses_the_double(oai, provider, mode):
    import openai

    d, url = oai
    d.reset(provider=provider, answer_mode=mode)
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-test-double-key", max_retries=0)
    r = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content.endswith("Answer to: hi")
    assert r.usage.total_tokens > 0
    stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
                                                  **({"stream_options": {"include_usage": True}} if provider != "nim" else {}))
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text.endswith("Answer to: hi")
    if provider in ("openai", "deepseek"):
        assert usage is not None and usage.prompt_tokens > 0
    with pytest.raises(openai.BadRequestError if provider != "nim" else openai.UnprocessableEntityError):
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                             extra_body={"conversation_id": "x"})
    await client.close()


async def test_google_genai_sdk_parses_the_double(gem):
    from google import genai
    from google.genai import types

    d, url = gem
    client = genai.Client(api_key="AIza-test-double-key-0000", http_options=types.HttpOptions(base_url=f"{url}/"))
    cfg = types.GenerateContentConfig(system_instruction="Be brief.",
                                      thinking_config=types.ThinkingConfig(include_thoughts=True))
    r = await client.aio.models.generate_content(model="gemini-2.5-pro", contents="hello", config=cfg)
    assert r.text == "Answer to: hello"
    assert r.usage_metadata.thoughts_token_count > 0
    parts = r.candidates[0].content.parts
    assert parts[0].thought is True
    chunks = [c async for c in await client.aio.models.generate_content_stream(model="gemini-2.5-pro", contents="hi",
                                                                              config=cfg)]
    assert "".join(c.text or "" for c in chunks) == "Answer to: hi"
    assert chunks[-1].candidates[0].finish_reason == types.FinishReason.STOP


def _replay_engine(cls, cfg: EngineConfig, body: bytes, ctype: str = "text/event-stream"):
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": ctype})

    return cls(cfg, httpx.AsyncClient(transport=httpx.MockTransport(handler)))


async def _collect(engine, stream=True):
    text, reasoning, usage = "", "", None
    async for ev in engine.events(EngineRequest(messages=[ChatMessage("user", "x")], stream=stream)):
        if isinstance(ev, TextDelta):
            text += ev.text
        elif isinstance(ev, ReasoningDelta):
            reasoning += ev.text
        elif isinstance(ev, UsageReport):
            usage = ev.usage
    return text, reasoning, usage


async def test_recorded_deepseek_stream_parses():
    raw = (PROVIDERS / "deepseek" / "pydantic-ai_reasoner_stream.sse").read_bytes()
    cfg = EngineConfig(name="ds", kind="openai", model="deepseek-reasoner", base_url="https://api.deepseek.com", api_key="k")
    text, reasoning, usage = await _collect(_replay_engine(OpenAICompatEngine, cfg, raw))
    events = [json.loads(line[6:]) for line in raw.decode().split("\n\n") if line.startswith("data: {")]
    want_text = "".join(c["choices"][0]["delta"].get("content") or "" for c in events if c["choices"])
    want_reason = "".join(c["choices"][0]["delta"].get("reasoning_content") or "" for c in events if c["choices"])
    assert text == want_text and reasoning == want_reason and reasoning
    final = [c for c in events if c.get("usage")][-1]["usage"]
    assert usage.prompt_tokens == final["prompt_tokens"]
    assert usage.reasoning_tokens == final["completion_tokens_details"]["reasoning_tokens"]


async def test_recorded_xai_chunks_parse_with_reasoning_outside_completion():
    lines = (PROVIDERS / "xai" / "vercel-ai_chat_stream_grok-3-mini_reasoning.chunks.txt").read_text().splitlines()
    body = "".join(f"data: {line}\n\n" for line in lines if line.strip()) + "data: [DONE]\n\n"
    cfg = EngineConfig(name="x", kind="openai", model="grok-3-mini", base_url="https://api.x.ai/v1", api_key="k")
    text, reasoning, usage = await _collect(_replay_engine(OpenAICompatEngine, cfg, body.encode()))
    assert reasoning.startswith("First,")
    assert usage.total_tokens == 354 and usage.reasoning_tokens == 340
    assert usage.completion_tokens == 354 - 12


async def test_recorded_gemini_thinking_stream_parses():
    raw = (PROVIDERS / "gemini" / "pydantic-ai_stream_thinking_gemini-2.5-pro.sse").read_bytes()
    cfg = EngineConfig(name="g", kind="gemini", model="gemini-2.5-pro", base_url="https://x/v1beta", api_key="k")
    text, reasoning, usage = await _collect(_replay_engine(GeminiEngine, cfg, raw))
    events = [json.loads(e[6:]) for e in raw.decode().split("\r\n\r\n") if e.startswith("data: ")]
    parts = [p for e in events for p in e["candidates"][0]["content"].get("parts", [])]
    assert text == "".join(p.get("text", "") for p in parts if not p.get("thought"))
    assert reasoning == "".join(p.get("text", "") for p in parts if p.get("thought")) and reasoning
    last = events[-1]["usageMetadata"]
    assert usage.reasoning_tokens == last["thoughtsTokenCount"]
    assert usage.prompt_tokens == last["promptTokenCount"]


async def test_recorded_gemini_max_tokens_empty_answer():
    raw = (PROVIDERS / "gemini" / "pydantic-ai_generate_max_tokens_empty_gemini-2.5-pro.json").read_bytes()
    cfg = EngineConfig(name="g", kind="gemini", model="gemini-2.5-pro", base_url="https://x/v1beta", api_key="k")
    text, reasoning, usage = await _collect(_replay_engine(GeminiEngine, cfg, raw, "application/json"), stream=False)
    assert text == "" and usage.reasoning_tokens == 2


@pytest.mark.parametrize("chunks", [
    ["<think>abc</think>\n\nanswer"],
    ["<th", "ink>a", "bc</th", "ink>", "\n\nans", "wer"],
    ["abc</think>answer"],
    ["a", "bc<", "/think>\n", "answer"],
])
def test_think_splitter_handles_split_and_missing_tags(chunks):
    s = ThinkTagSplitter()
    out = [x for c in chunks for x in s.feed(c)]
    rest, reclassify = s.finish()
    out += rest
    assert "".join(t for k, t in out if k == "reasoning") == "abc"
    assert "".join(t for k, t in out if k == "text") == "answer"
    assert not reclassify


def test_think_splitter_plain_answer_is_reclassified():
    s = ThinkTagSplitter()
    out = s.feed("just an answer")
    rest, reclassify = s.finish()
    assert reclassify and "".join(t for _, t in out + rest) == "just an answer"


# ---- the doubles' fault modes, as the official SDKs see them -----------------------------------------


async def test_openai_sdk_sees_the_doubles_faults_as_the_real_services(oai):
    import openai

    d, url = oai
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-test-double-key", max_retries=0, timeout=5)
    msgs = [{"role": "user", "content": "hi"}]

    async def stream_text() -> tuple[str, list]:
        text, finishes = "", []
        async for chunk in await client.chat.completions.create(model="m", messages=msgs, stream=True):
            text += chunk.choices[0].delta.content or "" if chunk.choices else ""
            finishes += [c.finish_reason for c in chunk.choices if c.finish_reason]
        return text, finishes

    d.reset(fault="429", retry_after="2")
    with pytest.raises(openai.RateLimitError) as ei:
        await client.chat.completions.create(model="m", messages=msgs)
    assert ei.value.code == "rate_limit_exceeded" and ei.value.response.headers["retry-after"] == "2"
    d.reset(fault="500")
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="m", messages=msgs, stream=True)
    d.reset(fault="error_event")
    with pytest.raises(openai.BadRequestError) as ei:
        await client.chat.completions.create(model="m", messages=msgs)
    assert ei.value.code == "context_length_exceeded"

    d.reset(fault="error_event", reply="one two three", chunk_size=4)
    got = ""
    with pytest.raises(openai.APIError) as ei:  # openai-python raises on a data payload with an `error`
        async for chunk in await client.chat.completions.create(model="m", messages=msgs, stream=True):
            got += chunk.choices[0].delta.content or "" if chunk.choices else ""
    assert got == "one two " and "server had an error" in ei.value.message
    d.reset(fault="cut", reply="one two three", chunk_size=4)
    assert await stream_text() == ("one two ", [])  # the SDK ends quietly: only the missing finish tells
    d.reset(fault="malformed", reply="one two three", chunk_size=4)
    with pytest.raises(ValueError):  # json.JSONDecodeError
        await stream_text()
    d.reset(fault="timeout", stall=1.0)
    with pytest.raises(openai.APITimeoutError):
        await client.chat.completions.create(model="m", messages=msgs, timeout=0.3)
    d.reset(fault="reset")
    with pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(model="m", messages=msgs)
    await client.close()


async def test_google_genai_sdk_sees_the_doubles_faults_as_the_real_service(gem):
    from google import genai
    from google.genai import errors, types

    d, url = gem
    client = genai.Client(api_key="AIza-test-double-key-0000", http_options=types.HttpOptions(base_url=f"{url}/"))
    model = "gemini-2.0-flash"

    d.reset(fault="429", retry_delay="34.4s")
    with pytest.raises(errors.ClientError) as ei:
        await client.aio.models.generate_content(model=model, contents="hi")
    assert (ei.value.code, ei.value.status) == (429, "RESOURCE_EXHAUSTED")
    assert {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "34.4s"} in ei.value.details["error"]["details"]
    d.reset(fault="500")
    with pytest.raises(errors.ServerError) as ei:
        await client.aio.models.generate_content(model=model, contents="hi")
    assert ei.value.status == "INTERNAL"
    d.reset(fault="error_event")
    with pytest.raises(errors.ClientError) as ei:
        await client.aio.models.generate_content(model=model, contents="hi")
    assert (ei.value.code, ei.value.status) == (400, "INVALID_ARGUMENT")

    d.reset(fault="error_event", reply="one two three", chunk_size=4)
    got = ""
    with pytest.raises(errors.ServerError) as ei:  # google-genai raises on a chunk that is `{"error": ...}`
        async for c in await client.aio.models.generate_content_stream(model=model, contents="hi"):
            got += c.text or ""
    assert got == "one two " and (ei.value.code, ei.value.status) == (503, "UNAVAILABLE")
    d.reset(fault="cut", reply="one two three", chunk_size=4)
    chunks = [c async for c in await client.aio.models.generate_content_stream(model=model, contents="hi")]
    assert "".join(c.text or "" for c in chunks) == "one two "
    assert all(c.candidates[0].finish_reason is None for c in chunks)  # the SDK ends quietly
    d.reset(fault="malformed", reply="one two three", chunk_size=4)
    with pytest.raises(ValueError):
        async for _ in await client.aio.models.generate_content_stream(model=model, contents="hi"):
            pass
