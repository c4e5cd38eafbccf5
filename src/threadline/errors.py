"""Errors are contracts: every failure a caller can see has a stable code, an HTTP status,
a retryable flag and a message a person can act on. Surfaces render these; they never invent codes.
"""

from __future__ import annotations

import re
from typing import Any


class ThreadlineError(Exception):
    """Base error. `code` is stable across releases so clients can branch on it."""

    code: str = "internal_error"
    status: int = 500
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        retryable: bool | None = None,
        retry_after: float | None = None,
        upstream_status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if retryable is not None:
            self.retryable = retryable
        self.retry_after = retry_after
        self.upstream_status = upstream_status

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "status": self.status, "retryable": self.retryable}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, status={self.status}, message={self.message!r})"


class NotFoundError(ThreadlineError):
    """Unknown id *or* someone else's: the two are indistinguishable on purpose."""

    code = "not_found"
    status = 404


class InvalidParamError(ThreadlineError):
    code = "invalid_param"
    status = 400


class SuggestionsDisabledError(ThreadlineError):
    """GET /messages/{id}/suggested on an app without suggested_questions_after_answer: what Dify
    1.13 answers (recording 121; its docs say 403 app_suggested_questions_after_answer_disabled)."""

    code = "bad_request"
    status = 400


class UnsupportedInputError(InvalidParamError):
    """The turn carries something its engine cannot take (images for a text-only model): refused with
    a 400 naming the engine, never silently dropped."""

    code = "unsupported_input"


class UnsupportedParameterError(InvalidParamError):
    """A request parameter the turn's engine cannot honour (tools on a Dify app, `seed` on Gemini...):
    refused with a 400 naming the parameter, never dropped. `param` is the caller's own name for it."""

    code = "unsupported_parameter"

    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message)
        self.param = param


class InvalidParentError(InvalidParamError):
    """parent_message_id is not an answer of the conversation (or comes without a conversation)."""

    code = "invalid_parent"


class InvalidToolResultError(InvalidParamError):
    """A function result answers no function call of the conversation's last answer."""

    code = "invalid_tool_result"


class ContextTooLongError(InvalidParamError):
    """The conversation does not fit the engine's context and the caller asked for no truncation
    (the Responses API's `truncation: "disabled"`)."""

    code = "context_length_exceeded"


class PreviousResponseNotFoundError(InvalidParamError):
    """`previous_response_id` names no stored response of the caller's (unknown, another app's,
    deleted, or made with `store: false`): OpenAI's own 400 and code, which the SDKs branch on."""

    code = "previous_response_not_found"

    def __init__(self, response_id: str) -> None:
        super().__init__(f"Previous response with id '{response_id}' not found.")
        self.param = "previous_response_id"


class EngineNotAllowedError(InvalidParamError):
    """The engine asked for is not one the app may use."""

    code = "engine_not_available"


class CompactionUnavailableError(InvalidParamError):
    """A conversation cannot be compacted the way it was asked: its app's engine keeps its own
    conversations (Dify) and the app names no `summary_engine`, or the engine asked for is a
    stateful one. Nothing was stored."""

    code = "compaction_unavailable"


class ConversationBusyError(ThreadlineError):
    code = "conversation_busy"
    status = 409
    retryable = True


class RateLimitedError(ThreadlineError):
    """One of Threadline's own limits (an app's or a key's: `[apps.X.limits]`, `keys create --rpm ...`)
    refused a turn before anything was stored; `retry_after` says when the window frees. `limit`
    names which one, and the code follows it so clients can branch:

    - `requests_per_minute` → `rate_limit_exceeded`
    - `tokens_per_day` → `token_quota_exceeded`
    - `spend_per_day` → `spend_cap_exceeded`
    - `concurrent_turns_per_user` → `too_many_requests` (Dify's code for its concurrency limit)

    Not the same meaning as an engine's own 429, which is an UpstreamError `rate_limit_error`."""

    code = "rate_limit_exceeded"
    status = 429
    retryable = True

    def __init__(self, message: str, *, limit: str, scope: str, code: str, retry_after: float) -> None:
        super().__init__(message, code=code, retry_after=retry_after)
        self.limit = limit  # requests_per_minute | tokens_per_day | spend_per_day | concurrent_turns_per_user
        self.scope = scope  # "key" | "app"


class ConfigError(ThreadlineError):
    code = "config_error"
    status = 500


class AppNotFoundError(ConfigError):
    code = "app_not_found"
    status = 404


class EngineNotFoundError(ConfigError):
    code = "engine_not_found"
    status = 404


class NoEngineError(ConfigError):
    """No engine is configured or usable at all."""

    code = "no_engine"
    status = 503


class EngineUnavailableError(ConfigError):
    """The engine is configured but cannot run (its key or model file is missing)."""

    code = "engine_unavailable"
    status = 503


class UpstreamError(ThreadlineError):
    """A provider failed or refused; `upstream_status` keeps what it said for logs and mapping."""

    code = "completion_request_error"
    status = 400


class UpstreamUnavailableError(UpstreamError):
    """The engine could not be reached or answered 5xx/408: worth retrying."""

    code = "upstream_unavailable"
    status = 502
    retryable = True


class UpstreamInternalError(UpstreamError):
    """The engine's adapter failed in a way nobody planned for (logged by type only)."""

    code = "upstream_error"
    status = 502


class ProviderAuthError(UpstreamError):
    """The engine refused Threadline's own credentials (its 401/403): the operator's problem, a 502."""

    code = "provider_auth_error"
    status = 502


class UpstreamRateLimitError(UpstreamError):
    """The engine's own 429, with its Retry-After (1 s when it named none)."""

    code = "rate_limit_error"
    status = 429
    retryable = True


class UpstreamNotFoundError(UpstreamError):
    """The engine answered 404 for something it was asked about (a Dify workflow, a remote id)."""

    code = "not_found"
    status = 404


class WorkflowFailedError(UpstreamError):
    """A Dify app's workflow run failed mid-answer; Dify's own code for it (fixture 075)."""

    code = "invalid_param"
    status = 400


class ContentBlockedError(UpstreamError):
    """The engine's safety filter blocked the prompt or stopped the answer."""

    code = "content_blocked"
    status = 400


class UpstreamTruncated(UpstreamError):
    """The engine's stream ended without its terminator (`[DONE]`, a finish reason, `message_end`):
    the answer is incomplete, so the turn is failed with what came, never stored as completed."""

    code = "upstream_truncated"
    status = 502
    retryable = True


class UpstreamBadResponse(UpstreamError):
    """The engine sent something that is not its protocol (a body or a stream chunk that does not parse)."""

    code = "upstream_bad_response"
    status = 502
    retryable = True


class UpstreamTimeout(UpstreamError):
    """The engine did not answer (or went silent mid-answer) within the engine's `timeout`."""

    code = "upstream_timeout"
    status = 504
    retryable = True


class UpstreamStreamError(UpstreamError):
    """The engine reported an error inside a stream it had started."""

    code = "upstream_stream_error"
    status = 502


class RemoteConversationLost(UpstreamError):
    """A stateful engine no longer knows the remote conversation id we stored (deleted or expired)."""

    code = "remote_conversation_lost"
    status = 404


class FileTooLargeError(ThreadlineError):
    code = "file_too_large"
    status = 413


class UnsupportedFileTypeError(ThreadlineError):
    code = "unsupported_file_type"
    status = 415


class BlockedURLError(InvalidParamError):
    """Raised by the SSRF guard; the message names the reason, never internal addresses beyond the URL."""

    code = "url_not_allowed"


DEFAULT_RETRY_AFTER = 1.0  # seconds, for an upstream 429 that gave no hint


def upstream_error_from_status(status: int, message: str, *, retry_after: float | None = None) -> UpstreamError:
    """One mapping from an upstream HTTP status to a Threadline error, shared by every engine."""
    if status in (401, 403):
        return ProviderAuthError(f"The engine rejected Threadline's credentials ({status}): {message}",
                                 upstream_status=status)
    if status == 429:  # always with a hint: clients back off by Retry-After, and 1 s is the least a limit asks
        return UpstreamRateLimitError(f"The engine is rate limiting requests: {message}",
                                      retry_after=retry_after or DEFAULT_RETRY_AFTER, upstream_status=status)
    if status == 408 or status >= 500:
        return UpstreamUnavailableError(f"The engine is unavailable ({status}): {message}", retry_after=retry_after,
                                        upstream_status=status)
    return UpstreamError(f"The engine rejected the request ({status}): {message}", upstream_status=status)


_KEYLIKE = re.compile(
    r"(sk-[A-Za-z0-9_\-]{6,}|nvapi-[A-Za-z0-9_\-]{6,}|xai-[A-Za-z0-9_\-]{6,}|AIza[0-9A-Za-z_\-]{10,}|app-[A-Za-z0-9_\-]{8,})"
)


def redact(text: str, *secrets: str | None) -> str:
    """Remove secrets from text that may reach a client or a log (upstreams sometimes echo keys)."""
    for s in secrets:
        if s and len(s) >= 4:
            text = text.replace(s, "***")
    return _KEYLIKE.sub("***", text)


class _Held:
    """Exact-secret removal over a stream of pieces: a secret split across pieces is still caught,
    because a tail that could be the start of the secret is held back until the next piece."""

    __slots__ = ("held", "secret")

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.held = ""

    def feed(self, piece: str) -> str:
        s = self.secret
        buf = self.held + piece if self.held else piece
        if s in buf:
            buf = buf.replace(s, "***")
        # The longest tail of buf that is a proper prefix of the secret (candidates start at s[0]).
        keep = 0
        start = max(0, len(buf) - len(s) + 1)
        i = buf.find(s[0], start)
        while i != -1:
            if s.startswith(buf[i:]):
                keep = len(buf) - i
                break
            i = buf.find(s[0], i + 1)
        if keep:
            self.held = buf[-keep:]
            return buf[:-keep]
        self.held = ""
        return buf

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


class StreamRedactor:
    """Removes an engine's key from the answer and reasoning it streams (one per turn). Costs nothing
    when the engine has no key; otherwise a substring test and a short scan per piece."""

    __slots__ = ("_reasoning", "_text")

    def __init__(self, secret: str | None) -> None:
        usable = secret if secret and len(secret) >= 8 else None
        self._text = _Held(usable) if usable else None
        self._reasoning = _Held(usable) if usable else None

    def text(self, piece: str) -> str:
        return self._text.feed(piece) if self._text is not None else piece

    def reasoning(self, piece: str) -> str:
        return self._reasoning.feed(piece) if self._reasoning is not None else piece

    def flush(self) -> tuple[str, str]:
        if self._text is None or self._reasoning is None:
            return "", ""
        return self._text.flush(), self._reasoning.flush()

    def replaced(self, text: str) -> str:
        """A whole answer that replaces what streamed so far (Dify's `message_replace`): what was held
        back went with the old answer; the key anywhere in the new one becomes ***."""
        if self._text is None:
            return text
        self._text.held = ""
        return text.replace(self._text.secret, "***")

    def reclassified(self, reasoning: str, answer: str) -> str:
        """The reasoning was answer after all (R1 without think tags, known only once the stream
        ended): one answer of both, with the reasoning's held-back tail in its place between them.
        The answer's own held tail stays held and comes with the final flush, still at the end."""
        if self._text is None or self._reasoning is None:
            return reasoning + answer
        return (reasoning + self._reasoning.flush() + answer).replace(self._text.secret, "***")
