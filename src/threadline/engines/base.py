"""The engine protocol and registry.

An engine speaks one wire protocol. It receives a neutral `EngineRequest` and yields neutral events;
it never imports the store or the server, and the gateway decides what is stored.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from ..config import EngineConfig
from ..errors import ConfigError, UnsupportedParameterError
from ..messages import ChatMessage, EngineEvent, GenerationParams, ImagePart, ToolChoice, ToolSpec
from .http import HttpxPoster, Poster


@dataclass
class EngineRequest:
    """Everything an engine may need for one turn. Stateless engines use `system` + `messages`;
    stateful ones use `query`, `remote_conversation_id`, `remote_user`, `inputs` and `files`."""

    messages: Sequence[ChatMessage]
    system: list[str] = field(default_factory=list)
    # The first len(openai_history) messages already encoded in OpenAI's chat format (orjson
    # Fragments from the history cache): engines speaking that format send them as they are.
    openai_history: Sequence[Any] = ()
    stream: bool = True
    max_output_tokens: int | None = None
    tools: Sequence[ToolSpec] = ()
    tool_choice: ToolChoice | None = None
    params: GenerationParams = field(default_factory=GenerationParams)
    # stateful engines
    query: str = ""
    images: list[ImagePart] = field(default_factory=list)
    remote_conversation_id: str | None = None
    remote_user: str = ""
    inputs: dict[str, Any] = field(default_factory=dict)
    workflow_id: str | None = None
    auto_generate_name: bool = True
    # The name a new remote conversation gets once it exists (a seeded Dify conversation, which
    # must not be auto-named from its transcript); None leaves the naming to the remote side.
    conversation_name: str | None = None


class Engine:
    """Base class: subclasses implement `events()`; `stop()` is for engines with server-side tasks.

    `http` serves an engine's side calls (uploads, image fetches, listings); `poster` sends its turn
    request, through `http` unless a faster one is given (see engines/http.py)."""

    kind: str = ""
    stateful: bool = False
    accepts_images: bool = True  # False: the gateway refuses a turn with images (400) before storing it
    # The GenerationParams fields this engine forwards; any other field a caller sets is refused (400).
    supported_params: frozenset[str] = frozenset({"max_tokens"})
    supports_tools: bool = False

    def __init__(self, config: EngineConfig, http: httpx.AsyncClient | None = None,
                 poster: Poster | None = None) -> None:
        self.config = config
        self.name = config.name
        self.model = config.model
        self._own_http = http is None
        self.http = http or httpx.AsyncClient(timeout=httpx.Timeout(config.timeout, connect=10.0))
        self.poster: Poster = poster or HttpxPoster(self.http)

    def events(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        raise NotImplementedError

    def check_request(self, tools: Sequence[ToolSpec], tool_choice: ToolChoice | None,
                      params: GenerationParams) -> None:
        """Refuse, before anything is stored, what this engine cannot honour: forward or refuse,
        never drop. `param` carries the OpenAI name of the field."""
        if (tools or tool_choice is not None) and not self.supports_tools:
            raise UnsupportedParameterError(
                f"Engine {self.name!r} ({self.kind}) does not take caller-defined tools: send the turn without "
                "'tools', or pick an engine that supports them.", param="tools" if tools else "tool_choice")
        for name in params.set_fields():
            if name not in self.supported_params:
                raise UnsupportedParameterError(
                    f"Engine {self.name!r} ({self.kind}) does not support '{name}': leave it out, or pick an engine "
                    "that supports it.", param=name)

    async def stop(self, *, task_id: str, remote_user: str) -> None:
        """Ask the remote to stop a running task (stateful engines); closing the stream does the rest."""

    async def aclose(self) -> None:
        if self._own_http:
            await self.http.aclose()


def build_engine(config: EngineConfig, http: httpx.AsyncClient | None = None, poster: Poster | None = None) -> Engine:
    """One engine instance per configured engine, built once and reused for every turn."""
    if config.kind == "openai":
        from .openai_compat import OpenAICompatEngine

        return OpenAICompatEngine(config, http, poster)
    if config.kind == "gemini":
        from .gemini import GeminiEngine

        return GeminiEngine(config, http, poster)
    if config.kind == "dify":
        from .dify import DifyEngine

        return DifyEngine(config, http, poster)
    if config.kind == "local":
        from .local import LocalEngine

        return LocalEngine(config, http, poster)
    raise ConfigError(f"unknown engine kind {config.kind!r}")
