"""The published schema describes every route, and a schema-driven fuzzer finds no server error and
no answer that breaks the schema (issue 12, finding 12).

schemathesis reads `/openapi.json` from a live server (SQLite store, the strict OpenAI double behind
the app) and sends a bounded number of generated requests per operation, valid and invalid ones."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.doubles.live import LiveServer
from threadline.config import Settings
from threadline.server.app import create_app
from threadline.server.keys import create_key

EXAMPLES_PER_OPERATION = 20
CHECKS = (not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance)


@pytest.fixture(scope="module")
def live(openai_double, tmp_path_factory):
    double, url = openai_double
    double.reset()
    db = tmp_path_factory.mktemp("fuzz") / "f.db"
    s = Settings.build(database_url=f"sqlite+aiosqlite:///{db}", include_presets=False,
                       engines={"acc": {"kind": "openai", "base_url": f"{url}/v1", "api_key": "sk-test-double-key",
                                        "model": "m", "max_retries": 0}},
                       apps={"demo": {"engine": "acc", "system": ["Be brief."]}})
    key = asyncio.run(create_key(s, "demo"))
    srv = LiveServer(create_app(s)).start()
    yield srv.url, key
    srv.stop()


def test_every_route_is_in_the_published_schema(live):
    base, _ = live
    schema = httpx.get(f"{base}/openapi.json").json()
    ops = {(m.upper(), p) for p, item in schema["paths"].items() for m in item}
    assert ops >= {
        ("POST", "/v1/chat-messages"), ("POST", "/v1/chat-messages/{task_id}/stop"), ("POST", "/v1/files/upload"),
        ("GET", "/v1/files/{file_id}/preview"), ("GET", "/files/{file_id}/file-preview"), ("GET", "/v1/messages"), ("POST", "/v1/messages/{message_id}/feedbacks"),
        ("GET", "/v1/messages/{message_id}/suggested"), ("GET", "/v1/conversations"),
        ("POST", "/v1/conversations/{conversation_id}/name"), ("DELETE", "/v1/conversations/{conversation_id}"),
        ("GET", "/v1/parameters"), ("GET", "/v1/info"), ("GET", "/v1/meta"), ("GET", "/v1/app/feedbacks"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"), ("POST", "/v1/responses"), ("GET", "/v1/responses/{response_id}"),
        ("DELETE", "/v1/responses/{response_id}"), ("POST", "/v1/responses/{response_id}/cancel"),
        ("GET", "/v1/responses/{response_id}/input_items"), ("POST", "/v1/responses/input_tokens"),
        ("POST", "/v1/responses/compact"),
        ("POST", "/v1/conversations"), ("GET", "/v1/conversations/{conversation_id}"),
        ("POST", "/v1/conversations/{conversation_id}"), ("POST", "/v1/conversations/{conversation_id}/items"),
        ("GET", "/v1/conversations/{conversation_id}/items"),
        ("GET", "/v1/conversations/{conversation_id}/items/{item_id}"),
        ("DELETE", "/v1/conversations/{conversation_id}/items/{item_id}"),
    }
    body = schema["paths"]["/v1/chat-messages"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ChatRequestPayload"}
    assert "query" in schema["components"]["schemas"]["ChatRequestPayload"]["required"]


def _fuzz(operation: schemathesis.APIOperation, mode: schemathesis.GenerationMode, base: str, key: str,
          statuses: Counter[tuple[str, int]]) -> None:
    """Run the bounded examples of one operation; schemathesis raises its findings (shrunk)."""
    name = f"{operation.method.upper()} {operation.path}"

    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        body = case.body
        # A random `model` is (rightly) a 404; name the key's app in most examples so the turn runs.
        if mode is schemathesis.GenerationMode.POSITIVE and isinstance(body, dict) and isinstance(body.get("model"), str) \
                and len(body["model"]) % 4:
            odd = len(body["model"]) % 2
            body["model"] = "demo"
            if "messages" in body:
                if odd and not isinstance(body["messages"][-1].get("content"), str):
                    body["messages"][-1]["content"] = "hi"
                body["messages"][-1]["role"] = "user"
            elif "input" in body and odd:  # the Responses API: often a plain question
                body["input"] = "hi"
        response = case.call_and_validate(base_url=base, headers={"Authorization": f"Bearer {key}"},
                                          checks=CHECKS, timeout=30)
        statuses[(name, response.status_code)] += 1

    run()


def test_fuzzing_finds_no_server_error_and_no_schema_violation(live):
    base, key = live
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    statuses: Counter[tuple[str, int]] = Counter()
    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:
        for mode in schemathesis.GenerationMode:
            _fuzz(operation, mode, base, key, statuses)
    # The run reached past validation: turns were answered on both chat routes.
    assert statuses[("POST /v1/chat-messages", 200)] and statuses[("POST /v1/chat/completions", 200)], statuses
    assert statuses[("POST /v1/responses", 200)], statuses
    assert statuses[("POST /v1/conversations", 200)], statuses
    assert len(operations) >= 15
