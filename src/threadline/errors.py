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


class UnsupportedInputError(InvalidParamError):
    """The turn carries something its engine cannot take (images for a text-only model): refused with
    a 400 naming the engine, never silently dropped."""

    code = "unsupported_input"


class ConversationBusyError(ThreadlineError):
    code = "conversation_busy"
    status = 409
    retryable = True


class ConfigError(ThreadlineError):
    code = "config_error"
    status = 500


class UpstreamError(ThreadlineError):
    """A provider failed or refused; `upstream_status` keeps what it said for logs and mapping."""

    code = "completion_request_error"
    status = 400


class RemoteConversationLost(ThreadlineError):
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


def upstream_error_from_status(status: int, message: str, *, retry_after: float | None = None) -> UpstreamError:
    """One mapping from an upstream HTTP status to a Threadline error, shared by every engine."""
    if status in (401, 403):
        return UpstreamError(
            f"The engine rejected Threadline's credentials ({status}): {message}",
            code="provider_auth_error", status=502, retryable=False, upstream_status=status,
        )
    if status == 429:
        return UpstreamError(
            f"The engine is rate limiting requests: {message}",
            code="rate_limit_error", status=429, retryable=True, retry_after=retry_after, upstream_status=status,
        )
    if status == 408 or status >= 500:
        return UpstreamError(
            f"The engine is unavailable ({status}): {message}",
            code="upstream_unavailable", status=502, retryable=True, retry_after=retry_after,
            upstream_status=status,
        )
    return UpstreamError(
        f"The engine rejected the request ({status}): {message}",
        code="completion_request_error", status=400, retryable=False, upstream_status=status,
    )


_KEYLIKE = re.compile(
    r"(sk-[A-Za-z0-9_\-]{6,}|nvapi-[A-Za-z0-9_\-]{6,}|xai-[A-Za-z0-9_\-]{6,}|AIza[0-9A-Za-z_\-]{10,}|app-[A-Za-z0-9_\-]{8,})"
)


def redact(text: str, *secrets: str | None) -> str:
    """Remove secrets from text that may reach a client or a log (upstreams sometimes echo keys)."""
    for s in secrets:
        if s and len(s) >= 4:
            text = text.replace(s, "***")
    return _KEYLIKE.sub("***", text)
