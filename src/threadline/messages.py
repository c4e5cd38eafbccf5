"""The neutral message model every engine and surface speaks: parts, roles, usage and stream events.

Engines translate these to and from wire formats; the gateway stores them; surfaces render them.
Nothing here knows a provider.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

Role = Literal["system", "user", "assistant"]


@dataclass(slots=True)
class ImagePart:
    """An image by URL (http(s) or data:) or by an uploaded file id held in Threadline's store."""

    url: str | None = None
    file_id: str | None = None
    mime_type: str | None = None
    # Filled by the gateway for uploaded files so engines never touch the store.
    data: bytes | None = None
    name: str | None = None
    # The caller's resolution hint (OpenAI's low | high | auto): sent where the engine's wire has it
    # (OpenAI-compatible); others pick their own resolution.
    detail: str | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "image"}
        if self.detail:
            d["detail"] = self.detail
        if self.url:
            d["url"] = self.url
        if self.file_id:
            d["file_id"] = self.file_id
        if self.mime_type:
            d["mime_type"] = self.mime_type
        if self.name:
            d["name"] = self.name
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ImagePart:
        return cls(url=d.get("url"), file_id=d.get("file_id"), mime_type=d.get("mime_type"), name=d.get("name"),
                   detail=d.get("detail"))


@dataclass(slots=True, frozen=True)
class FunctionCall:
    """The model asked to call a caller-defined function. `arguments` is the JSON text as the model
    wrote it (callers parse it; a model may write invalid JSON and the caller must see that).
    `provider`/`signature`: opaque state one provider needs back with this call (Gemini's
    `thoughtSignature`); it goes back to an engine of that provider kind only, never to another."""

    call_id: str
    name: str
    arguments: str = "{}"
    provider: str | None = None
    signature: str | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "function_call", "call_id": self.call_id, "name": self.name,
                             "arguments": self.arguments}
        if self.provider and self.signature:
            d["provider"], d["signature"] = self.provider, self.signature
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FunctionCall:
        return cls(str(d["call_id"]), str(d["name"]), str(d.get("arguments") or "{}"), d.get("provider"),
                   d.get("signature"))


@dataclass(slots=True, frozen=True)
class FunctionResult:
    """The caller's answer to a FunctionCall: `output` is the text the function returned. `name` is
    the called function's (Gemini matches responses by name); filled from the call when known."""

    call_id: str
    output: str
    name: str | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "function_result", "call_id": self.call_id, "output": self.output}
        if self.name:
            d["name"] = self.name
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FunctionResult:
        return cls(str(d["call_id"]), str(d.get("output") or ""), d.get("name"))


@dataclass(slots=True, frozen=True)
class ReasoningState:
    """Opaque reasoning state a provider wants back on the next request (an encrypted reasoning
    item, a signature). Replayed to engines of `provider` kind only; the readable reasoning text
    lives beside the message, never here."""

    provider: str
    data: str

    def to_json(self) -> dict[str, Any]:
        return {"type": "reasoning_state", "provider": self.provider, "data": self.data}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ReasoningState:
        return cls(str(d["provider"]), str(d["data"]))


@dataclass(slots=True, frozen=True)
class AgentStep:
    """One step of an engine's OWN agent (a Dify agent app's `agent_thought`): what it thought, the
    tools it ran itself (`calls`) and what they returned (`results`). These are no caller-defined
    function calls: the engine already ran them, so they never become `Reply.tool_calls` and are
    never replayed to an engine as calls to answer; history tells them in words (context.py).

    It is both an engine event (a step as it grows: the same `id` again replaces the step so far)
    and the stored item of the answer it belongs to. `position` counts steps from 1; `files`: ids
    of files the step produced; `tool_labels`: display names per tool, as the engine gave them."""

    id: str
    position: int = 1
    thought: str = ""
    calls: tuple[FunctionCall, ...] = ()
    results: tuple[FunctionResult, ...] = ()
    tool_labels: dict[str, Any] = field(default_factory=dict)
    files: tuple[str, ...] = ()
    created_at: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"type": "agent_step", "id": self.id, "position": self.position, "thought": self.thought,
                "calls": [c.to_json() for c in self.calls], "results": [r.to_json() for r in self.results],
                "tool_labels": self.tool_labels, "files": list(self.files), "created_at": self.created_at}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> AgentStep:
        return cls(str(d["id"]), int(d.get("position") or 1), str(d.get("thought") or ""),
                   tuple(FunctionCall.from_json(c) for c in d.get("calls") or ()),
                   tuple(FunctionResult.from_json(r) for r in d.get("results") or ()),
                   dict(d.get("tool_labels") or {}), tuple(str(f) for f in d.get("files") or ()),
                   int(d.get("created_at") or 0))


Item = ImagePart | FunctionCall | FunctionResult | ReasoningState | AgentStep
_ITEM_TYPES: dict[str, Any] = {"image": ImagePart, "function_call": FunctionCall, "function_result": FunctionResult,
                               "reasoning_state": ReasoningState, "agent_step": AgentStep}


def items_to_json(items: Sequence[Item]) -> list[dict[str, Any]] | None:
    """The `parts` column: every non-text item of a message, typed; None for a plain text message."""
    return [i.to_json() for i in items] or None


def items_from_json(parts: Sequence[dict[str, Any]] | None) -> list[Item]:
    out: list[Item] = []
    for p in parts or ():
        cls = _ITEM_TYPES.get(p.get("type", ""))
        if cls is not None:
            out.append(cls.from_json(p))
    return out


@dataclass(slots=True)
class ChatMessage:
    """One message as an engine sees it. Roles alternate user/assistant: a user message may carry
    images and the results of the previous answer's function calls; an assistant message may carry
    function calls and opaque reasoning state. Reasoning text only when a profile replays it.
    An engine's own agent steps (AgentStep) are no part of it: context.py tells them in the text."""

    role: Role
    text: str
    # Most messages carry no image: they share the empty tuple instead of each holding an empty list.
    images: Sequence[ImagePart] = ()
    reasoning: str | None = None
    calls: Sequence[FunctionCall] = ()
    results: Sequence[FunctionResult] = ()
    states: Sequence[ReasoningState] = ()

    @classmethod
    def from_items(cls, role: Role, text: str, items: Sequence[Item], reasoning: str | None = None) -> ChatMessage:
        if not items:
            return cls(role, text, reasoning=reasoning)
        return cls(role, text, [i for i in items if isinstance(i, ImagePart)], reasoning,
                   [i for i in items if isinstance(i, FunctionCall)],
                   [i for i in items if isinstance(i, FunctionResult)],
                   [i for i in items if isinstance(i, ReasoningState)])

    @property
    def items(self) -> list[Item]:
        return [*self.images, *self.results, *self.calls, *self.states]


# ---- what a caller asks of a turn beyond its messages --------------------------------------------


@dataclass(slots=True, frozen=True)
class ToolSpec:
    """A function the model may call: name, description, JSON-schema parameters."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


@dataclass(slots=True, frozen=True)
class ToolChoice:
    """auto | none | required, or one named function (mode "function")."""

    mode: Literal["auto", "none", "required", "function"] = "auto"
    name: str | None = None


@dataclass(slots=True, frozen=True)
class ResponseFormat:
    """text | json_object | json_schema (with its schema, name, strictness and description: what the
    format is for, a hint to the model)."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    schema: dict[str, Any] | None = None
    name: str | None = None
    strict: bool | None = None
    description: str | None = None


@dataclass(slots=True, frozen=True)
class GenerationParams:
    """Sampling and output parameters a caller set. None means "not set": the engine's own default
    applies and nothing is sent. An engine refuses (400) a set field it cannot honour."""

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    response_format: ResponseFormat | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = None

    def set_fields(self) -> list[str]:
        if self == NO_PARAMS:  # the usual turn sets none: one comparison instead of ten lookups
            return []
        return [name for name in _PARAM_FIELDS if getattr(self, name) is not None]


NO_PARAMS = GenerationParams()
_PARAM_FIELDS = tuple(f.name for f in fields(GenerationParams))


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    estimated: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "cached_tokens": self.cached_tokens,
            "estimated": self.estimated,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> Usage:
        d = d or {}
        return cls(
            prompt_tokens=int(d.get("prompt_tokens") or 0),
            completion_tokens=int(d.get("completion_tokens") or 0),
            total_tokens=int(d.get("total_tokens") or 0),
            reasoning_tokens=int(d.get("reasoning_tokens") or 0),
            cached_tokens=int(d.get("cached_tokens") or 0),
            estimated=bool(d.get("estimated", False)),
        )


# ---- stream events -------------------------------------------------------------------------------
# Engines yield UpstreamAccepted, then TextDelta / ReasoningDelta / UsageReport / RemoteState /
# AnswerReplaced / AgentStep, then Finished (only when the answer really ended: a stream cut short raises).
# The gateway adds TurnStarted first (once the engine accepted) and TurnCompleted or TurnFailed last;
# a turn that fails before its engine accepted yields TurnFailed alone.


@dataclass(slots=True)
class TextDelta:
    text: str


@dataclass(slots=True)
class ReasoningDelta:
    text: str


@dataclass(slots=True)
class ToolCallDelta:
    """A piece of a function call as it streams: `index` tells calls apart; `call_id` and `name`
    come with a call's first piece, `arguments` grows. `signature`: Gemini's thoughtSignature."""

    index: int
    call_id: str | None = None
    name: str | None = None
    arguments: str = ""
    signature: str | None = None


@dataclass(slots=True)
class StateReport:
    """Opaque reasoning state to keep with the answer and send back to the same provider only."""

    state: ReasoningState


@dataclass(slots=True)
class AnswerReplaced:
    """Dify's message_replace (output moderation): the whole answer so far is replaced."""

    text: str
    reason: str | None = None


@dataclass(slots=True)
class UsageReport:
    usage: Usage
    price: dict[str, Any] | None = None


@dataclass(slots=True)
class RemoteState:
    """A stateful engine tells the gateway its own ids (conversation, message, task)."""

    conversation_id: str | None = None
    message_id: str | None = None
    task_id: str | None = None


@dataclass(slots=True)
class Finished:
    finish_reason: str | None = None


@dataclass(slots=True)
class UpstreamAccepted:
    """The engine's upstream answered 2xx and the answer is on its way. Until this (or the first
    delta) the turn can still fail with the upstream's own status (a 429 with its Retry-After, a 400
    for a bad request), so surfaces wait for it before they commit to a 200 and a stream."""


@dataclass(slots=True)
class TurnStarted:
    conversation_id: str
    message_id: str
    user_message_id: str
    task_id: str
    engine: str
    created_at: float


@dataclass(slots=True)
class Reply:
    """The outcome of one turn, as the pinned Python API returns it."""

    answer: str
    reasoning: str | None
    conversation_id: str
    message_id: str
    user_message_id: str
    task_id: str
    usage: Usage
    status: str
    engine: str
    model: str
    created_at: float
    latency: float = 0.0
    price: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    time_to_first_token: float = 0.0
    tool_calls: list[FunctionCall] = field(default_factory=list)
    # The engine's own agent steps (a Dify agent app's tool runs): already done, nothing to answer.
    steps: list[AgentStep] = field(default_factory=list)
    # What the engine reported: stop | length | tool_calls | content_filter; a stopped turn is "stop".
    finish_reason: str | None = None


@dataclass(slots=True)
class TurnCompleted:
    """The final event of a stream; carries the reply (status completed or stopped)."""

    reply: Reply


@dataclass(slots=True)
class TurnFailed:
    """The final event of a failed stream; the partial answer is stored with status failed."""

    reply: Reply
    error: Exception


EngineEvent = (TextDelta | ReasoningDelta | ToolCallDelta | StateReport | AnswerReplaced | UsageReport | RemoteState
               | Finished | UpstreamAccepted | AgentStep)
TurnEvent = (TurnStarted | TextDelta | ReasoningDelta | ToolCallDelta | AnswerReplaced | UsageReport | TurnCompleted
             | TurnFailed | AgentStep)
