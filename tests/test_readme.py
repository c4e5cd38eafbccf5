"""README snippets run as a reader would run them: copied into a file and run with Python, against a
live `threadline serve` process (the README's app `support`, on the strict OpenAI-compatible double).

The only change made to a snippet is the server's address (`http://127.0.0.1:8080`, the README's, becomes
the live server's); the app key comes from `THREADLINE_KEY`, as the snippets read it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.doubles.live import serve_process
from tests.doubles.openai_double import OpenAIDouble

README = Path(__file__).resolve().parents[1] / "README.md"
README_URL = "http://127.0.0.1:8080"


def section_snippets(title: str) -> list[str]:
    """The ```python blocks of the README's `## <title>` section (up to its first subsection), in order."""
    text = README.read_text()
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^##+ |\Z)", text, re.M | re.S)
    assert m, f"README has no section {title!r}"
    return re.findall(r"^```python\n(.*?)^```", m.group(1), re.M | re.S)


@pytest.fixture(scope="module")
def live(openai_double: tuple[OpenAIDouble, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("readme")
    with serve_process(f'''database_url = "sqlite+aiosqlite:///{tmp}/readme.db"
[engines.acc]
kind = "openai"
base_url = "{openai_double[1]}/v1"
api_key = "sk-test-double-key"
model = "m"
[apps.support]
engine = "acc"
suggested_questions_after_answer = true
''', tmp, "support") as (url, keys):
        yield {"url": url, "key": keys["support"], "oai": openai_double[0], "tmp": tmp}


def run_snippet(live: dict[str, Any], code: str, name: str) -> list[str]:
    assert README_URL in code
    path = live["tmp"] / f"{name}.py"
    path.write_text(code.replace(README_URL, live["url"]))
    env = {**os.environ, "THREADLINE_KEY": live["key"]}
    r = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True, timeout=120,
                       cwd=live["tmp"])
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def convo(req: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(m["role"], m.get("content") if m["role"] != "assistant" or not m.get("tool_calls")
             else [c["function"]["name"] for c in m["tool_calls"]]) for m in req["messages"] if m["role"] != "system"]


def test_responses_section_has_the_three_snippets():
    snippets = section_snippets("OpenAI Responses API")
    assert len(snippets) == 3
    assert "client.responses.create" in snippets[0] and "from agents import" in snippets[1]
    assert "client.responses.connect()" in snippets[2]


def test_readme_responses_openai_sdk_snippet(live):
    d: OpenAIDouble = live["oai"]
    d.reset()
    out = run_snippet(live, section_snippets("OpenAI Responses API")[0], "responses_sdk")
    assert out == ["Answer to: What is my name?", "Tool said: 3 pages match 'How do I reset my password?'"]
    assert len(d.requests) == 4
    # the chain: the second request carries the first exchange; instructions stay with their own response
    assert {"role": "system", "content": "Answer briefly."} in d.requests[0]["messages"]
    assert convo(d.requests[1]) == [("user", "My name is Ada."), ("assistant", "Answer to: My name is Ada."),
                                    ("user", "What is my name?")]
    assert not any("Answer briefly." in (m.get("content") or "") for m in d.requests[1]["messages"])
    # the tool round trip: the call and its output, after the whole chain
    assert convo(d.requests[3]) == [
        ("user", "My name is Ada."), ("assistant", "Answer to: My name is Ada."),
        ("user", "What is my name?"), ("assistant", "Answer to: What is my name?"),
        ("user", "How do I reset my password?"), ("assistant", ["search"]),
        ("tool", "3 pages match 'How do I reset my password?'")]


def test_readme_responses_openai_agents_snippet(live):
    d: OpenAIDouble = live["oai"]
    d.reset()
    out = run_snippet(live, section_snippets("OpenAI Responses API")[1], "responses_agents")
    assert out == ["Tool said: 3 pages match 'How do I reset my password?'",
                   "Tool said: 3 pages match 'And my username?'"]
    assert len(d.requests) == 4
    assert all(r["messages"][0] == {"role": "system", "content": "Use the search tool."} for r in d.requests)
    assert convo(d.requests[3]) == [
        ("user", "How do I reset my password?"), ("assistant", ["search"]),
        ("tool", "3 pages match 'How do I reset my password?'"),
        ("assistant", "Tool said: 3 pages match 'How do I reset my password?'"),
        ("user", "And my username?"), ("assistant", ["search"]), ("tool", "3 pages match 'And my username?'")]


def test_readme_responses_websocket_snippet(live):
    """A store: false chain over one WebSocket: the second response continues the first (cached on the
    connection), and the engine gets the whole chain."""
    d: OpenAIDouble = live["oai"]
    d.reset()
    out = run_snippet(live, section_snippets("OpenAI Responses API")[2], "responses_ws")
    assert out == ["Answer to: Name a prime number.", "Answer to: And the next one?"]
    assert len(d.requests) == 2
    assert convo(d.requests[1]) == [("user", "Name a prime number."), ("assistant", "Answer to: Name a prime number."),
                                    ("user", "And the next one?")]


def test_readme_signed_file_url_snippet(live):
    """The HTTP server section's snippet: a history image's URL is the server's own, signed, and loads
    without the key."""
    live["oai"].reset()
    snippet = next(c for c in section_snippets("HTTP server") if "file-preview" in c)
    out = run_snippet(live, snippet, "signed_file_url")
    assert out[0].startswith(f"{live['url']}/files/") and "/file-preview?timestamp=" in out[0] and "&sign=" in out[0]
    assert out[1] == "image/png"


def test_readme_feedbacks_and_suggested_curl_snippet(live):
    """The HTTP server section's curl lines for feedbacks and suggested questions, run by bash as copied
    (the address changed, the key in $KEY)."""
    text = README.read_text()
    blocks = [b for b in re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S) if "/v1/app/feedbacks" in b]
    assert len(blocks) == 1
    d: OpenAIDouble = live["oai"]
    d.reset(answer_hook=lambda body: '["Why?", "How?", "When?"]' if "follow-up" in str(body["messages"][0]) else None)
    env = {**os.environ, "KEY": live["key"], "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    r = subprocess.run(["bash", "-c", blocks[0].replace(README_URL, live["url"])], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith('{"result":"success"}')
    feedbacks = out[len('{"result":"success"}'):out.rindex('{"result"')]
    import json
    data = json.loads(feedbacks)["data"]
    assert data[0]["rating"] == "like" and data[0]["content"] == "spot on" and data[0]["from_end_user_id"] == "alice"
    assert json.loads(out[out.rindex('{"result"'):]) == {"result": "success", "data": ["Why?", "How?", "When?"]}
