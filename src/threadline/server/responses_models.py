"""Bodies of the OpenAI Responses and Conversations routes, as pydantic models, so /openapi.json
describes them and a field no engine can honour is refused by name instead of dropped.

Input and output items stay plain JSON objects in the schema (their union has a dozen shapes that
the route reads one by one, with OpenAI's own parameter paths in its errors: `input[2].call_id`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Doc(BaseModel):
    model_config = ConfigDict(extra="allow")


class ConversationRef(_Closed):
    id: str


class TextFormat(_Closed):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextConfig(_Closed):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = Field(
        None, description="Only medium (every engine's only setting); others are refused.")


class ReasoningConfig(_Closed):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = Field(
        None, description="Accepted; the engine's own reasoning text comes back as `reasoning_text` content.")
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class StreamOptions(_Closed):
    include_obfuscation: bool | None = Field(None, description="Accepted: Threadline never pads deltas.")


class ResponseCreateRequest(_Closed):
    """POST /v1/responses. `model` names the key's app or an engine that app may use. `input` is a
    string or a list of items (messages with input_text / input_image parts, function_call,
    function_call_output, reasoning). Every field is honoured over every engine or refused with a
    400 naming it."""

    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]] = Field(description="A string (one user message) or input items.")
    instructions: str | None = Field(None, description="System text for this response only (not carried on).")
    previous_response_id: str | None = None
    conversation: str | ConversationRef | None = Field(
        None, description="A conversation id (`conv_…`, or the conversation id any other surface shows).")
    store: bool | None = Field(None, description="Default true. False: answered, then removed for good.")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    background: bool | None = Field(None, description="Run on after the answer: poll with GET, stop with /cancel.")
    tools: list[dict[str, Any]] | None = Field(None, description="Function tools (`{type: function, name, "
                                                                 "parameters, strict}`); other types are refused.")
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    max_tool_calls: int | None = Field(None, ge=1, description="Accepted: it caps built-in tools, which never run.")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Only 0: log probabilities are not relayed.")
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    truncation: Literal["auto", "disabled"] | None = Field(
        None, description="auto (Threadline's default): the newest history that fits the engine's context; "
                          "disabled: a conversation that does not fit is refused.")
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    include: list[str] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    service_tier: str | None = None


class InputTokensRequest(_Closed):
    """POST /v1/responses/input_tokens: the context fields of a create request."""

    model: str | None = None
    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    conversation: str | ConversationRef | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    truncation: Literal["auto", "disabled"] | None = None


class CompactRequest(_Closed):
    """POST /v1/responses/compact: what to compact — a stored chain (`previous_response_id`), a
    conversation, or the given `input` items (a client that keeps its own window)."""

    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = Field(None, description="Refused: instructions belong to each response.")
    previous_response_id: str | None = None
    conversation: str | ConversationRef | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None


class CompactedResponse(_Doc):
    id: str
    object: Literal["response.compaction"]
    created_at: int
    output: list[dict[str, Any]]
    usage: dict[str, Any] | None


class InputItemsQuery(_Closed):
    after: str | None = None
    limit: int = Field(20, ge=1, le=100)
    order: Literal["asc", "desc"] = "desc"
    include: list[str] | None = None


class ResponseObject(_Doc):
    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["completed", "failed", "in_progress", "cancelled", "queued", "incomplete"]
    output: list[dict[str, Any]]
    usage: dict[str, Any] | None
    error: dict[str, Any] | None
    incomplete_details: dict[str, Any] | None
    previous_response_id: str | None
    conversation: dict[str, Any] | None = None


class ResponseDeleted(_Doc):
    id: str
    object: Literal["response.deleted"]
    deleted: bool


class InputItemList(_Doc):
    object: Literal["list"]
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool


class InputTokens(_Doc):
    object: Literal["response.input_tokens"]
    input_tokens: int


# ---- the Conversations API -------------------------------------------------------------------------

class ConversationCreateRequest(_Closed):
    """POST /v1/conversations. `items`: at most 20 input items (messages of role user or assistant,
    function_call, function_call_output, reasoning), stored as the conversation's first messages."""

    items: list[dict[str, Any]] | None = Field(None, max_length=20)
    metadata: dict[str, str] | None = Field(None, description="At most 16 pairs (keys ≤ 64, values ≤ 512 chars).")


class ConversationUpdateRequest(_Closed):
    """POST /v1/conversations/{id}: the metadata, replaced whole."""

    metadata: dict[str, str] = Field(description="At most 16 pairs (keys ≤ 64, values ≤ 512 chars).")


class ItemsCreateRequest(_Closed):
    items: list[dict[str, Any]] = Field(min_length=1, max_length=20)


class IncludeQuery(_Closed):
    include: list[str] | None = None


class ConversationObject(_Doc):
    id: str
    object: Literal["conversation"]
    created_at: int
    metadata: dict[str, str]


class ConversationDeleted(_Doc):
    id: str
    object: Literal["conversation.deleted"]
    deleted: bool


class ConversationItemList(_Doc):
    object: Literal["list"]
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool


class ConversationItemObject(_Doc):
    id: str
    type: str
