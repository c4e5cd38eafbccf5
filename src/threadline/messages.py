"""The neutral message model every engine and surface speaks: parts, roles, usage and stream events.

Engines translate these to and from wire formats; the gateway stores them; surfaces render them.
Nothing here knows a provider.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "image"}
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
        return cls(url=d.get("url"), file_id=d.get("file_id"), mime_type=d.get("mime_type"), name=d.get("name"))


@dataclass(slots=True)
class ChatMessage:
    """One message as an engine sees it: text plus images; reasoning only when a profile replays it."""

    role: Role
    text: str
    # Most messages carry no image: they share the empty tuple instead of each holding an empty list.
    images: Sequence[ImagePart] = ()
    reasoning: str | None = None


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
# AnswerReplaced, then Finished (only when the answer really ended: a stream cut short raises).
# The gateway adds TurnStarted first (once the engine accepted) and TurnCompleted or TurnFailed last;
# a turn that fails before its engine accepted yields TurnFailed alone.


@dataclass(slots=True)
class TextDelta:
    text: str


@dataclass(slots=True)
class ReasoningDelta:
    text: str


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


@dataclass(slots=True)
class TurnCompleted:
    """The final event of a stream; carries the reply (status completed or stopped)."""

    reply: Reply


@dataclass(slots=True)
class TurnFailed:
    """The final event of a failed stream; the partial answer is stored with status failed."""

    reply: Reply
    error: Exception


EngineEvent = TextDelta | ReasoningDelta | AnswerReplaced | UsageReport | RemoteState | Finished | UpstreamAccepted
TurnEvent = TurnStarted | TextDelta | ReasoningDelta | AnswerReplaced | UsageReport | TurnCompleted | TurnFailed
