"""One place for upstream retries and error mapping, shared by every engine (as openai-python does).

Retries happen only before the first byte of an answer: 429, 408, 5xx and connection errors, with
exponential backoff and jitter, honouring Retry-After / retry-after-ms / Gemini's RetryInfo.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import orjson

from ..errors import UpstreamError, UpstreamTimeout, UpstreamUnavailableError, redact, upstream_error_from_status
from .http import UpstreamResponse

log = logging.getLogger("threadline.engines")

MAX_RETRY_AFTER = 60.0


def retry_after_seconds(headers: Mapping[str, str], body: Any) -> float | None:
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if ra:
        try:
            return float(ra)
        except ValueError:
            try:
                import time

                return max(0.0, parsedate_to_datetime(ra).timestamp() - time.time())
            except (TypeError, ValueError):
                pass
    # Gemini: {"error": {"details": [{"@type": "...RetryInfo", "retryDelay": "34.4s"}]}}
    if isinstance(body, dict):
        for d in (body.get("error") or {}).get("details") or [] if isinstance(body.get("error"), dict) else []:
            delay = d.get("retryDelay") if isinstance(d, dict) else None
            if isinstance(delay, str) and delay.endswith("s"):
                try:
                    return float(delay[:-1])
                except ValueError:
                    pass
    return None


def error_message(body: Any, text: str) -> str:
    """Pull the human message out of any provider's error envelope."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            return str(err.get("message") or err)
        if isinstance(err, str):  # xAI: {"code": "...", "error": "..."}
            return err
        if "detail" in body:  # NIM problem+json
            return str(body.get("detail"))
        if "message" in body:
            return str(body["message"])
    return text[:500] or "no details"


async def send(
    post: Callable[[], Awaitable[UpstreamResponse]],
    *,
    max_retries: int,
    secrets: tuple[str | None, ...],
    engine: str,
    map_error: Callable[[int, Any, str], UpstreamError | None] | None = None,
) -> UpstreamResponse:
    """Send a request (`post` sends one attempt, body streamed) and return the open 2xx response, or
    raise a mapped UpstreamError."""
    attempt = 0
    while True:
        try:
            resp = await post()
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError,
                httpx.ReadTimeout, httpx.WriteError, httpx.PoolTimeout) as exc:
            err = transport_error(engine, exc)
            if attempt < max_retries:
                await _sleep(attempt, None)
                attempt += 1
                continue
            raise err from None
        if resp.status_code < 400:
            return resp
        raw = await resp.aread()
        await resp.aclose()
        text = raw.decode("utf-8", "replace")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        delay = retry_after_seconds(resp.headers, body)
        mapped = map_error(resp.status_code, body, redact(error_message(body, text), *secrets)) if map_error else None
        err = mapped or upstream_error_from_status(resp.status_code, redact(error_message(body, text), *secrets),
                                                   retry_after=delay)
        if err.retry_after is None:
            err.retry_after = delay
        log.warning("engine %s answered %s (attempt %d)", engine, resp.status_code, attempt + 1)
        if err.retryable and attempt < max_retries and (delay is None or delay <= MAX_RETRY_AFTER):
            await _sleep(attempt, delay)
            attempt += 1
            continue
        raise err


def transport_error(engine: str, exc: Exception) -> UpstreamError:
    """A failed connection or read, as the error a client sees: a timeout is 504, anything else 502."""
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(f"Engine {engine!r} did not answer in time ({type(exc).__name__}).")
    return UpstreamUnavailableError(f"Could not reach engine {engine!r}: {type(exc).__name__}")


async def _sleep(attempt: int, delay: float | None) -> None:
    if delay is None:
        delay = min(8.0, 0.5 * 2**attempt) * (0.75 + random.random() / 2)
    await asyncio.sleep(delay)
