"""OpenAI's Conversations API over Threadline's own conversations.

A `conv_<hex>` is the same conversation the Dify-style routes call `<uuid>` (the hex is the UUID
without dashes), the one `POST /v1/responses` continues with `conversation`, the page lists and
`threadline show` prints: DESIGN says surfaces are views of one store. Its items are the current
branch's messages rendered as the Responses API renders them, with the same ids
(responses_api.input_items / output_items): a question is `msg_<q>` and `fco_<q>_<n>`, an answer
`rs_<a>`, `msg_<a>` and `fc_<a>_<n>`. Items added here are stored as finished messages appended
under the conversation's turn lease, so they never land inside a running turn, and a later response
in the conversation is sent them as history. A deleted item is blanked in place (the row stays:
later messages hang from it, Store.branch follows parents), so engines are no longer sent it and
the items after it keep their ids (responses_api.Removed).

Who owns what: as on the Responses routes, a key owns its app's conversations (ConversationService
.owned); another app's id is 404 `not_found`, like a missing one. A conversation made here belongs
to user `openai-user` (the user the Responses and Chat Completions routes use when a request names
none), so the Dify-style routes and the page reach it with `user=openai-user`.

`/v1/conversations` is shared with Dify's routes; the request tells which API it speaks:

    GET    /v1/conversations                 Dify's list (OpenAI has no list)
    POST   /v1/conversations                 OpenAI create (Dify has none)
    GET    /v1/conversations/{id}            OpenAI retrieve
    POST   /v1/conversations/{id}            OpenAI update (Dify renames at .../{id}/name)
    DELETE /v1/conversations/{id}            `conv_…` id: OpenAI delete (200, conversation.deleted);
                                             a bare UUID: Dify's delete (`{"user"}` in the body,
                                             204, Dify's errors), as recorded
    …/{id}/items[/{item_id}]                 OpenAI items (Dify has none)

The OpenAI-only routes take either id form (a conversation started on the Dify route is reached
with its UUID); only DELETE, the one method both APIs define on the same path, is decided by the
form: OpenAI's clients always hold the `conv_` ids this API hands out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from ..errors import NotFoundError, ThreadlineError
from ..messages import FunctionCall, FunctionResult, ImagePart, Item, items_to_json
from ..service import ConversationService, Scope
from ..store import new_id
from ..tokens import estimate_message, estimate_text
from . import dify_api
from .common import state
from .models import UserPayload
from .openai_api import OpenAIError, _auth, _from_tl, _invalid, openai_error
from .responses_api import (
    ACCEPTED_INCLUDES,
    DEFAULT_USER,
    REMOVED,
    _bad,
    _check_len,
    _hex,
    _metadata,
    _page,
    _parts_text,
    _read,
    _unsupported,
    _uuid,
    conversation_of,
    conversation_ref,
    function_call_fields,
    function_output_fields,
    input_items,
    output_items,
    stored_items,
)
from .responses_models import (
    ConversationCreateRequest,
    ConversationDeleted,
    ConversationItemList,
    ConversationItemObject,
    ConversationObject,
    ConversationUpdateRequest,
    IncludeQuery,
    InputItemsQuery,
    ItemsCreateRequest,
)
from .spec import Operation

MAX_ITEMS = 20


# ---- rendering ---------------------------------------------------------------------------------

def conversation_object(conv: dict[str, Any]) -> dict[str, Any]:
    return {"id": conversation_ref(conv["id"]), "object": "conversation", "created_at": int(conv["created_at"]),
            "metadata": conv.get("meta") or {}}


def row_items(row: dict[str, Any]) -> list[dict[str, Any]]:
    """One stored message as conversation items: a question's message and function outputs, an
    answer's reasoning, message and function calls. An answer still being written is not listed
    yet; one that failed or stopped lists what it kept."""
    if row["role"] == "user":
        return input_items(row)
    if row["role"] != "assistant" or row["status"] == "streaming":
        return []
    out = output_items(row["id"], row.get("content") or "", row.get("reasoning"), stored_items(row.get("parts")))
    if row["status"] != "completed":
        out = [i for i in out if i["type"] != "message" or i["content"][0]["text"]]
    return out


def branch_items(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [item for r in rows for item in row_items(r)]


# ---- reading items -----------------------------------------------------------------------------

@dataclass
class _Row:
    """A message being built from created items; consecutive items of one role share a row when
    the row renders them back in the order they came (question: message, then outputs; answer:
    reasoning, message, then calls), so each keeps the id items.create answers with."""

    role: str
    id: str = field(default_factory=new_id)
    text: str | None = None
    reasoning: str | None = None
    images: list[ImagePart] = field(default_factory=list)
    calls: list[FunctionCall] = field(default_factory=list)
    results: list[FunctionResult] = field(default_factory=list)

    def takes(self, role: str, kind: str) -> bool:
        if role != self.role:
            return False
        if kind == "message":
            return self.text is None and not self.results and not self.calls
        if kind == "reasoning":
            return self.reasoning is None and self.text is None and not self.calls
        return True  # a call after the answer's message, an output after the question's

    def stored(self) -> dict[str, Any]:
        text = self.text or ""
        if self.role == "user":
            items: list[Item] = [*self.images, *self.results]
            parts = items_to_json(items)
            tokens = estimate_message(text, len(self.images)) + sum(estimate_text(r.output) for r in self.results)
        else:
            parts = items_to_json(self.calls) or []
            if self.text is None:  # no message item: the answer renders none (not an empty one)
                parts.append({"type": REMOVED, "kind": "message"})
            parts = parts or None
            tokens = estimate_message(text) + sum(estimate_text(c.arguments) for c in self.calls)
        return {"id": self.id, "role": self.role, "content": text, "parts": parts, "reasoning": self.reasoning,
                "token_estimate": tokens}


def _reasoning_text(item: dict[str, Any], where: str) -> str:
    texts: list[str] = []
    for key, kind in (("content", "reasoning_text"), ("summary", "summary_text")):
        parts = item.get(key) or []
        if not isinstance(parts, list):
            raise _bad(f"Invalid type for '{where}.{key}': expected an array.", f"{where}.{key}", "invalid_type")
        for i, p in enumerate(parts):
            if not isinstance(p, dict) or p.get("type") != kind or not isinstance(p.get("text"), str):
                raise _bad(f"Invalid value for '{where}.{key}[{i}]': expected {{type: {kind}, text}}.",
                           f"{where}.{key}[{i}]")
            texts.append(p["text"])
        if texts:
            break  # the readable reasoning, else its summary
    return "\n".join(texts)


def read_items(raw: list[dict[str, Any]], max_chars: int) -> tuple[list[dict[str, Any]], list[str]]:
    """Created items → the rows to store and each item's id, in order. Items are checked whole
    before anything is stored; a kind no engine could be sent is refused by name."""
    rows: list[_Row] = []
    ids: list[str] = []

    def row_for(role: str, kind: str) -> _Row:
        if not rows or not rows[-1].takes(role, kind):
            rows.append(_Row(role))
        return rows[-1]

    for i, item in enumerate(raw):
        where = f"items[{i}]"
        if not isinstance(item, dict):
            raise _bad(f"Invalid type for '{where}': expected an object.", where, "invalid_type")
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role in ("system", "developer"):
                raise _unsupported(f"'{where}': a {role} message is not kept in a conversation: send it as "
                                   "'instructions' with each response.", f"{where}.role")
            if role not in ("user", "assistant"):
                raise _bad(f"Invalid value for '{where}.role': {role!r} (user or assistant).", f"{where}.role")
            text, images = _parts_text(item.get("content"), f"{where}.content", user=role == "user")
            _check_len(text, f"{where}.content", max_chars)
            if role == "user" and not text.strip() and not images:
                raise _bad(f"'{where}': a user message needs text or an image.", f"{where}.content")
            r = row_for(role, "message")
            r.text, r.images = text.replace("\x00", ""), images
            ids.append(f"msg_{_hex(r.id)}")
        elif kind == "function_call":
            call_id, name, args = function_call_fields(item, where)
            _check_len(args, f"{where}.arguments", max_chars)
            r = row_for("assistant", "function_call")
            ids.append(f"fc_{_hex(r.id)}_{len(r.calls)}")
            r.calls.append(FunctionCall(call_id, name, args))
        elif kind == "function_call_output":
            call_id, output = function_output_fields(item, where, max_chars)
            r = row_for("user", "function_call_output")
            ids.append(f"fco_{_hex(r.id)}_{len(r.results)}")
            r.results.append(FunctionResult(call_id, output.replace("\x00", "")))
        elif kind == "reasoning":
            # The readable text is kept with the answer (not replayed, DESIGN rule 3); an opaque
            # `encrypted_content` belongs to the provider that made it and has no engine to go to here.
            text = _reasoning_text(item, where)
            _check_len(text, where, max_chars)
            r = row_for("assistant", "reasoning")
            r.reasoning = text.replace("\x00", "")
            ids.append(f"rs_{_hex(r.id)}")
        elif kind == "item_reference":
            raise _unsupported(f"'{where}': item_reference is not supported: add the item itself.", f"{where}.type")
        else:
            raise _bad(f"Invalid value for '{where}.type': {kind!r} is not an item Threadline keeps (message, "
                       "function_call, function_call_output, reasoning).", f"{where}.type")
    return [r.stored() for r in rows], ids


def _pick(rows: list[dict[str, Any]], ids: list[str]) -> list[dict[str, Any]]:
    by_id = {item["id"]: item for item in branch_items(rows)}
    return [by_id[i] for i in ids if i in by_id]


def _list(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None, "has_more": False}


# ---- the routes --------------------------------------------------------------------------------

def _json(body: dict[str, Any]) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


def _not_found(ref: str) -> OpenAIError:
    return OpenAIError(404, f"Conversation with id '{ref}' not found.", "invalid_request_error", "not_found",
                       param="conversation_id")


def _includes(request: Request) -> None:
    try:
        q = IncludeQuery.model_validate({"include": request.query_params.getlist("include") or None})
    except ValidationError as exc:
        raise _invalid(exc) from None
    for inc in q.include or ():
        if inc not in ACCEPTED_INCLUDES:
            raise _unsupported(f"include {inc!r} is not supported by Threadline (it can include: "
                               f"{', '.join(sorted(ACCEPTED_INCLUDES))}).", "include")


async def _owned(request: Request) -> tuple[ConversationService, Scope, dict[str, Any]]:
    """The conversation the path names, if the key's app owns it (404 otherwise, as for none)."""
    caller = await _auth(request)
    ref = request.path_params["conversation_id"]
    svc = state(request).service
    cid = conversation_of(ref)
    try:
        if cid is None:
            raise NotFoundError("no such conversation")
        scope, conv = await svc.owned(caller.app.name, cid)
    except NotFoundError:
        raise _not_found(ref) from None
    return svc, scope, conv


async def _run(request: Request, handler: Any) -> Response:
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except OpenAIError as exc:
        return openai_error(exc)
    except ThreadlineError as exc:
        return openai_error(_from_tl(exc))


async def create(request: Request) -> Response:
    async def run(request: Request) -> Response:
        caller, body = await _read(request, ConversationCreateRequest)
        svc = state(request).service
        meta = _metadata(body.metadata)
        rows, _ = read_items(body.items or [], state(request).gateway.settings.server.max_text_chars)
        conv, _ = await svc.create_conversation(Scope(caller.app.name, DEFAULT_USER), meta=meta or None, rows=rows)
        return _json(conversation_object(conv))
    return await _run(request, run)


async def retrieve(request: Request) -> Response:
    async def run(request: Request) -> Response:
        _, _, conv = await _owned(request)
        return _json(conversation_object(conv))
    return await _run(request, run)


async def update(request: Request) -> Response:
    async def run(request: Request) -> Response:
        _, body = await _read(request, ConversationUpdateRequest)
        svc, scope, conv = await _owned(request)
        conv = await svc.set_metadata(scope, conv["id"], _metadata(body.metadata))
        return _json(conversation_object(conv))
    return await _run(request, run)


async def delete(request: Request) -> Response:
    """The one method both APIs define on this path: a `conv_` id is OpenAI's, a bare UUID Dify's."""
    if not request.path_params["conversation_id"].startswith("conv_"):
        return await dify_api.delete_conversation(request)

    async def run(request: Request) -> Response:
        svc, scope, conv = await _owned(request)
        await svc.delete(scope, conv["id"])
        return _json({"id": conversation_ref(conv["id"]), "object": "conversation.deleted", "deleted": True})
    return await _run(request, run)


async def create_items(request: Request) -> Response:
    async def run(request: Request) -> Response:
        _, body = await _read(request, ItemsCreateRequest)
        svc, scope, conv = await _owned(request)
        _includes(request)
        rows, ids = read_items(body.items, state(request).gateway.settings.server.max_text_chars)
        written = await svc.append_messages(scope, conv["id"], rows)
        return _json(_list(_pick(written, ids)))
    return await _run(request, run)


async def list_items(request: Request) -> Response:
    async def run(request: Request) -> Response:
        svc, scope, conv = await _owned(request)
        try:
            q = InputItemsQuery.model_validate({**request.query_params, "include": request.query_params.getlist(
                "include") or None})
        except ValidationError as exc:
            raise _invalid(exc) from None
        _includes(request)
        items = branch_items(await svc.branch_rows(scope, conv["id"]))
        return _json(_page(items, q.after, q.limit, q.order))
    return await _run(request, run)


def _item_message(item_id: str) -> str | None:
    """The message an item id is derived from (see the module doc), or None."""
    _, _, rest = item_id.partition("_")
    return _uuid(rest.split("_", 1)[0])


async def _item(request: Request) -> tuple[ConversationService, Scope, dict[str, Any], dict[str, Any], dict[str, Any]]:
    svc, scope, conv = await _owned(request)
    item_id = request.path_params["item_id"]
    mid = _item_message(item_id)
    rows = await svc.branch_rows(scope, conv["id"]) if mid is not None else []
    for row in rows:
        if row["id"] == mid:
            for item in row_items(row):
                if item["id"] == item_id:
                    return svc, scope, conv, row, item
    raise OpenAIError(404, f"Item with id '{item_id}' not found.", "invalid_request_error", "not_found",
                      param="item_id")


async def retrieve_item(request: Request) -> Response:
    async def run(request: Request) -> Response:
        *_, item = await _item(request)
        _includes(request)
        return _json(item)
    return await _run(request, run)


def _blank(item_id: str) -> Any:
    """The change that deletes one item from its message's row: its text, reasoning or part is
    blanked in place (parts keep their places, see responses_api.Removed)."""
    kind, _, rest = item_id.partition("_")
    n = int(rest.split("_")[1]) if kind in ("fc", "fco") else 0

    def change(row: dict[str, Any]) -> dict[str, Any]:
        parts = [dict(p) for p in row.get("parts") or []]
        values: dict[str, Any] = {}
        if kind == "msg":
            values["content"] = ""
            if row["role"] == "user":
                parts = [{"type": REMOVED, "kind": "image"} if p.get("type") == "image" else p for p in parts]
            parts.append({"type": REMOVED, "kind": "message"})
        elif kind == "rs":
            values["reasoning"] = None
            parts = [{"type": REMOVED, "kind": "reasoning_state"} if p.get("type") == "reasoning_state" else p
                     for p in parts]
        else:
            wanted = "function_call" if kind == "fc" else "function_result"
            seen = -1
            for j, p in enumerate(parts):
                if p.get("type") == wanted or (p.get("type") == REMOVED and p.get("kind") == wanted):
                    seen += 1
                    if seen == n:
                        parts[j] = {"type": REMOVED, "kind": wanted}
                        break
        items = stored_items(parts)
        text = values.get("content", row.get("content") or "")
        values["parts"] = parts or None
        values["token_estimate"] = (estimate_message(text, sum(isinstance(i, ImagePart) for i in items))
                                    + sum(estimate_text(i.arguments) for i in items if isinstance(i, FunctionCall))
                                    + sum(estimate_text(i.output) for i in items if isinstance(i, FunctionResult)))
        return values
    return change


async def delete_item(request: Request) -> Response:
    async def run(request: Request) -> Response:
        svc, scope, conv, row, item = await _item(request)
        if len(item["id"].split("_")) > 3:  # fc_<answer>_s<step>_<n>: an engine's own agent step
            raise _unsupported(f"Item '{item['id']}' is a tool run of the engine's own agent: it cannot be deleted "
                               "alone.", "item_id")
        await svc.edit_message(scope, conv["id"], row["id"], _blank(item["id"]))
        return _json(conversation_object(await svc.conversation(scope, conv["id"])))
    return await _run(request, run)


_TAGS = ("OpenAI Conversations",)
_BOTH = ("OpenAI Conversations", "Conversations and messages")

operations = [
    Operation("POST", "/v1/conversations", create, "Create a conversation (OpenAI Conversations API), with up to 20 "
              "items", surface="openai", body=ConversationCreateRequest, response=ConversationObject, tags=_TAGS),
    Operation("GET", "/v1/conversations/{conversation_id}", retrieve, "A conversation (`conv_…` or its UUID)",
              surface="openai", response=ConversationObject, tags=_TAGS),
    Operation("POST", "/v1/conversations/{conversation_id}", update, "Replace a conversation's metadata",
              surface="openai", body=ConversationUpdateRequest, response=ConversationObject, tags=_TAGS),
    Operation("DELETE", "/v1/conversations/{conversation_id}", delete,
              "Delete a conversation. A `conv_…` id: OpenAI's delete (200 conversation.deleted). A bare UUID: "
              "Dify's (JSON body `{user}`, 204, Dify's error shape)", surface="both", body=UserPayload,
              body_required=False, response=ConversationDeleted, also_ok=(204,), tags=_BOTH),
    Operation("POST", "/v1/conversations/{conversation_id}/items", create_items, "Add up to 20 items to a "
              "conversation", surface="openai", body=ItemsCreateRequest, query=IncludeQuery,
              response=ConversationItemList, tags=_TAGS),
    Operation("GET", "/v1/conversations/{conversation_id}/items", list_items, "A conversation's items (its current "
              "branch), newest first by default", surface="openai", query=InputItemsQuery,
              response=ConversationItemList, tags=_TAGS),
    Operation("GET", "/v1/conversations/{conversation_id}/items/{item_id}", retrieve_item, "One item of a "
              "conversation", surface="openai", query=IncludeQuery, response=ConversationItemObject, tags=_TAGS),
    Operation("DELETE", "/v1/conversations/{conversation_id}/items/{item_id}", delete_item, "Delete an item: later "
              "responses are no longer sent it", surface="openai", response=ConversationObject, tags=_TAGS),
]

__all__ = ["branch_items", "conversation_object", "operations", "read_items", "row_items"]
