"""The turn as objects: one frozen request every surface builds once, and one accumulator that
applies the engine's events and yields what is stored and rendered.

Before this module `Gateway.turn` took fifteen keyword arguments and the run loop kept the answer
in six local variables handed on to a fourteen-parameter `_finish`; adding tool calls would have
added five more to each. Now a surface fills a `TurnRequest` (its query or tool results, tools,
parameters, engine, conversation) and the gateway hands that one object down, as pydantic-ai hands
one `ModelRequestParameters` to a model; `Turn` plays `StreamedResponse`: it owns the answer,
reasoning, tool calls, usage and finish reason as events arrive.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .messages import (
    NO_PARAMS,
    AgentStep,
    FunctionCall,
    FunctionResult,
    GenerationParams,
    ImagePart,
    Item,
    ReasoningState,
    RemoteState,
    ToolCallDelta,
    ToolChoice,
    ToolSpec,
    Usage,
    items_from_json,
)


@dataclass(slots=True, frozen=True)
class PastMessage:
    """A message a caller already had (an OpenAI client's message list): role, text and items."""

    role: Literal["user", "assistant"]
    text: str = ""
    items: tuple[Item, ...] = ()


@dataclass(slots=True, frozen=True)
class TurnRequest:
    """Everything one turn asks, built once by a surface.

    The new input is `text` plus `images`/`files` (uploaded file ids), or `results`: the caller's
    answers to the function calls of the conversation's newest answer (then `text` may be empty).
    `parent_id`: see the field. `history`: messages the caller already had, stored as a new conversation this turn continues
    when no `conversation_id` is given (and only once the turn is admitted)."""

    user: str
    text: str = ""
    app: str | None = None
    conversation_id: str | None = None
    # Continue from this answer of the conversation instead of its newest message (regenerate,
    # edit-and-resend, go on from an older point): the turn starts a branch. store.ROOT_PARENT:
    # from the very beginning. The branch being continued is what an engine is sent.
    parent_id: str | None = None
    engine: str | None = None
    images: tuple[str | ImagePart, ...] = ()
    files: tuple[str, ...] = ()
    results: tuple[FunctionResult, ...] = ()
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: ToolChoice | None = None
    params: GenerationParams = NO_PARAMS
    stream: bool = True
    instructions: tuple[str, ...] = ()  # system text for this turn only (an OpenAI client's system messages)
    inputs: dict[str, Any] = field(default_factory=dict)
    workflow_id: str | None = None
    auto_generate_name: bool = True
    key_id: str | None = None
    history: tuple[PastMessage, ...] = ()
    # "disabled": refuse a conversation that does not fit the engine's context instead of packing
    # the newest history that fits (the Responses API's `truncation`).
    truncation: Literal["auto", "disabled"] = "auto"
    # Stored with the answer: what a Responses API request asked (the fields its Response echoes).
    response: dict[str, Any] | None = None
    # A new conversation made for a store: false response (conversations.scratch): removed after it.
    scratch: bool = False


class Turn:
    """Accumulates one answer from engine events: text, reasoning, tool calls, opaque state, the
    engine's own agent steps, usage, price, remote ids and the finish reason the engine reported."""

    __slots__ = ("_steps", "answer", "calls", "finish_reason", "price", "reasoning", "remote", "states", "usage")

    def __init__(self) -> None:
        self.answer: list[str] = []
        self.reasoning: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.states: list[ReasoningState] = []
        self._steps: dict[str, AgentStep] = {}
        self.usage: Usage | None = None
        self.price: dict[str, Any] | None = None
        self.remote = RemoteState()
        self.finish_reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.answer)

    @property
    def reasoning_text(self) -> str | None:
        return "".join(self.reasoning) or None

    def note_remote(self, ev: RemoteState) -> str | None:
        """Keep the remote ids an engine reported; returns its task id when this event names one."""
        remote = self.remote
        remote.conversation_id = ev.conversation_id or remote.conversation_id
        remote.message_id = ev.message_id or remote.message_id
        if ev.task_id:
            remote.task_id = ev.task_id
        return ev.task_id

    def add_call(self, d: ToolCallDelta) -> None:
        c = self.calls.get(d.index)
        if c is None:
            c = self.calls[d.index] = {"call_id": None, "name": None, "arguments": [], "signature": None}
        c["call_id"] = c["call_id"] or d.call_id
        c["name"] = c["name"] or d.name
        c["signature"] = c["signature"] or d.signature
        if d.arguments:
            c["arguments"].append(d.arguments)

    def add_step(self, step: AgentStep) -> None:
        """A step as it grows: the same id again replaces it (Dify resends a thought whole)."""
        self._steps[step.id] = step

    @property
    def has_steps(self) -> bool:
        return bool(self._steps)

    @property
    def steps(self) -> list[AgentStep]:
        """The agent steps in the order they began."""
        return list(self._steps.values())

    def tool_calls(self, provider: str) -> list[FunctionCall]:
        """The complete calls, in index order; a call whose id the engine never sent gets one."""
        out = []
        for i in sorted(self.calls):
            c = self.calls[i]
            if not c["name"]:
                continue
            out.append(FunctionCall(c["call_id"] or f"call_{i}", c["name"], "".join(c["arguments"]) or "{}",
                                    provider if c["signature"] else None, c["signature"]))
        return out

    def items(self, provider: str) -> list[Item]:
        return [*self.tool_calls(provider), *self.states]



def history_hash(prev: str, role: str, text: str, items: Sequence[Item]) -> str:
    """The running digest of a conversation's messages, one message more: what an OpenAI client's
    resent history is matched with, through an index (conversations.history_hash) instead of a
    scan of the newest conversations. A message counts by its role, its text (stripped, as clients
    resend it) and its function call/result ids; images and reasoning do not (clients drop them)."""
    ids = ",".join(i.call_id for i in items if isinstance(i, FunctionCall | FunctionResult)) if items else ""
    return hashlib.blake2b(f"{prev}\x00{role}\x00{ids}\x00{text.strip()}".encode(), digest_size=16).hexdigest()


def counted_hash(count: int, digest: str) -> str:
    """What conversations.history_hash holds: how many messages the digest covers, and the digest."""
    return f"{count}:{digest}"


def rows_hash(rows: Iterable[dict[str, Any]], prev: str = "") -> str:
    """history_hash over stored message rows (oldest first)."""
    for r in rows:
        prev = history_hash(prev, r["role"], r.get("content") or "", items_from_json(r.get("parts")))
    return prev
