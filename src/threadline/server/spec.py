"""One table of operations: it builds the routes and the published OpenAPI schema.

Each operation names its request models (body, query) and response model; routes validate with
those same models (server/models.py), so `/openapi.json` describes exactly what each route accepts
and answers, and tools such as schemathesis can drive every route from it. Routing stays on plain
Starlette routes (the chat POSTs even skip those, see app.py's fast lane): FastAPI's own parameter
machinery would run on every request for a schema we can write once at startup.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.routing import Route

from .. import __version__
from .models import DifyErrorBody, OpenAIErrorBody

# "both": a path and method two APIs define (DELETE /v1/conversations/{id}); errors in either shape.
Surface = Literal["dify", "openai", "both"]
ERROR_STATUSES = (400, 401, 403, 404, 405, 409, 413, 415, 429)
# One server-sent event as a client parses it; `data` is the JSON text of the surface's stream frames.
SSE_EVENT: dict[str, Any] = {"type": "object", "properties": {
    "event": {"type": "string"}, "data": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}}}


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    endpoint: Callable[[Request], Awaitable[Any]]
    summary: str
    surface: Surface = "dify"
    body: type[BaseModel] | None = None
    body_media: str = "application/json"
    body_required: bool = True
    query: type[BaseModel] | None = None
    ok_status: int = 200
    response: type[BaseModel] | None = None
    stream: bool = False  # the success answer may also be a text/event-stream
    no_content: bool = False
    also_ok: tuple[int, ...] = ()  # further success statuses, answered with no content
    raw_media: str | None = None  # the success answer is a file of this (or any) type
    errors: tuple[int, ...] = ERROR_STATUSES
    public: bool = False  # answered without an app key (its own permission is in the request)
    tags: tuple[str, ...] = field(default_factory=tuple)

    def route(self) -> Route:
        return Route(self.path, self.endpoint, methods=[self.method])


def routes(ops: list[Operation]) -> list[Route]:
    return [op.route() for op in ops]


def _path_params(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{") and part.endswith("}")]


def openapi(ops: list[Operation], *, title: str, description: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document for `ops`, with every model under components/schemas."""
    wanted: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [
        (DifyErrorBody, "serialization"), (OpenAIErrorBody, "serialization")]
    for op in ops:
        if op.body is not None:
            wanted.append((op.body, "validation"))
        if op.response is not None:
            wanted.append((op.response, "serialization"))
    unique = list(dict.fromkeys(wanted))
    refs, top = models_json_schema(unique, ref_template="#/components/schemas/{model}")
    schemas: dict[str, Any] = top.get("$defs", {})
    paths: dict[str, dict[str, Any]] = {}
    for op in ops:
        error_ref = refs[(OpenAIErrorBody if op.surface == "openai" else DifyErrorBody, "serialization")]
        if op.surface == "both":
            error_ref = {"anyOf": [refs[(OpenAIErrorBody, "serialization")], refs[(DifyErrorBody, "serialization")]]}
        params: list[dict[str, Any]] = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                                        for p in _path_params(op.path)]
        if op.query is not None:
            qs = op.query.model_json_schema()
            required = set(qs.get("required", []))
            for name, prop in qs.get("properties", {}).items():
                params.append({"name": name, "in": "query", "required": name in required, "schema": prop})
        doc: dict[str, Any] = {"summary": op.summary, "operationId": f"{op.method.lower()}_{op.path}",
                               "tags": list(op.tags or (op.surface,))}
        if params:
            doc["parameters"] = params
        if op.public:
            doc["security"] = []
        if op.body is not None:
            doc["requestBody"] = {"required": op.body_required,
                                  "content": {op.body_media: {"schema": refs[(op.body, "validation")]}}}
        ok: dict[str, Any] = {"description": "Success"}
        if not op.no_content:
            content: dict[str, Any] = {}
            if op.response is not None:
                content["application/json"] = {"schema": refs[(op.response, "serialization")]}
            if op.stream:
                content["text/event-stream"] = {"schema": SSE_EVENT}
            if op.raw_media is not None:
                content[op.raw_media] = {"schema": {"type": "string", "format": "binary"}}
            if content:
                ok["content"] = content
        responses: dict[str, Any] = {str(op.ok_status): ok}
        for status in op.also_ok:
            responses[str(status)] = {"description": "Success, no content"}
        for status in op.errors:
            responses[str(status)] = {"description": "Error", "content": {"application/json": {"schema": error_ref}}}
        doc["responses"] = responses
        paths.setdefault(op.path, {})[op.method.lower()] = doc
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": __version__, "description": description},
        "paths": paths,
        "components": {"schemas": schemas,
                       "securitySchemes": {"appKey": {"type": "http", "scheme": "bearer",
                                                      "description": "An app key (threadline keys create)."}}},
        "security": [{"appKey": []}],
    }
