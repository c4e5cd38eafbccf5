"""Typed HTTP bodies: every route's request and response, as pydantic models.

The routes validate with these same models and the published OpenAPI schema (`/openapi.json`) is
generated from them (server/spec.py), so the schema cannot drift from what a route accepts. The
Dify-style request models carry Dify's own model names (ChatRequestPayload, MessageListQuery, ...):
Dify 1.13 validates with pydantic too and returns the validation error's text as the message, so
naming them alike gives byte-identical messages (see ../shared/fixtures/dify/083, 084, 094, 117, 118).

Response models document what clients read; they allow extra keys, as Dify's and OpenAI's clients
ignore unknown ones, and Threadline adds a few (engine, reasoning, status, ...).
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator


class _Open(BaseModel):
    """A body that tolerates fields it does not name (clients send extras; unknown ones are ignored
    only where the surface's own server ignores them too)."""

    model_config = ConfigDict(extra="allow")


class _Closed(BaseModel):
    """A body whose every field is known: an unknown one is refused, never ignored."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class _Doc(BaseModel):
    """A documented response shape; extra keys allowed (clients ignore unknown keys)."""

    model_config = ConfigDict(extra="allow")


# ---- errors ------------------------------------------------------------------------------------------


class DifyErrorBody(_Doc):
    code: str
    message: str
    status: int


class OpenAIErrorDetail(_Doc):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(_Doc):
    error: OpenAIErrorDetail


# ---- Dify-style requests ---------------------------------------------------------------------------------


class FileItem(_Open):
    type: str = "image"
    transfer_method: str
    url: str | None = None
    upload_file_id: str | None = None


class ChatRequestPayload(_Open):
    """POST /v1/chat-messages. `engine` and `include_reasoning` are Threadline's additions."""

    inputs: dict[str, Any] = Field(default_factory=dict)
    query: str
    files: list[Any] | None = None
    response_mode: Literal["blocking", "streaming"] | None = None
    conversation_id: str | None = None
    user: str
    auto_generate_name: bool = True
    workflow_id: str | None = None
    engine: str | None = Field(None, description="Threadline: answer this turn with another engine the app allows.")
    include_reasoning: bool = Field(False, description="Threadline: stream `reasoning` events too.")
    parent_message_id: str | None = Field(
        None, description="Threadline: continue from this earlier answer of the conversation (regenerate, edit and "
                          "resend) instead of its newest one; the turn starts a branch and the engine is sent that "
                          "branch. Absent or UUID_NIL (what Dify's service API always uses): the newest answer.")

    @field_validator("inputs", mode="before")
    @classmethod
    def _inputs(cls, v: Any) -> Any:
        return {} if v is None else v

    @field_validator("conversation_id", "parent_message_id")
    @classmethod
    def _uuid(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None or not v.strip():
            return None
        try:
            parsed = uuid.UUID(v)
        except ValueError:
            raise ValueError(f"{info.field_name} must be a valid UUID") from None
        if parsed.int == 0:  # UUID_NIL: Dify's "no parent", i.e. the newest answer
            return None
        return v.strip()


class UserPayload(_Open):
    """A body that names only the user (stop, delete)."""

    user: str


class FeedbackPayload(_Open):
    rating: Literal["like", "dislike"] | None = None
    user: str
    content: str | None = None


class ConversationRenamePayload(_Open):
    name: str | None = None
    auto_generate: bool = False
    user: str

    @model_validator(mode="after")
    def _name_needed(self) -> ConversationRenamePayload:
        if not self.auto_generate and (self.name is None or not self.name.strip()):
            raise ValueError("name is required when auto_generate is false")
        return self


class MessageListQuery(BaseModel):
    conversation_id: str
    user: str | None = None
    first_id: str | None = None
    limit: int = Field(20, ge=1, le=100)


class ConversationListQuery(BaseModel):
    user: str | None = None
    last_id: str | None = None
    limit: int = Field(20, ge=1, le=100)
    sort_by: Literal["created_at", "-created_at", "updated_at", "-updated_at"] = "-updated_at"


class UserQuery(BaseModel):
    user: str | None = None


class SignedFileQuery(BaseModel):
    """The query of a signed file URL (GET /files/{file_id}/file-preview), as Dify's."""

    timestamp: str
    nonce: str
    sign: str


class AppFeedbacksQuery(BaseModel):
    """GET /v1/app/feedbacks: Dify's page and limit (controllers/service_api/app/message.py)."""

    page: int = Field(1, ge=1, le=1_000_000)
    limit: int = Field(20, ge=1, le=101)


class UploadForm(BaseModel):
    """multipart/form-data of POST /v1/files/upload."""

    file: bytes = Field(json_schema_extra={"format": "binary"})
    user: str | None = None


# ---- Dify-style responses --------------------------------------------------------------------------------


class Usage(_Doc):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    total_price: str
    currency: str
    latency: float


class ChatMessageMetadata(_Doc):
    usage: Usage


class ChatMessageResponse(_Doc):
    event: str
    task_id: str
    id: str
    message_id: str
    conversation_id: str
    mode: str
    answer: str
    metadata: ChatMessageMetadata
    created_at: int


class ResultResponse(_Doc):
    result: str


class MessageFile(_Doc):
    id: str
    type: str
    url: str
    belongs_to: str


class MessageItem(_Doc):
    id: str
    conversation_id: str
    inputs: dict[str, Any]
    query: str
    answer: str
    message_files: list[MessageFile]
    feedback: dict[str, Any] | None
    created_at: int
    status: str
    error: str | None


class MessageList(_Doc):
    limit: int
    has_more: bool
    data: list[MessageItem]


class ConversationItem(_Doc):
    id: str
    name: str
    inputs: dict[str, Any]
    status: str
    introduction: str
    created_at: int
    updated_at: int


class ConversationList(_Doc):
    limit: int
    has_more: bool
    data: list[ConversationItem]


class FileUploadResponse(_Doc):
    id: str
    name: str
    size: int
    extension: str
    mime_type: str
    created_by: str
    created_at: int


class SuggestedResponse(_Doc):
    result: str
    data: list[str]


class AppFeedback(_Doc):
    id: str
    app_id: str
    conversation_id: str
    message_id: str
    rating: str
    content: str | None
    from_source: str
    from_end_user_id: str | None
    from_account_id: str | None
    created_at: str
    updated_at: str


class AppFeedbackList(_Doc):
    data: list[AppFeedback]


class ParametersResponse(_Doc):
    opening_statement: str
    suggested_questions: list[str]
    user_input_form: list[Any]
    file_upload: dict[str, Any]
    system_parameters: dict[str, Any]


class InfoResponse(_Doc):
    name: str
    description: str
    tags: list[str]
    mode: str
    author_name: str


class MetaResponse(_Doc):
    tool_icons: dict[str, Any]


# ---- OpenAI-style ----------------------------------------------------------------------------------------


class StreamOptions(_Open):
    include_usage: bool | None = None


class FunctionCallModel(_Open):
    name: str
    arguments: str = "{}"


class ToolCallModel(_Open):
    """An assistant message's call, as OpenAI's clients send it back in history."""

    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCallModel


class ChatCompletionMessage(_Closed):
    """A message of the client's list. Besides the fields Threadline reads, it takes what clients echo
    back of an earlier answer (`refusal`, `annotations`, `reasoning_content`, null `audio` and
    `function_call`): that answer is stored already, and reasoning is never replayed. `name` is read
    on tool messages only (the call names the function); elsewhere it is refused, not dropped."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallModel] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None
    annotations: list[Any] | None = None
    reasoning_content: str | None = None
    audio: None = Field(None, description="Only null: audio is not relayed.")
    function_call: None = Field(None, description="Only null: the legacy function_call is not supported; use tool_calls.")


class FunctionDefinition(_Closed):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_.:-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(_Closed):
    type: Literal["function"] = Field(description="Function tools only; other tool types are refused.")
    function: FunctionDefinition


class NamedFunction(_Closed):
    name: str


class NamedToolChoice(_Closed):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(_Closed):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormatModel(_Closed):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormatModel:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when type is 'json_schema'")
        return self


class ChatCompletionRequest(_Closed):
    """POST /v1/chat/completions. `model` names the key's app or an engine that app may use. Every
    field is forwarded to the engine or refused with a 400 naming it; none is dropped. Unknown
    fields are refused as OpenAI refuses them ("Unrecognized request argument supplied")."""

    model: str = Field(min_length=1)
    messages: list[ChatCompletionMessage] = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    safety_identifier: str | None = Field(None, description="Used as `user` when `user` is absent.")
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    response_format: ResponseFormatModel | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    n: int | None = Field(None, ge=1, le=128, description="Only 1: a conversation keeps one answer per turn.")
    logprobs: bool | None = Field(None, description="Only false: log probabilities are not relayed.")
    store: bool | None = Field(None, description="Only true: Threadline keeps every conversation.")
    metadata: dict[str, str] | None = Field(
        None, description="`threadline_conversation_id` names the conversation to continue (as the "
                          "X-Threadline-Conversation-Id header does); other keys are refused.")


class ChatCompletionChoice(_Doc):
    index: int
    message: dict[str, Any] = Field(description="role, content (null when the answer is only tool calls), "
                                                "tool_calls, refusal, reasoning_content")
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter"] | None


class CompletionUsage(_Doc):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(_Doc):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: CompletionUsage


class Model(_Doc):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Doc):
    object: Literal["list"]
    data: list[Model]
