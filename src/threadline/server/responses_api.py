"""OpenAI's Responses API, stateful over every engine (OpenAI-compatible, Gemini, the local model,
Dify).

A response is an answer in Threadline's conversation tree, so the state the API promises is the
state Threadline already keeps: `resp_<answer id>` names the answer, `previous_response_id` is a
pointer into the tree (continuing from an older response forks a branch, without copying), and
`conversation` names the conversation itself (the same one the Dify-style route, the page and the
CLI show). Peers that bridge this API onto Chat Completions lose context in the ways listed in
../shared/reference/responses-api.md §3: history rebuilt from logs flushed later (a follow-up
within ~10 s lost it), two ids per streamed response, function calls and reasoning dropped from
stored context. Here the question is written before the engine is called and the answer before
the response id is returned, items are stored typed (function calls and results included), and
every item id is derived from the message that holds it, so it is the same in every event, in the
final object and on retrieval:

    resp_<answer>   msg_<answer>   rs_<answer>   fc_<answer>_<n>      (output)
    msg_<question>  fco_<question>_<n>                                  (input)

`store: false` runs in a scratch conversation (seeded with the chain it continues) that is
removed when the response ends, so nothing of it is kept and a later `previous_response_id` to it
is `previous_response_not_found`, as OpenAI answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import ValidationError
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response

from ..errors import NotFoundError, PreviousResponseNotFoundError, ThreadlineError
from ..messages import (
    AgentStep,
    FunctionCall,
    FunctionResult,
    GenerationParams,
    ImagePart,
    Item,
    ReasoningDelta,
    Reply,
    ResponseFormat,
    TextDelta,
    ToolCallDelta,
    ToolChoice,
    ToolSpec,
    TurnCompleted,
    TurnEvent,
    TurnFailed,
    TurnStarted,
    Usage,
    items_from_json,
)
from ..service import ConversationService, Scope
from ..tokens import estimate_text
from ..turns import PastMessage, TurnRequest
from .common import Caller, EventStream, HTTPError, is_json, state
from .openai_api import CONVERSATION_HEADER, OpenAIError, _auth, _from_tl, _invalid, error_type, openai_error, resolve_model
from .responses_models import (
    CompactedResponse,
    CompactRequest,
    ConversationRef,
    InputItemList,
    InputItemsQuery,
    InputTokens,
    InputTokensRequest,
    ResponseCreateRequest,
    ResponseDeleted,
    ResponseObject,
)
from .spec import Operation

DEFAULT_USER = "openai-user"  # the Chat Completions route's too: one conversation list for both
METADATA_PAIRS, METADATA_KEY, METADATA_VALUE = 16, 64, 512
ACCEPTED_INCLUDES = frozenset({"reasoning.encrypted_content", "message.input_image.image_url"})


# ---- ids ---------------------------------------------------------------------------------------

def _hex(uid: str) -> str:
    return uid.replace("-", "")


def _uuid(h: str) -> str | None:
    if len(h) != 32 or any(c not in "0123456789abcdef" for c in h):
        return None
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def response_id(message_id: str) -> str:
    return "resp_" + _hex(message_id)


def message_of_response(rid: str) -> str | None:
    return _uuid(rid[5:]) if rid.startswith("resp_") else None


def conversation_ref(conversation_id: str) -> str:
    return "conv_" + _hex(conversation_id)


def conversation_of(ref: str) -> str | None:
    """`conv_<hex>` or the conversation id as the other surfaces show it."""
    if ref.startswith("conv_"):
        return _uuid(ref[5:])
    return ref if len(ref) == 36 and _uuid(ref.replace("-", "")) == ref else None


# ---- reading a request ---------------------------------------------------------------------------

def _bad(message: str, param: str | None, code: str = "invalid_value") -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def _unsupported(message: str, param: str) -> OpenAIError:
    return OpenAIError(400, message, param=param, code="unsupported_parameter")


def _parts_text(content: Any, where: str, *, user: bool) -> tuple[str, list[ImagePart]]:
    """A message's content: a string, or parts (input_text / input_image from a user; output_text
    or refusal from an assistant)."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise _bad(f"Invalid type for '{where}': expected a string or an array of content parts.", where,
                   "invalid_type")
    texts: list[str] = []
    images: list[ImagePart] = []
    for i, p in enumerate(content):
        at = f"{where}[{i}]"
        kind = p.get("type") if isinstance(p, dict) else None
        if kind in ("input_text", "output_text", "text", "refusal"):
            text = p.get("text") if kind != "refusal" else p.get("refusal")
            if not isinstance(text, str):
                raise _bad(f"Invalid type for '{at}.text': expected a string.", f"{at}.text", "invalid_type")
            texts.append(text)
        elif kind == "input_image" and user:
            url, fid, detail = p.get("image_url"), p.get("file_id"), p.get("detail")
            if detail not in (None, "auto", "low", "high"):
                raise _bad(f"Invalid value for '{at}.detail': {detail!r} (auto, low or high).", f"{at}.detail")
            detail = None if detail == "auto" else detail
            if isinstance(url, str) and url.startswith(("http://", "https://", "data:")):
                images.append(ImagePart(url=url, detail=detail))
            elif isinstance(fid, str) and fid:
                images.append(ImagePart(file_id=fid, detail=detail))
            else:
                raise _bad(f"Invalid value for '{at}': an input_image needs an image_url (http(s) or data:) or "
                           "the file_id of an uploaded image.", at)
        elif kind == "input_file":
            raise _unsupported(f"'{at}': input_file is not supported: Threadline's engines take text and images "
                               "(send an image as input_image).", f"{at}.type")
        else:
            raise _bad(f"Invalid value for '{at}.type': {kind!r} is not a content part type Threadline forwards "
                       f"({'input_text, input_image' if user else 'output_text, refusal'}).", f"{at}.type")
    return "\n".join(texts), images


@dataclass
class _Input:
    """The request's items, read: system text, the history they carry, and the new input (the
    trailing user messages, or the outputs of the last function calls)."""

    system: list[str] = field(default_factory=list)
    history: list[PastMessage] = field(default_factory=list)
    text: str = ""
    images: list[ImagePart] = field(default_factory=list)
    results: list[FunctionResult] = field(default_factory=list)
    compaction: str | None = None  # the summary id a leading compaction item names


COMPACTION_PREFIX = "tlsum_"  # a compaction item's encrypted_content: Threadline's summary id, opaque to clients


def compaction_token(summary_id: str) -> str:
    return COMPACTION_PREFIX + _hex(summary_id)


def _read_input(raw: str | list[dict[str, Any]], max_chars: int, *, window: bool = False) -> _Input:
    """`window`: the items are a whole context to keep (compact's input), ending anywhere; else they
    end with what the response answers."""
    out = _Input()
    if isinstance(raw, str):
        out.text = raw
        _check_len(raw, "input", max_chars)
        return out
    texts: list[str] = []
    images: list[ImagePart] = []
    results: list[FunctionResult] = []
    answer: tuple[list[str], list[Item]] | None = None  # the assistant side being read
    names: dict[str, str] = {}  # call id -> name of the calls read so far

    def close_answer() -> None:
        nonlocal answer
        if answer is not None:
            out.history.append(PastMessage("assistant", "\n".join(answer[0]), tuple(answer[1])))
            answer = None

    def close_question() -> None:
        if texts or images or results:
            out.history.append(PastMessage("user", "\n".join(texts), (*images, *results)))
            texts.clear()
            images.clear()
            results.clear()

    for i, item in enumerate(raw):
        where = f"input[{i}]"
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            text, imgs = _parts_text(item.get("content"), f"{where}.content", user=role != "assistant")
            _check_len(text, f"{where}.content", max_chars)
            if role in ("system", "developer"):
                out.system.append(text)
            elif role == "user":
                close_answer()
                texts.append(text)
                images.extend(imgs)
            elif role == "assistant":
                close_question()
                answer = answer or ([], [])
                answer[0].append(text)
            else:
                raise _bad(f"Invalid value for '{where}.role': {role!r} (user, assistant, system or developer).",
                           f"{where}.role")
        elif kind == "function_call":
            call_id, name, args = function_call_fields(item, where)
            close_question()
            answer = answer or ([], [])
            answer[1].append(FunctionCall(call_id, name, args))
            names[call_id] = name
        elif kind == "function_call_output":
            call_id, output = function_output_fields(item, where, max_chars)
            close_answer()
            results.append(FunctionResult(call_id, output, names.get(call_id)))
        elif kind == "reasoning":
            # The engine's own reasoning is kept with the answer that made it and goes back to it by
            # that engine's rules (DESIGN rule 3); a replayed copy adds nothing to send.
            if answer is None:
                close_question()
                answer = ([], [])
        elif kind == "compaction":
            token = item.get("encrypted_content")
            sid = _uuid(token[len(COMPACTION_PREFIX):]) if isinstance(token, str) and token.startswith(
                COMPACTION_PREFIX) else None
            if sid is None:
                raise _bad(f"Invalid value for '{where}.encrypted_content': pass back a compaction item exactly as "
                           "/v1/responses/compact returned it.", f"{where}.encrypted_content")
            if i != 0:
                raise _bad(f"'{where}': a compaction item goes first: it stands for everything before it.",
                           f"{where}.type")
            out.compaction = sid
        elif kind == "item_reference":
            raise _unsupported(f"'{where}': item_reference is not supported: continue with previous_response_id or "
                               "conversation instead.", f"{where}.type")
        else:
            raise _bad(f"Invalid value for '{where}.type': {kind!r} is not an input item Threadline takes (message, "
                       "function_call, function_call_output, reasoning).", f"{where}.type")
    if window:
        close_answer()
        close_question()
        return out
    if answer is not None or not (texts or images or results):
        raise _bad("The input must end with a user message or function_call_output items: they are what this "
                   "response answers.", "input")
    out.text, out.images, out.results = "\n".join(texts), list(images), list(results)
    return out


def function_call_fields(item: dict[str, Any], where: str) -> tuple[str, str, str]:
    """A function_call item's call id, name and JSON arguments, checked (Responses input and
    Conversations items read them alike)."""
    call_id, name, args = item.get("call_id"), item.get("name"), item.get("arguments", "{}")
    if not isinstance(call_id, str) or not call_id or not isinstance(name, str) or not name:
        raise _bad(f"'{where}': a function_call needs a call_id and a name.", f"{where}.call_id",
                   "missing_required_parameter")
    if not isinstance(args, str):
        raise _bad(f"Invalid type for '{where}.arguments': expected a JSON string.", f"{where}.arguments",
                   "invalid_type")
    return call_id, name, args


def function_output_fields(item: dict[str, Any], where: str, max_chars: int) -> tuple[str, str]:
    """A function_call_output item's call id and text output (text parts joined), checked."""
    call_id, output = item.get("call_id"), item.get("output")
    if not isinstance(call_id, str) or not call_id:
        raise _bad(f"Missing required parameter: '{where}.call_id'.", f"{where}.call_id",
                   "missing_required_parameter")
    if isinstance(output, list):
        output, imgs = _parts_text(output, f"{where}.output", user=True)
        if imgs:
            raise _unsupported(f"'{where}.output': a function output carries text only; send images in a "
                               "user message.", f"{where}.output")
    if not isinstance(output, str):
        raise _bad(f"Invalid type for '{where}.output': expected a string.", f"{where}.output", "invalid_type")
    _check_len(output, f"{where}.output", max_chars)
    return call_id, output


def _check_len(text: str, where: str, max_chars: int) -> None:
    if len(text) > max_chars:
        raise _bad(f"'{where}' is longer than the limit of {max_chars} characters.", where, "string_above_max_length")


def _tools(body: ResponseCreateRequest | InputTokensRequest) -> tuple[tuple[ToolSpec, ...], ToolChoice | None]:
    tools: list[ToolSpec] = []
    for i, t in enumerate(body.tools or ()):
        where = f"tools[{i}]"
        if t.get("type") != "function":
            raise _unsupported(f"Tool type {t.get('type')!r} is not supported by Threadline: only function tools "
                               "(run by the caller, over every engine).", f"{where}.type")
        name = t.get("name")
        if not isinstance(name, str) or not name:
            raise _bad(f"Missing required parameter: '{where}.name'.", f"{where}.name", "missing_required_parameter")
        extra = set(t) - {"type", "name", "description", "parameters", "strict"}
        if extra:
            raise _bad(f"Unrecognized parameter '{where}.{sorted(extra)[0]}'.", f"{where}.{sorted(extra)[0]}",
                       "unrecognized_argument")
        desc, params, strict = t.get("description"), t.get("parameters"), t.get("strict")
        if desc is not None and not isinstance(desc, str):
            raise _bad(f"Invalid type for '{where}.description': expected a string.", f"{where}.description",
                       "invalid_type")
        if params is not None and not isinstance(params, dict):
            raise _bad(f"Invalid type for '{where}.parameters': expected a JSON schema object.", f"{where}.parameters",
                       "invalid_type")
        if strict is not None and not isinstance(strict, bool):
            raise _bad(f"Invalid type for '{where}.strict': expected a boolean.", f"{where}.strict", "invalid_type")
        tools.append(ToolSpec(name, desc, params, strict))
    choice: ToolChoice | None = None
    tc = body.tool_choice
    if isinstance(tc, str):
        if tc not in ("none", "auto", "required"):
            raise _bad(f"Invalid value for 'tool_choice': {tc!r} (none, auto or required).", "tool_choice")
        choice = ToolChoice(tc)  # type: ignore[arg-type]  # one of the three, checked above
    elif isinstance(tc, dict):
        if tc.get("type") != "function":
            raise _unsupported(f"tool_choice of type {tc.get('type')!r} is not supported: use none, auto, required "
                               "or {type: function, name}.", "tool_choice")
        name = tc.get("name")
        if name not in {t.name for t in tools}:
            raise _bad(f"Invalid value for 'tool_choice': no function named {name!r} in 'tools'.", "tool_choice")
        choice = ToolChoice("function", name)
    if choice is not None and choice.mode != "none" and not tools:
        raise _bad("Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
                   "tool_choice")
    return tuple(tools), choice


def _generation(body: ResponseCreateRequest) -> GenerationParams:
    if body.top_logprobs:
        raise _unsupported("'top_logprobs' is not supported by Threadline: leave it out or set 0.", "top_logprobs")
    for inc in body.include or ():
        if inc not in ACCEPTED_INCLUDES:
            raise _unsupported(f"include {inc!r} is not supported by Threadline (it can include: "
                               f"{', '.join(sorted(ACCEPTED_INCLUDES))}).", "include")
    if body.service_tier not in (None, "auto", "default"):
        raise _unsupported(f"service_tier {body.service_tier!r} is not supported: Threadline's engines are "
                           "called at their default tier (leave it out, or auto / default).", "service_tier")
    rf = None
    text = body.text
    if text is not None:
        if text.verbosity not in (None, "medium"):
            raise _unsupported("'text.verbosity' other than medium is not supported by Threadline's engines.",
                               "text.verbosity")
        f = text.format
        if f is not None and f.type != "text":
            if f.type == "json_schema" and (not f.name or f.schema_ is None):
                raise _bad("A json_schema text format needs a name and a schema.", "text.format")
            rf = ResponseFormat(f.type, f.schema_, f.name, f.strict, f.description)
    effort = body.reasoning.effort if body.reasoning else None
    if effort == "max":
        effort = "xhigh"  # the highest setting the engines' profiles know
    return GenerationParams(temperature=body.temperature, top_p=body.top_p, max_tokens=body.max_output_tokens,
                            response_format=rf, parallel_tool_calls=body.parallel_tool_calls, reasoning_effort=effort)


def _metadata(meta: dict[str, str] | None) -> dict[str, str]:
    meta = meta or {}
    if len(meta) > METADATA_PAIRS:
        raise _bad(f"Invalid 'metadata': at most {METADATA_PAIRS} pairs.", "metadata")
    for k, v in meta.items():
        if len(k) > METADATA_KEY or len(v) > METADATA_VALUE:
            raise _bad(f"Invalid 'metadata': keys at most {METADATA_KEY} characters, values at most {METADATA_VALUE}.",
                       "metadata")
    return meta


def _echo(body: ResponseCreateRequest, tools: tuple[ToolSpec, ...], conversation: str | None) -> dict[str, Any]:
    """What the Response object repeats of its request, stored with the answer."""
    text: dict[str, Any] = {"format": {"type": "text"}, "verbosity": "medium"}
    if body.text is not None and body.text.format is not None:
        text["format"] = body.text.format.model_dump(by_alias=True, exclude_none=True)
    tc = body.tool_choice if body.tool_choice is not None else "auto"
    return {
        "model": body.model, "instructions": body.instructions,
        "tools": [{"type": "function", "name": t.name, "description": t.description, "parameters": t.parameters,
                   "strict": t.strict} for t in tools],
        "tool_choice": tc, "parallel_tool_calls": body.parallel_tool_calls is not False,
        "temperature": body.temperature, "top_p": body.top_p, "max_output_tokens": body.max_output_tokens,
        "max_tool_calls": body.max_tool_calls, "text": text,
        "reasoning": body.reasoning.model_dump() if body.reasoning else None,
        "truncation": body.truncation or "auto", "metadata": _metadata(body.metadata),
        "previous_response_id": body.previous_response_id, "conversation": conversation,
        "store": body.store is not False, "background": bool(body.background), "user": body.user,
        "safety_identifier": body.safety_identifier, "prompt_cache_key": body.prompt_cache_key,
        "service_tier": "default",  # what the engines were called at (others are refused)
    }


# ---- rendering ---------------------------------------------------------------------------------

def _usage(u: Usage | None) -> dict[str, Any] | None:
    if u is None:
        return None
    return {"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": u.cached_tokens},
            "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
            "total_tokens": u.total_tokens}


def _message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _reasoning_item(item_id: str, text: str) -> dict[str, Any]:
    return {"id": item_id, "type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": text}],
            "encrypted_content": None, "status": "completed"}


def _call_item(item_id: str, c: FunctionCall, status: str = "completed") -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "status": status, "call_id": c.call_id, "name": c.name,
            "arguments": c.arguments}


def _output_item(item_id: str, r: FunctionResult) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call_output", "status": "completed", "call_id": r.call_id,
            "output": r.output}


def _step_items(h: str, steps: list[AgentStep]) -> list[dict[str, Any]]:
    """A Dify agent's own tool runs: each call with its output, already done (nothing to answer)."""
    out: list[dict[str, Any]] = []
    for j, s in enumerate(steps):
        for k, c in enumerate(s.calls):
            out.append(_call_item(f"fc_{h}_s{j}_{k}", c))
            r = next((r for r in s.results if r.call_id == c.call_id), None)
            if r is not None:
                out.append(_output_item(f"fco_{h}_s{j}_{k}", r))
    return out


@dataclass(frozen=True, slots=True)
class Removed:
    """The place of an item deleted through the Conversations API: a part `{"type": "removed",
    "kind": ...}` among its message's parts. No engine is sent it (items_from_json skips unknown
    types) and no list shows it, but it keeps its number, so the items after it keep their ids
    (`fc_<answer>_<n>` counts the answer's calls). Kind "message": the message has no text item."""

    kind: str  # function_call | function_result | image | reasoning_state | message


REMOVED = "removed"


def stored_items(parts: list[dict[str, Any]] | None) -> list[Item | Removed]:
    """A message's parts as items, with the places of deleted ones (see Removed)."""
    out: list[Item | Removed] = []
    for p in parts or ():
        if p.get("type") == REMOVED:
            out.append(Removed(str(p.get("kind") or "")))
        else:
            out.extend(items_from_json([p]))
    return out


def _removed(items: Sequence[Item | Removed], kind: str) -> bool:
    return any(isinstance(i, Removed) and i.kind == kind for i in items)


def output_items(message_id: str, text: str, reasoning: str | None, items: Sequence[Item | Removed],
                 status: str = "completed") -> list[dict[str, Any]]:
    """An answer's output items: reasoning, the engine's own tool runs, the message, the calls."""
    h = _hex(message_id)
    out: list[dict[str, Any]] = []
    if reasoning is not None:
        out.append(_reasoning_item(f"rs_{h}", reasoning))
    out += _step_items(h, [i for i in items if isinstance(i, AgentStep)])
    calls = [i for i in items if isinstance(i, FunctionCall) or (isinstance(i, Removed) and i.kind == "function_call")]
    if (text or not calls) and not _removed(items, "message"):
        out.append(_message_item(f"msg_{h}", text, "completed" if status != "in_progress" else "in_progress"))
    out += [_call_item(f"fc_{h}_{n}", c) for n, c in enumerate(calls) if isinstance(c, FunctionCall)]
    return out


def input_items(question: dict[str, Any]) -> list[dict[str, Any]]:
    """A question's items as the caller sent them: the user message, then function outputs."""
    h = _hex(question["id"])
    items = stored_items(question.get("parts"))
    out: list[dict[str, Any]] = []
    content: list[dict[str, Any]] = []
    if question.get("content"):
        content.append({"type": "input_text", "text": question["content"]})
    for i in items:
        if isinstance(i, ImagePart):
            content.append({"type": "input_image", "image_url": i.url, "file_id": i.file_id, "detail": i.detail or "auto"})
    if content:
        out.append({"id": f"msg_{h}", "type": "message", "role": "user", "status": "completed", "content": content})
    results = [i for i in items if isinstance(i, FunctionResult) or (isinstance(i, Removed) and i.kind == "function_result")]
    out += [_output_item(f"fco_{h}_{n}", r) for n, r in enumerate(results) if isinstance(r, FunctionResult)]
    return out


def _status(status: str, finish_reason: str | None) -> tuple[str, dict[str, Any] | None]:
    if status == "streaming":
        return "in_progress", None
    if status == "stopped":
        return "cancelled", None
    if status == "failed":
        return "failed", None
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish_reason == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def _error(err: dict[str, Any] | None) -> dict[str, Any] | None:
    if not err:
        return None
    status = int(err.get("status") or 500)
    code = "rate_limit_exceeded" if status == 429 else "server_error" if status >= 500 else err.get("code")
    return {"code": code, "message": err.get("message") or "Internal error"}


def response_object(*, message_id: str, created_at: float, status: str, finish_reason: str | None,
                    output: list[dict[str, Any]], usage: Usage | None, error: dict[str, Any] | None,
                    echo: dict[str, Any], completed_at: float | None = None) -> dict[str, Any]:
    st, incomplete = _status(status, finish_reason)
    conv = echo.get("conversation")
    return {
        "id": response_id(message_id), "object": "response", "created_at": int(created_at),
        "completed_at": int(completed_at) if completed_at and st != "in_progress" else None,
        "status": st, "error": _error(error) if st == "failed" else None, "incomplete_details": incomplete,
        "instructions": echo.get("instructions"), "model": echo.get("model") or "",
        "output": output, "parallel_tool_calls": echo.get("parallel_tool_calls", True),
        "previous_response_id": echo.get("previous_response_id"), "conversation": {"id": conv} if conv else None,
        "tools": echo.get("tools", []), "tool_choice": echo.get("tool_choice", "auto"),
        "temperature": echo.get("temperature"), "top_p": echo.get("top_p"), "presence_penalty": 0.0,
        "frequency_penalty": 0.0, "top_logprobs": 0, "max_output_tokens": echo.get("max_output_tokens"),
        "max_tool_calls": echo.get("max_tool_calls"),
        "text": echo.get("text") or {"format": {"type": "text"}, "verbosity": "medium"},
        "reasoning": echo.get("reasoning"), "truncation": echo.get("truncation", "auto"),
        "usage": _usage(usage) if st != "in_progress" else None, "store": echo.get("store", True),
        "background": echo.get("background", False), "service_tier": echo.get("service_tier", "default"),
        "metadata": echo.get("metadata") or {}, "safety_identifier": echo.get("safety_identifier"),
        "prompt_cache_key": echo.get("prompt_cache_key"), "user": echo.get("user"),
    }


def _stored_echo(row: dict[str, Any]) -> dict[str, Any]:
    """An answer made on another surface has no Responses request: rendered with the defaults."""
    return row.get("response") or {"model": row.get("engine") or "", "store": True}


def stored_response(row: dict[str, Any]) -> dict[str, Any]:
    items = stored_items(row.get("parts"))
    usage = Usage.from_json(row["usage"]) if row.get("usage") else None
    return response_object(message_id=row["id"], created_at=row["created_at"], status=row["status"],
                           finish_reason=row.get("finish_reason"),
                           output=output_items(row["id"], row.get("content") or "", row.get("reasoning"), items,
                                               "in_progress" if row["status"] == "streaming" else "completed"),
                           usage=usage, error=row.get("error"), echo=_stored_echo(row),
                           completed_at=row.get("updated_at"))


def _reply_response(reply: Reply, echo: dict[str, Any], output: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    items: list[Item] = [*reply.steps, *reply.tool_calls]
    return response_object(message_id=reply.message_id, created_at=reply.created_at, status=reply.status,
                           finish_reason=reply.finish_reason,
                           output=output if output is not None else output_items(reply.message_id, reply.answer,
                                                                                 reply.reasoning, items),
                           usage=reply.usage, error=reply.error, echo=echo, completed_at=time.time())


# ---- the create route ----------------------------------------------------------------------------

@dataclass
class _Plan:
    scope: Scope
    request: TurnRequest
    echo: dict[str, Any]
    scratch: bool  # store: false — the conversation the turn runs in is removed when it ends


def _json_body(raw: bytes, model: type[Any]) -> Any:
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        kind = exc.errors()[0]["type"]
        if kind == "json_invalid":
            raise OpenAIError(400, "We could not parse the JSON body of your request.") from None
        if kind == "model_type":
            raise OpenAIError(400, "The request body must be a JSON object.") from None
        raise _invalid(exc) from None


async def _read(request: Request, model: type[Any]) -> tuple[Caller, Any]:
    caller = await _auth(request)
    if not is_json(request.headers.get("content-type", "")):
        raise OpenAIError(415, "Content-Type must be application/json.", code="unsupported_media_type")
    try:
        raw = await request.body()
    except HTTPError as exc:
        raise OpenAIError(exc.status, exc.message, error_type(exc.status), exc.code) from None
    return caller, _json_body(raw, model)


async def _previous(svc: ConversationService, app: str, rid: str, local: str | None = None) -> tuple[Scope, dict[str, Any]]:
    """The stored response `previous_response_id` names, or OpenAI's previous_response_not_found.
    An unstored (store: false) response is found only by the WebSocket connection that made it
    (`local`, its cache): its scratch conversation lives as long as that connection does."""
    mid = message_of_response(rid)
    if mid is None:
        raise PreviousResponseNotFoundError(rid)
    try:
        scope, row = await svc.answer_in_app(app, mid)
    except NotFoundError:
        raise PreviousResponseNotFoundError(rid) from None
    echo = row.get("response") or {}
    if echo.get("deleted") or (_unstored(row) and rid != local):
        raise PreviousResponseNotFoundError(rid)
    return scope, row


async def _named_conversation(svc: ConversationService, app: str,
                              ref: str | ConversationRef) -> tuple[Scope, str]:
    """The conversation a `conversation` field names (either id form), of the key's app."""
    name = ref if isinstance(ref, str) else ref.id
    cid = conversation_of(name)
    if cid is None:
        raise NotFoundError(f"Conversation with id '{name}' not found.")
    scope, _ = await svc.owned(app, cid)
    return scope, cid


def _unstored(row: dict[str, Any]) -> bool:
    return (row.get("response") or {}).get("store") is False


def _past(rows: list[dict[str, Any]]) -> list[PastMessage]:
    """Stored rows as messages a scratch conversation is seeded with (store: false)."""
    out = []
    for r in rows:
        if r["role"] in ("user", "assistant") and r.get("status") in (None, "completed", "stopped"):
            out.append(PastMessage(r["role"], r.get("content") or "", tuple(items_from_json(r.get("parts")))))
    return out


async def plan_turn(request: HTTPConnection, caller: Caller, body: ResponseCreateRequest,
                    local: str | None = None, *, streamed: bool = False) -> _Plan:
    """Everything a create request asks, checked and resolved into one TurnRequest. `local` is the
    unstored response a WebSocket connection may continue (its cache): a store: false continuation
    of it runs on in its scratch conversation, a stored one starts a conversation of its own.
    `streamed`: the transport streams every response (a WebSocket), whatever the body says."""
    gw = state(request).gateway
    svc = state(request).service
    limits = gw.settings.server
    app_cfg, engine = resolve_model(gw, caller.app, body.model)
    if body.previous_response_id and body.conversation:
        raise _bad("'previous_response_id' and 'conversation' cannot be used together.", "previous_response_id",
                   "invalid_request")
    if isinstance(body.input, list) and len(body.input) > limits.max_messages:
        raise _bad(f"'input' has more than the limit of {limits.max_messages} items.", "input", "array_above_max_length")
    user = body.user or body.safety_identifier or DEFAULT_USER
    if len(user) > limits.max_user_chars or "\x00" in user:
        raise _bad(f"Invalid value for 'user': at most {limits.max_user_chars} characters, no NUL.", "user")
    inp = _read_input(body.input, limits.max_text_chars)
    tools, tool_choice = _tools(body)
    params = _generation(body)
    store = body.store is not False
    eng = gw.engine(engine or app_cfg.engine)
    if not store and eng.stateful:
        raise _unsupported(f"'store': false cannot be honoured by engine {eng.name!r}: it keeps the conversation "
                           "itself.", "store")
    if body.background and not store:
        raise _bad("A background response must be stored: 'background' needs 'store' true.", "background")
    if inp.images:
        try:
            gw.refuse_images(eng)
        except ThreadlineError as exc:
            raise _from_tl(exc) from None
    scope = Scope(app_cfg.name, user)
    cid: str | None = None
    parent: str | None = None
    conv_ref: str | None = None
    seed: list[PastMessage] = []
    unstored_prev = False
    history = inp.history
    try:
        if inp.compaction is not None:
            if body.previous_response_id or body.conversation is not None:
                raise _bad("A compaction item starts a new chain: send it without 'previous_response_id' or "
                           "'conversation'.", "input")
            scope, cid, parent = await _after_compaction(svc, app_cfg.name, inp.compaction, history)
            history = []
            if not store:
                seed = _past(await svc.branch_rows(scope, cid, parent))
                unstored_prev = True  # the stored chain goes on in a scratch conversation
        elif body.previous_response_id:
            scope, prev = await _previous(svc, app_cfg.name, body.previous_response_id, local)
            cid, parent = prev["conversation_id"], prev["id"]
            unstored_prev = _unstored(prev)
            if store == unstored_prev:  # moving between a stored chain and a scratch conversation
                seed = _past(await svc.branch_rows(scope, cid, parent))
        elif body.conversation is not None:
            ref = body.conversation if isinstance(body.conversation, str) else body.conversation.id
            cid = conversation_of(ref)
            if cid is None:
                raise NotFoundError(f"Conversation with id '{ref}' not found.")
            if not store:
                raise _bad("A response in a conversation is added to it: 'conversation' needs 'store' true.", "store")
            scope, _ = await svc.owned(app_cfg.name, cid)
            conv_ref = conversation_ref(cid)
    except NotFoundError as exc:
        raise OpenAIError(404, exc.message, "invalid_request_error", "not_found", param="conversation") from None
    except ThreadlineError as exc:
        raise _from_tl(exc) from None
    if cid is not None and history:
        raise _bad("With 'previous_response_id' or 'conversation', 'input' holds only the new items (user messages "
                   "or function_call_output): the earlier ones are already stored.", "input")
    if store == unstored_prev:
        history, cid, parent = [*seed, *history], None, None
    elif cid is None and history:
        cid = await svc.find_conversation(scope, history)
        if cid is not None:
            history = []
    instructions = tuple(s for s in ((body.instructions or ""), *inp.system) if s)
    echo = _echo(body, tools, conv_ref)
    req = TurnRequest(user=scope.user, text=inp.text, app=app_cfg.name, conversation_id=cid, parent_id=parent,
                      engine=engine, images=tuple(inp.images), results=tuple(inp.results), tools=tools,
                      tool_choice=tool_choice, params=params, stream=bool(body.stream or body.background or streamed),
                      instructions=instructions, key_id=caller.key_id,
                      history=tuple(history) if cid is None else (), truncation=body.truncation or "auto",
                      response=echo, scratch=not store)
    return _Plan(scope, req, echo, scratch=not store)


async def _after_compaction(svc: ConversationService, app: str, summary_id: str,
                            history: list[PastMessage]) -> tuple[Scope, str, str]:
    """Where a chain that starts with a compaction item goes on: the conversation the summary was
    made in, after the last message it covers, or after the items that follow it in `input` when
    they are that conversation's next messages (a client that keeps the window itself resends
    them; continuing from an older point of it forks a branch). The summary then stands in for what
    it covers when the turn is packed."""
    try:
        scope, row = await svc.summary_in_app(app, summary_id)
    except NotFoundError:
        raise _bad("The compaction item names no summary of this app's: it may have been made with another key.",
                   "input") from None
    cid, tip = row["conversation_id"], row["parent_id"]
    if history:
        rows = [r for r in await svc.branch_rows(scope, cid) if r["role"] in ("user", "assistant")]
        at = next((i for i, r in enumerate(rows) if r["id"] == tip), None)
        after = rows[at + 1:at + 1 + len(history)] if at is not None else []
        said = [(r["role"], (r.get("content") or "").strip()) for r in after]
        if said != [(m.role, m.text.strip()) for m in history] or after[-1]["role"] != "assistant":
            raise _bad("The items after the compaction item are not the stored conversation's next messages: "
                       "continue with previous_response_id instead.", "input")
        tip = after[-1]["id"]
    return scope, cid, tip


async def compact(request: Request) -> Response:
    """POST /v1/responses/compact: an engine writes a summary of the context (a stored chain, a
    conversation, or the items given), stored in that conversation; the answer is the new input
    window, one compaction item, to start the next chain with (`input = [item, ...new items]`)."""
    try:
        caller, body = await _read(request, CompactRequest)
        gw = state(request).gateway
        svc = state(request).service
        app_cfg, engine = resolve_model(gw, caller.app, body.model)
        if body.previous_response_id and body.conversation:
            raise _bad("'previous_response_id' cannot be used together with 'conversation'.", "previous_response_id",
                       "invalid_request")
        inp = (_read_input(body.input, gw.settings.server.max_text_chars, window=True)
               if body.input not in (None, "", []) else _Input())
        if (body.previous_response_id or body.conversation is not None) and (inp.history or inp.text):
            raise _bad("'input' is compacted when no stored context is named: send the new items with the next "
                       "create instead.", "input")
        if inp.system or body.instructions:
            raise _unsupported("'instructions' are not compacted: they belong to each response; send them again "
                               "with the next create.", "instructions")
        tip: str | None = None
        try:
            if body.previous_response_id:
                scope, prev = await _previous(svc, app_cfg.name, body.previous_response_id)
                if _unstored(prev):
                    raise PreviousResponseNotFoundError(body.previous_response_id)
                cid, tip = prev["conversation_id"], prev["id"]
            elif body.conversation is not None:
                scope, cid = await _named_conversation(svc, app_cfg.name, body.conversation)
            elif inp.compaction is not None:  # compacting again: the chain the item starts, plus what follows
                scope, cid, tip = await _after_compaction(svc, app_cfg.name, inp.compaction, inp.history)
            elif inp.history:
                scope = Scope(app_cfg.name, body.user or body.safety_identifier or DEFAULT_USER)
                found = await svc.find_conversation(scope, inp.history)
                cid = found or await svc.import_history(scope, engine or app_cfg.engine, inp.history)
            else:
                raise _bad("Nothing to compact: give 'previous_response_id', 'conversation' or 'input' items.",
                           "input", "missing_required_parameter")
            done = await svc.compact(scope, cid, tip_id=tip, engine=engine)
        except PreviousResponseNotFoundError as exc:
            raise _failure_of(exc) from None
        except NotFoundError as exc:
            raise OpenAIError(404, exc.message, "invalid_request_error", "not_found", param="conversation") from None
        except ThreadlineError as exc:
            raise _from_tl(exc) from None
    except OpenAIError as exc:
        return openai_error(exc)
    item_id = "cmp_" + _hex(done.id)
    return Response(orjson.dumps({
        "id": item_id, "object": "response.compaction", "created_at": int(done.created_at),
        "output": [{"type": "compaction", "id": item_id, "encrypted_content": compaction_token(done.id),
                    "created_by": done.engine}],
        "usage": _usage(done.usage)}), media_type="application/json",
        headers={"X-Threadline-Conversation-Id": done.conversation_id})


async def create(request: Request) -> Response | EventStream:
    try:
        return await _create(request)
    except OpenAIError as exc:
        return openai_error(exc)
    except ThreadlineError as exc:  # an engine that is unavailable, a busy conversation...
        return openai_error(_failure_of(exc))


async def _create(request: Request) -> Response | EventStream:
    caller, body = await _read(request, ResponseCreateRequest)
    plan = await plan_turn(request, caller, body)
    svc = state(request).service
    agen = svc.turn(plan.scope, plan.request)
    try:
        first = await agen.__anext__()
    except ThreadlineError as exc:
        raise _failure_of(exc) from None
    if isinstance(first, TurnFailed):  # refused before the engine accepted: the real status, not a 200
        await agen.aclose()
        await _scrap(svc, plan, first.reply.conversation_id)
        raise _failure(first, plan.scratch)
    assert isinstance(first, TurnStarted)
    # A store: false response's conversation is no conversation of the caller's: its id is not told.
    headers = {} if plan.scratch else {"X-Threadline-Conversation-Id": first.conversation_id}
    if body.background:
        return _background(request, plan, first, agen, headers)
    if not body.stream:
        try:
            async with contextlib.aclosing(agen):
                return await _blocking(agen, plan, headers)
        finally:
            await _scrap(svc, plan, first.conversation_id)
    return EventStream(_sse(agen, plan, first, svc), headers)


def _failure_of(exc: ThreadlineError) -> OpenAIError:
    if isinstance(exc, PreviousResponseNotFoundError):
        return OpenAIError(400, exc.message, "invalid_request_error", exc.code, param=exc.param)
    return _from_tl(exc)


def _failure(ev: TurnFailed, scratch: bool = False) -> OpenAIError:
    err = _failure_of(ev.error) if isinstance(ev.error, ThreadlineError) else OpenAIError(
        500, "Internal error", "api_error", "internal_error")
    if not scratch:
        err.headers["X-Threadline-Conversation-Id"] = ev.reply.conversation_id
    return err


async def _scrap(svc: ConversationService, plan: _Plan, conversation_id: str) -> None:
    """A store: false response leaves nothing behind, whatever way it ended."""
    if plan.scratch:
        with contextlib.suppress(ThreadlineError):
            await asyncio.shield(svc.purge(plan.scope, conversation_id))


async def _blocking(agen: AsyncGenerator[TurnEvent, None], plan: _Plan, headers: dict[str, str]) -> Response:
    async for ev in agen:
        if isinstance(ev, TurnFailed):
            raise _failure(ev, plan.scratch)
        if isinstance(ev, TurnCompleted):
            return Response(orjson.dumps(_reply_response(ev.reply, plan.echo)), media_type="application/json",
                            headers=headers)
    raise OpenAIError(500, "Internal error", "api_error")


class _Events:
    """The semantic stream of one response: a rising sequence number, one id per item across all
    its events, each event one write (on SSE its `event:` and `data:` lines together; on a
    WebSocket one text frame of its JSON)."""

    def __init__(self, message_id: str, echo: dict[str, Any], created_at: float, *, ws: bool = False) -> None:
        self.ws = ws  # a WebSocket frame is the event's JSON alone
        self.final: dict[str, Any] | None = None  # the terminal event's response, once sent
        self.seq = 0
        self.h = _hex(message_id)
        self.message_id = message_id
        self.echo = echo
        self.created_at = created_at
        self.output: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the text or reasoning item receiving deltas
        self.calls: dict[int, dict[str, Any]] = {}  # delta index -> its function_call item
        self.steps_done: set[str] = set()
        self.texts = 0

    def ev(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, **fields, "sequence_number": self.seq}
        self.seq += 1
        if self.ws:
            return orjson.dumps(data)
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

    def error(self, status: int, code: str, message: str) -> bytes:
        """The error event before response.failed: flat on SSE (OpenAI's), nested with its status on
        a WebSocket (every WebSocket error has that shape)."""
        if self.ws:
            return self.ev("error", status=status, error={"type": error_type(status), "code": code, "message": message,
                                                          "param": None})
        return self.ev("error", code=code, message=message, param=None)

    def snapshot(self, status: str = "streaming") -> dict[str, Any]:
        return response_object(message_id=self.message_id, created_at=self.created_at, status=status,
                               finish_reason=None, output=[], usage=None, error=None, echo=self.echo)

    def add(self, item: dict[str, Any]) -> bytes:
        self.output.append(item)
        return self.ev("response.output_item.added", output_index=len(self.output) - 1, item=item)

    def close(self) -> list[bytes]:
        item, self.open = self.open, None
        if item is None:
            return []
        idx = self.output.index(item)
        if item["type"] == "message":
            part = item["content"][0]
            item["status"] = "completed"
            return [self.ev("response.output_text.done", item_id=item["id"], output_index=idx, content_index=0,
                            text=part["text"], logprobs=[]),
                    self.ev("response.content_part.done", item_id=item["id"], output_index=idx, content_index=0,
                            part=part),
                    self.ev("response.output_item.done", output_index=idx, item=item)]
        part = item["content"][0]
        item["status"] = "completed"
        return [self.ev("response.reasoning_text.done", item_id=item["id"], output_index=idx, content_index=0,
                        text=part["text"]),
                self.ev("response.content_part.done", item_id=item["id"], output_index=idx, content_index=0,
                        part=part),
                self.ev("response.output_item.done", output_index=idx, item=item)]

    def text(self, kind: str, delta: str) -> list[bytes]:
        out: list[bytes] = []
        if self.open is None or self.open["type"] != kind:
            out += self.close()
            if kind == "message":
                self.texts += 1
                item_id = f"msg_{self.h}" if self.texts == 1 else f"msg_{self.h}_{self.texts}"
                item: dict[str, Any] = {"id": item_id, "type": "message", "status": "in_progress", "role": "assistant",
                                        "content": []}
                part: dict[str, Any] = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            else:
                n = sum(1 for o in self.output if o["type"] == "reasoning")
                item_id = f"rs_{self.h}" if n == 0 else f"rs_{self.h}_{n + 1}"
                item = {"id": item_id, "type": "reasoning", "status": "in_progress", "summary": [], "content": []}
                part = {"type": "reasoning_text", "text": ""}
            out.append(self.add(item))
            item["content"].append(part)
            out.append(self.ev("response.content_part.added", item_id=item_id, output_index=len(self.output) - 1,
                               content_index=0, part=dict(part)))
            self.open = item
        item = self.open
        idx = len(self.output) - 1 if self.output[-1] is item else self.output.index(item)
        item["content"][0]["text"] += delta
        name = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        extra: dict[str, Any] = {"logprobs": []} if kind == "message" else {}
        out.append(self.ev(name, item_id=item["id"], output_index=idx, content_index=0, delta=delta, **extra))
        return out

    def call(self, d: ToolCallDelta) -> list[bytes]:
        out: list[bytes] = []
        item = self.calls.get(d.index)
        if item is None:
            out += self.close()
            item = {"id": f"fc_{self.h}_{len(self.calls)}", "type": "function_call", "status": "in_progress",
                    "call_id": d.call_id or f"call_{d.index}", "name": d.name or "", "arguments": ""}
            self.calls[d.index] = item
            out.append(self.add(item))
        if d.arguments:
            item["arguments"] += d.arguments
            out.append(self.ev("response.function_call_arguments.delta", item_id=item["id"],
                               output_index=self.output.index(item), delta=d.arguments))
        return out

    def step(self, s: AgentStep) -> list[bytes]:
        """A Dify agent step, once its tool has answered: its calls and outputs as done items."""
        if not s.results or s.id in self.steps_done:
            return []
        self.steps_done.add(s.id)
        out = self.close()
        j = len(self.steps_done) - 1
        for item in _step_items(self.h, [s]):
            item["id"] = item["id"].replace("_s0_", f"_s{j}_", 1)
            out.append(self.add(item))
            out.append(self.ev("response.output_item.done", output_index=len(self.output) - 1, item=item))
        return out

    def finish(self, reply: Reply) -> list[bytes]:
        out = self.close()
        final = {c.call_id: c for c in reply.tool_calls}
        for item in self.calls.values():
            c = final.get(item["call_id"])
            if c is not None:
                item["arguments"], item["name"] = c.arguments, c.name
            item["status"] = "completed" if reply.status == "completed" else "incomplete"
            idx = self.output.index(item)
            out.append(self.ev("response.function_call_arguments.done", item_id=item["id"], output_index=idx,
                               name=item["name"], arguments=item["arguments"]))
            out.append(self.ev("response.output_item.done", output_index=idx, item=item))
        if not self.output and reply.status == "completed":  # an empty answer still has its message
            out += self.text("message", "")
            out += self.close()
        return out


async def _stream(agen: AsyncGenerator[TurnEvent, None], plan: _Plan, first: TurnStarted, events: _Events,
                  svc: ConversationService, *, tail: bytes | None = None,
                  scrap: bool = True) -> AsyncGenerator[bytes, None]:
    """One response's semantic events, framed for its transport by `events` (SSE or WebSocket), then
    `tail`. The turn is closed however the stream ends (a caller that left has its partial answer
    stored as stopped); `scrap` removes a store: false response's conversation then (the WebSocket
    route keeps it for its connection's cache instead)."""
    yield events.ev("response.created", response=events.snapshot())
    yield events.ev("response.in_progress", response=events.snapshot())
    try:
        async for ev in agen:
            if isinstance(ev, TextDelta):
                for b in events.text("message", ev.text):
                    yield b
            elif isinstance(ev, ReasoningDelta):
                for b in events.text("reasoning", ev.text):
                    yield b
            elif isinstance(ev, ToolCallDelta):
                for b in events.call(ev):
                    yield b
            elif isinstance(ev, AgentStep):
                for b in events.step(ev):
                    yield b
            elif isinstance(ev, TurnCompleted | TurnFailed):
                for b in events.finish(ev.reply):
                    yield b
                resp = _reply_response(ev.reply, plan.echo, events.output)
                kind = {"completed": "response.completed", "failed": "response.failed"}.get(
                    resp["status"], "response.incomplete")
                if isinstance(ev, TurnFailed):
                    err = resp["error"]
                    yield events.error(int((ev.reply.error or {}).get("status") or 500),
                                       err["code"] if err else "server_error",
                                       err["message"] if err else "Internal error")
                events.final = resp
                yield events.ev(kind, response=resp)
    finally:
        await agen.aclose()
        if scrap:
            await _scrap(svc, plan, first.conversation_id)
    if tail is not None:
        yield tail


def _sse(agen: AsyncGenerator[TurnEvent, None], plan: _Plan, first: TurnStarted,
         svc: ConversationService) -> AsyncIterator[bytes]:
    return _stream(agen, plan, first, _Events(first.message_id, plan.echo, first.created_at), svc,
                   tail=b"data: [DONE]\n\n")


def _background(request: Request, plan: _Plan, first: TurnStarted, agen: AsyncGenerator[TurnEvent, None],
                headers: dict[str, str]) -> Response:
    """Answer now (in_progress) and let the turn run on: its partial answer is flushed to the store
    as it grows, GET reads it, /cancel stops it."""
    async def run() -> None:
        async with contextlib.aclosing(agen):
            async for _ in agen:
                pass

    tasks: set[asyncio.Task[None]] = state(request).background
    task = asyncio.get_running_loop().create_task(run())
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    events = _Events(first.message_id, plan.echo, first.created_at)
    return Response(orjson.dumps(events.snapshot()), media_type="application/json", headers=headers)


# ---- stored responses ----------------------------------------------------------------------------

async def _stored(request: Request) -> tuple[Scope, dict[str, Any]]:
    caller = await _auth(request)
    rid = request.path_params["response_id"]
    mid = message_of_response(rid)
    try:
        if mid is None:
            raise NotFoundError("no such response")
        scope, row = await state(request).service.answer_in_app(caller.app.name, mid)
        if (row.get("response") or {}).get("deleted") or _unstored(row):
            raise NotFoundError("deleted")
    except NotFoundError:
        raise OpenAIError(404, f"Response with id '{rid}' not found.", "invalid_request_error", "not_found",
                          param="response_id") from None
    return scope, row


async def retrieve(request: Request) -> Response:
    try:
        if request.query_params.get("stream") in ("true", "1"):
            raise _unsupported("Streaming a stored response again is not supported: retrieve it without 'stream'.",
                               "stream")
        _, row = await _stored(request)
    except OpenAIError as exc:
        return openai_error(exc)
    return Response(orjson.dumps(stored_response(row)), media_type="application/json")


async def delete(request: Request) -> Response:
    """The response is gone for retrieve and previous_response_id; its items stay in the conversation
    (later responses were built on them, as OpenAI keeps a conversation's items)."""
    try:
        scope, row = await _stored(request)
        if row["status"] == "streaming":
            raise _bad("This response is still running: cancel it first.", "response_id", "invalid_request")
        await state(request).service.set_response(scope, row["id"], {**_stored_echo(row), "deleted": True})
    except OpenAIError as exc:
        return openai_error(exc)
    return Response(orjson.dumps({"id": response_id(row["id"]), "object": "response.deleted", "deleted": True}),
                    media_type="application/json")


async def cancel(request: Request) -> Response:
    """Stop a running response; it keeps what it produced (status cancelled), as a stopped Dify turn."""
    try:
        scope, row = await _stored(request)
        svc = state(request).service
        if row["status"] == "streaming" and row.get("task_id"):
            await svc.stop(scope, row["task_id"])
            _, row = await svc.answer_in_app(scope.own_app, row["id"])
        elif row["status"] != "stopped":
            raise _bad(f"Response '{response_id(row['id'])}' is not running: only a running response can be "
                       "cancelled.", "response_id", "invalid_request")
    except OpenAIError as exc:
        return openai_error(exc)
    return Response(orjson.dumps(stored_response(row)), media_type="application/json")


async def list_input_items(request: Request) -> Response:
    try:
        try:
            q = InputItemsQuery.model_validate({**request.query_params, "include": request.query_params.getlist(
                "include") or None})
        except ValidationError as exc:
            raise _invalid(exc) from None
        scope, row = await _stored(request)
        question = await state(request).service.question_of(scope, row)
        items = input_items(question) if question is not None else []
        page = _page(items, q.after, q.limit, q.order)
    except OpenAIError as exc:
        return openai_error(exc)
    return Response(orjson.dumps(page), media_type="application/json")


def _page(items: list[dict[str, Any]], after: str | None, limit: int, order: str) -> dict[str, Any]:
    """One cursor page of items (oldest first in `items`)."""
    seq = items[::-1] if order == "desc" else list(items)
    if after is not None:
        at = next((i for i, it in enumerate(seq) if it["id"] == after), None)
        if at is None:
            raise OpenAIError(404, f"Item with id '{after}' not found.", "invalid_request_error", "not_found",
                              param="after")
        seq = seq[at + 1:]
    data = seq[:limit]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(seq) > limit}


async def input_tokens(request: Request) -> Response:
    """An estimate of what `create` with the same context would send: the history it continues
    (each stored message's counted tokens), system text, tools and the new input."""
    try:
        caller, body = await _read(request, InputTokensRequest)
        gw = state(request).gateway
        svc = state(request).service
        app_cfg = caller.app
        if body.model:
            app_cfg, _ = resolve_model(gw, caller.app, body.model)
        if body.previous_response_id and body.conversation:
            raise _bad("'previous_response_id' and 'conversation' cannot be used together.", "previous_response_id",
                       "invalid_request")
        inp = _read_input(body.input, gw.settings.server.max_text_chars) if body.input else _Input()
        tools, _ = _tools(body)
        rows: list[dict[str, Any]] = []
        try:
            if body.previous_response_id:
                scope, prev = await _previous(svc, app_cfg.name, body.previous_response_id)
                rows = await svc.branch_rows(scope, prev["conversation_id"], prev["id"])
            elif body.conversation is not None:
                scope, cid = await _named_conversation(svc, app_cfg.name, body.conversation)
                rows = await svc.branch_rows(scope, cid)
        except PreviousResponseNotFoundError as exc:
            raise _failure_of(exc) from None
        except NotFoundError as exc:
            raise OpenAIError(404, exc.message, "invalid_request_error", "not_found", param="conversation") from None
        n = sum(int(r.get("token_estimate") or 0) for r in rows)
        n += sum(estimate_text(s) for s in [*app_cfg.system, body.instructions or "", *inp.system])
        n += sum(estimate_text(m.text) + 4 for m in inp.history) + estimate_text(inp.text) + 4
        n += sum(estimate_text(r.output) for r in inp.results) + 85 * len(inp.images)
        n += sum(estimate_text(orjson.dumps(t.parameters or {}).decode()) + estimate_text(t.name) for t in tools)
    except OpenAIError as exc:
        return openai_error(exc)
    return Response(orjson.dumps({"object": "response.input_tokens", "input_tokens": n}),
                    media_type="application/json")


operations = [
    Operation("POST", "/v1/responses", create, "Create a response (OpenAI Responses API) over any engine of the app",
              surface="openai", body=ResponseCreateRequest, response=ResponseObject, stream=True,
              tags=("OpenAI Responses",)),
    Operation("POST", "/v1/responses/compact", compact, "Compact a context: an engine's summary stands in for it "
              "(the next chain starts with the compaction item)", surface="openai", body=CompactRequest,
              response=CompactedResponse, tags=("OpenAI Responses",)),
    Operation("POST", "/v1/responses/input_tokens", input_tokens, "Count the input tokens a response would send",
              surface="openai", body=InputTokensRequest, response=InputTokens, tags=("OpenAI Responses",)),
    Operation("GET", "/v1/responses/{response_id}", retrieve, "A stored response", surface="openai",
              response=ResponseObject, tags=("OpenAI Responses",)),
    Operation("DELETE", "/v1/responses/{response_id}", delete, "Delete a stored response (its items stay in the "
              "conversation)", surface="openai", response=ResponseDeleted, tags=("OpenAI Responses",)),
    Operation("POST", "/v1/responses/{response_id}/cancel", cancel, "Stop a running response; it keeps its partial "
              "output", surface="openai", response=ResponseObject, tags=("OpenAI Responses",)),
    Operation("GET", "/v1/responses/{response_id}/input_items", list_input_items, "The input items of a response",
              surface="openai", query=InputItemsQuery, response=InputItemList, tags=("OpenAI Responses",)),
]

__all__ = ["CONVERSATION_HEADER", "conversation_of", "conversation_ref", "operations", "output_items",
           "response_id", "stored_response"]
