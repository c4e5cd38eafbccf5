"""The pinned Python API: `AsyncThreadline` and `Threadline`, the same shape, async and sync.

The sync class runs the async core on a private event loop in a background thread (as httpx and
openai-python keep their sync and async clients alike), so both share every behaviour.

One source of truth for the signatures too: each sync method is generated from its async twin
(`chat = _sync(AsyncThreadline.chat)`). `_sync` is typed with a ParamSpec, so mypy (strict) and IDEs
see the twin's real parameters, names, defaults and types (a misspelt keyword is a type error, not a
`**kw` that fails at run time), and at run time it copies the twin's `__signature__`, annotations and
docstring, so `inspect.signature` and `help()` agree. Explicit forwarding methods would repeat every
signature by hand, and `**kw` hid them all; tests/test_python_api.py checks that every public async
method has a sync twin with the same parameters.

The library closes what it opens: `async with AsyncThreadline(...)` / `await aclose()`, and
`with Threadline(...)` / `close()`, close the engines' HTTP sessions, the store and (sync) the private
loop and its thread. A `Threadline` left open is closed by a `weakref.finalize` when it is garbage-
collected or at interpreter exit, whichever comes first; the finalizer holds the loop and the async
core, never the instance, so the instance stays collectable; closing twice is a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from .compaction import Compaction
from .config import Settings
from .errors import InvalidParamError
from .gateway import Gateway
from .media import guess_extension, sniff_image_type
from .messages import (
    NO_PARAMS,
    FunctionResult,
    GenerationParams,
    ImagePart,
    Reply,
    ToolChoice,
    ToolSpec,
    TurnCompleted,
    TurnEvent,
    TurnFailed,
    items_from_json,
)
from .service import ConversationService
from .turns import TurnRequest

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")

CLOSE_TIMEOUT = 30.0  # seconds a sync close waits for the core to close and the loop thread to end


@dataclass
class Conversation:
    id: str
    app: str
    user: str
    engine: str
    name: str
    created_at: float
    updated_at: float
    remote: dict[str, Any]
    inputs: dict[str, Any]


@dataclass
class Message:
    id: str
    conversation_id: str
    role: str
    content: str
    reasoning: str | None
    status: str
    engine: str | None
    model: str | None
    usage: dict[str, Any] | None
    images: list[dict[str, Any]]
    created_at: float
    error: dict[str, Any] | None = None
    parent_id: str | None = None
    # Typed items beyond the text: ImagePart, FunctionCall, FunctionResult, ReasoningState, and AgentStep
    # (an engine's own tool runs, e.g. a Dify agent app's thoughts) — the parts column, read.
    items: list[Any] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class MemoryEntry:
    id: str
    app: str
    user: str
    text: str
    created_at: float


def _conv(r: dict[str, Any]) -> Conversation:
    # `remote`: the engines' own conversation ids; the store's own entries there ("#...") are not shown.
    remote = {k: v for k, v in (r.get("remote") or {}).items() if not k.startswith("#")}
    return Conversation(r["id"], r["app"], r["user"], r["engine"], r["name"], r["created_at"], r["updated_at"],
                        remote, r.get("inputs") or {})


def _images(parts: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    return [p for p in parts or () if p.get("type") == "image"]


def _msg(r: dict[str, Any]) -> Message:
    return Message(r["id"], r["conversation_id"], r["role"], r["content"], r.get("reasoning"), r["status"],
                   r.get("engine"), r.get("model"), r.get("usage"), _images(r.get("parts")), r["created_at"],
                   r.get("error"), r.get("parent_id"), items_from_json(r.get("parts")), r.get("finish_reason"))


def tool_spec(tool: ToolSpec | dict[str, Any]) -> ToolSpec:
    """A ToolSpec from itself or from OpenAI's `{"type": "function", "function": {...}}` shape."""
    if isinstance(tool, ToolSpec):
        return tool
    fn = tool.get("function", tool) if tool.get("type", "function") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise InvalidParamError("a tool is a ToolSpec or {'type': 'function', 'function': {'name': ...}}")
    return ToolSpec(fn["name"], fn.get("description"), fn.get("parameters"), fn.get("strict"))


def tool_choice_of(choice: str | ToolChoice | None) -> ToolChoice | None:
    if choice is None or isinstance(choice, ToolChoice):
        return choice
    if choice in ("auto", "none", "required"):
        return ToolChoice(choice)  # type: ignore[arg-type]
    return ToolChoice("function", choice)  # a function's name


def _request(
    *, text: str, user: str, app: str | None, conversation_id: str | None, parent_id: str | None,
    engine: str | None, images: Iterable[str | ImagePart] | None, files: Iterable[str] | None,
    inputs: dict[str, Any] | None, tools: Sequence[ToolSpec | dict[str, Any]] | None,
    tool_choice: str | ToolChoice | None, tool_results: Sequence[FunctionResult] | None,
    params: GenerationParams | None, stream: bool,
) -> TurnRequest:
    """The one place the Python API's arguments become a TurnRequest (chat, stream, regenerate, edit)."""
    return TurnRequest(user=user, text=text, app=app, conversation_id=conversation_id, parent_id=parent_id,
                       engine=engine, images=tuple(images or ()), files=tuple(files or ()), inputs=inputs or {},
                       tools=tuple(tool_spec(t) for t in tools or ()), tool_choice=tool_choice_of(tool_choice),
                       results=tuple(tool_results or ()), params=params or NO_PARAMS, stream=stream)


def _memory(r: dict[str, Any]) -> MemoryEntry:
    return MemoryEntry(r["id"], r["app"], r["user"], r["text"], r["created_at"])


class AsyncMemory:
    """`AsyncThreadline.memory`: notes about a user that every turn of theirs sees."""

    def __init__(self, owner: AsyncThreadline) -> None:
        self._o = owner

    async def add(self, *, user: str, app: str | None = None, text: str) -> MemoryEntry:
        svc = self._o.service
        return _memory(await svc.remember(svc.scope(app, user), text))

    async def list(self, *, user: str, app: str | None = None) -> list[MemoryEntry]:
        svc = self._o.service
        return [_memory(r) for r in await svc.memories(svc.scope(app, user))]

    async def delete(self, memory_id: str, *, user: str, app: str | None = None) -> None:
        svc = self._o.service
        await svc.forget(svc.scope(app, user), memory_id)


class AsyncThreadline:
    """One conversation API over every engine. See README for the full tour."""

    def __init__(
        self,
        database_url: str | None = None,
        engines: dict[str, dict[str, Any]] | None = None,
        apps: dict[str, dict[str, Any]] | None = None,
        *,
        settings: Settings | None = None,
        default_engine: str | None = None,
        include_presets: bool = True,
    ) -> None:
        self.settings = settings or Settings.build(database_url=database_url, engines=engines, apps=apps,
                                                   default_engine=default_engine, include_presets=include_presets)
        self.gateway = Gateway(self.settings)
        self.service = ConversationService(self.gateway)
        self.memory = AsyncMemory(self)
        self._closed = False

    @classmethod
    def from_config(cls, path: str | Path) -> AsyncThreadline:
        return cls(settings=Settings.from_file(path))

    async def _gw(self) -> Gateway:
        await self.gateway.start()
        return self.gateway

    async def chat(
        self, text: str = "", *, user: str, app: str | None = None, conversation_id: str | None = None,
        engine: str | None = None, images: Iterable[str | ImagePart] | None = None,
        files: Iterable[str] | None = None, inputs: dict[str, Any] | None = None,
        tools: Sequence[ToolSpec | dict[str, Any]] | None = None, tool_choice: str | ToolChoice | None = None,
        tool_results: Sequence[FunctionResult] | None = None, params: GenerationParams | None = None,
        parent_id: str | None = None,
    ) -> Reply:
        """One blocking turn. Raises the turn's error after the partial answer is stored.

        `tools`: functions the model may call (`ToolSpec`, or OpenAI's `{"type": "function",
        "function": {...}}` dict); the reply's `tool_calls` lists the calls it made. Answer them on
        the next turn with `tool_results` (and no text). `params`: sampling and output parameters;
        one the engine cannot honour is refused (InvalidParamError), never dropped. `parent_id`:
        continue from this earlier answer of the conversation instead of its newest (a branch;
        see `regenerate` and `edit`)."""
        req = _request(text=text, user=user, app=app, conversation_id=conversation_id, parent_id=parent_id,
                       engine=engine, images=images, files=files, inputs=inputs, tools=tools,
                       tool_choice=tool_choice, tool_results=tool_results, params=params, stream=False)
        return await self._reply(req)

    async def _reply(self, req: TurnRequest) -> Reply:
        svc = self.service
        final: Reply | None = None
        async for ev in svc.turn(svc.scope(req.app, req.user, any_app=req.conversation_id is not None), req):
            if isinstance(ev, TurnFailed):
                raise ev.error
            if isinstance(ev, TurnCompleted):
                final = ev.reply
        assert final is not None
        return final

    async def regenerate(
        self, message_id: str, *, user: str, app: str | None = None, engine: str | None = None,
        tools: Sequence[ToolSpec | dict[str, Any]] | None = None, params: GenerationParams | None = None,
    ) -> Reply:
        """A new answer to a question (`message_id`: the question or its answer), on a new branch
        from where the question was asked; the old answer stays on its branch. The question's
        images and function results go again; `tools` as the first time, if it had them."""
        return await self._ask_again(message_id, None, user=user, app=app, engine=engine, tools=tools, params=params)

    async def edit(
        self, message_id: str, text: str, *, user: str, app: str | None = None, engine: str | None = None,
        tools: Sequence[ToolSpec | dict[str, Any]] | None = None, params: GenerationParams | None = None,
    ) -> Reply:
        """Ask a question again with new text (`message_id`: the question or its answer): a new
        branch from where it was asked, as chat apps' edit-and-resend does; its images are kept."""
        return await self._ask_again(message_id, text, user=user, app=app, engine=engine, tools=tools, params=params)

    async def _ask_again(
        self, message_id: str, text: str | None, *, user: str, app: str | None, engine: str | None,
        tools: Sequence[ToolSpec | dict[str, Any]] | None, params: GenerationParams | None,
    ) -> Reply:
        """regenerate (`text` None: the question as it was, function results included) and edit
        (new text; images kept): a new turn on a branch from where the question was asked."""
        svc = self.service
        question, parent = await svc.branch_point(svc.scope(app, user, any_app=True), message_id)
        items = items_from_json(question.get("parts"))
        return await self._reply(_request(
            text=question["content"] if text is None else text, user=user, app=app,
            conversation_id=question["conversation_id"], parent_id=parent, engine=engine,
            images=[i for i in items if isinstance(i, ImagePart)], files=None, inputs=question.get("inputs"),
            tools=tools, tool_choice=None,
            tool_results=[i for i in items if isinstance(i, FunctionResult)] if text is None else None,
            params=params, stream=False))

    async def stream(
        self, text: str = "", *, user: str, app: str | None = None, conversation_id: str | None = None,
        engine: str | None = None, images: Iterable[str | ImagePart] | None = None,
        files: Iterable[str] | None = None, inputs: dict[str, Any] | None = None,
        tools: Sequence[ToolSpec | dict[str, Any]] | None = None, tool_choice: str | ToolChoice | None = None,
        tool_results: Sequence[FunctionResult] | None = None, params: GenerationParams | None = None,
        parent_id: str | None = None,
    ) -> AsyncIterator[TurnEvent]:
        """Yield TurnStarted, TextDelta/ReasoningDelta/ToolCallDelta…, then TurnCompleted (its `.reply`).

        A failure raises after the partial answer was stored with status `failed`.
        """
        svc = self.service
        req = _request(text=text, user=user, app=app, conversation_id=conversation_id, parent_id=parent_id,
                       engine=engine, images=images, files=files, inputs=inputs, tools=tools,
                       tool_choice=tool_choice, tool_results=tool_results, params=params, stream=True)
        # Closed with this generator: a caller that stops iterating (and closes it) ends the turn now.
        async with contextlib.aclosing(svc.turn(svc.scope(app, user, any_app=conversation_id is not None), req)) as turn:
            async for ev in turn:
                if isinstance(ev, TurnFailed):
                    raise ev.error
                yield ev

    async def stop(self, task_id: str, *, user: str, app: str | None = None) -> bool:
        svc = self.service
        return await svc.stop(svc.scope(app, user, any_app=True), task_id)

    async def conversations(
        self, *, user: str, app: str | None = None, limit: int = 20, last_id: str | None = None,
        sort_by: str = "-updated_at",
    ) -> list[Conversation]:
        svc = self.service
        rows, _ = await svc.conversations(svc.scope(app, user), limit=limit, last_id=last_id, sort_by=sort_by)
        return [_conv(r) for r in rows]

    async def compact(
        self, conversation_id: str, *, user: str, app: str | None = None, tip_id: str | None = None,
        engine: str | None = None,
    ) -> Compaction:
        """Fold the conversation's turns (its current branch, or the branch ending at message
        `tip_id`) into a summary written by an engine; its next turns send the summary, as system
        text, in place of those turns. Returns the summary's id and text, `through_id` (the last
        message it covers) and `usage`. `engine`: who writes it (default: the app's
        `summary_engine`, else its own engine if stateless; a Dify app needs `summary_engine`)."""
        svc = self.service
        return await svc.compact(svc.scope(app, user, any_app=True), conversation_id, tip_id=tip_id, engine=engine)

    async def conversation(self, conversation_id: str, *, user: str, app: str | None = None) -> Conversation:
        svc = self.service
        return _conv(await svc.conversation(svc.scope(app, user, any_app=True), conversation_id))

    async def messages(
        self, conversation_id: str, *, user: str, app: str | None = None, limit: int = 1000,
        before_seq: int | None = None, tip_id: str | None = None,
    ) -> list[Message]:
        """Oldest first; the newest `limit` messages (older pages via `before_seq`), each with its
        typed `items` (images, function calls, function results). A conversation with branches
        lists its current branch (the newest), or the branch ending at message `tip_id`."""
        svc = self.service
        rows, _ = await svc.messages(svc.scope(app, user, any_app=True), conversation_id, before_seq=before_seq,
                                     limit=limit, tip_id=tip_id)
        return [_msg(r) for r in rows]

    async def rename_conversation(self, conversation_id: str, name: str, *, user: str,
                                  app: str | None = None) -> Conversation:
        svc = self.service
        return _conv(await svc.rename(svc.scope(app, user, any_app=True), conversation_id, name))

    async def delete_conversation(self, conversation_id: str, *, user: str, app: str | None = None) -> None:
        svc = self.service
        await svc.delete(svc.scope(app, user, any_app=True), conversation_id)

    async def upload(self, data: bytes | str | Path, *, user: str, app: str | None = None, name: str | None = None,
                     mime_type: str | None = None) -> str:
        """Store an image Threadline holds the bytes of; pass its id in `files=[...]`."""
        if isinstance(data, str | Path):
            p = Path(data)
            name = name or p.name
            data = await asyncio.to_thread(p.read_bytes)
        name = name or "upload.bin"
        mime = mime_type or sniff_image_type(data) or "application/octet-stream"
        svc = self.service
        row = await svc.upload(svc.scope(app, user), name=name, data=data, mime_type=mime,
                               extension=guess_extension(name))
        return str(row["id"])

    async def import_dify_conversation(
        self, remote_conversation_id: str, *, user: str, app: str | None = None, engine: str | None = None,
        remote_user: str | None = None,
    ) -> Conversation:
        """Pull an existing Dify conversation's history (paged via first_id/has_more) into Threadline."""
        from .dify_import import import_dify_conversation

        svc = self.service
        return _conv(await import_dify_conversation(svc, svc.scope(app, user), remote_conversation_id,
                                                    engine=engine, remote_user=remote_user))

    async def aclose(self) -> None:
        """Close the engines' HTTP sessions and the store. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self.gateway.close()

    async def __aenter__(self) -> AsyncThreadline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class _Loop:
    """A private event loop in a daemon thread, for the sync facade. `close` runs a last coroutine on
    it (the core's `aclose`), stops and closes the loop and ends the thread; it acts at most once."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.closed = False
        self._lock = threading.Lock()
        self._last: asyncio.Task[None] | None = None
        self.thread = threading.Thread(target=self._main, name="threadline-loop", daemon=True)
        self.thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
            # As asyncio.run() ends: what still runs (a turn's producer the close cancelled) finishes
            # its clean-up before the async generators are closed and the loop with them.
            tasks = asyncio.all_tasks(self.loop)
            for task in tasks:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        finally:
            self.loop.close()

    def run(self, coro: Coroutine[Any, Any, R]) -> R:
        if self.closed:
            coro.close()
            raise RuntimeError("this Threadline is closed")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def iterate(self, agen: AsyncIterator[T], owner: object) -> Iterator[T]:
        """`agen`, step by step on the loop. `owner` (the Threadline) is held while iterating, so
        `Threadline(...).stream(...)` is not closed by garbage collection under its own stream."""
        try:
            while True:
                try:
                    yield self.run(_step(agen))
                except StopAsyncIteration:
                    return
        finally:
            # Breaking out of the loop (or Ctrl-C) closes the turn: the partial answer is kept as stopped.
            aclose = getattr(agen, "aclose", None)
            if aclose is not None and not self.closed:
                self.run(aclose())
            del owner

    def close(self, last: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Await `last()` on the loop, then stop the loop and end its thread. Safe from any thread and
        any number of times; from the loop's own thread (a garbage collection there) it cannot wait,
        so it schedules the same and returns."""
        with self._lock:
            if self.closed:
                return
            self.closed = True

        async def final() -> None:
            try:
                await last()
            finally:
                asyncio.get_running_loop().stop()

        if threading.current_thread() is self.thread:
            def schedule() -> None:
                self._last = self.loop.create_task(final())

            self.loop.call_soon_threadsafe(schedule)
            return
        try:
            asyncio.run_coroutine_threadsafe(final(), self.loop).result(timeout=CLOSE_TIMEOUT)
        finally:
            self.thread.join(timeout=CLOSE_TIMEOUT)


def _twin_metadata(method: Any, fn: Any, *, iterator: bool) -> None:
    """Give the generated sync method its async twin's name, docstring and signature (what
    `inspect.signature`, `help()` and IDEs read); only the return annotation changes for a stream."""
    method.__name__ = fn.__name__
    method.__qualname__ = fn.__qualname__.removeprefix("Async")  # AsyncThreadline.chat -> Threadline.chat
    method.__module__ = fn.__module__
    method.__doc__ = fn.__doc__
    sig = inspect.signature(fn)
    ann = dict(fn.__annotations__)
    if iterator:
        ret = str(sig.return_annotation).replace("AsyncIterator[", "Iterator[", 1)
        sig = sig.replace(return_annotation=ret)
        ann["return"] = ret
    method.__signature__ = sig
    method.__annotations__ = ann


def _sync(fn: Callable[Concatenate[Any, P], Coroutine[Any, Any, R]]) -> Callable[Concatenate[Any, P], R]:
    """The blocking twin of the async method `fn`: runs `fn` on the owner's private loop, on the
    owner's async core (`self._core`)."""

    def method(self: Any, /, *args: P.args, **kwargs: P.kwargs) -> R:
        loop: _Loop = self._loop
        return loop.run(fn(self._core, *args, **kwargs))

    _twin_metadata(method, fn, iterator=False)
    return method


def _sync_iter(fn: Callable[Concatenate[Any, P], AsyncIterator[T]]) -> Callable[Concatenate[Any, P], Iterator[T]]:
    """The iterator twin of the async generator method `fn`; breaking out of it closes the stream."""

    def method(self: Any, /, *args: P.args, **kwargs: P.kwargs) -> Iterator[T]:
        loop: _Loop = self._loop
        return loop.iterate(fn(self._core, *args, **kwargs), self)

    _twin_metadata(method, fn, iterator=True)
    return method


class Memory:
    """Synchronous twin of AsyncMemory (`Threadline.memory`)."""

    def __init__(self, owner: Threadline) -> None:
        self._owner = owner  # held: `Threadline(...).memory.add(...)` must not close the owner under it
        self._loop = owner._loop
        self._core = owner._async.memory

    add = _sync(AsyncMemory.add)
    list = _sync(AsyncMemory.list)
    delete = _sync(AsyncMemory.delete)


class Threadline:
    """Synchronous twin of AsyncThreadline (same methods, same signatures, no await).

    Close it with `close()` or `with Threadline(...) as tl:`; one left open is closed when it is
    garbage-collected or, at the latest, when the interpreter exits."""

    def __init__(
        self,
        database_url: str | None = None,
        engines: dict[str, dict[str, Any]] | None = None,
        apps: dict[str, dict[str, Any]] | None = None,
        *,
        settings: Settings | None = None,
        default_engine: str | None = None,
        include_presets: bool = True,
    ) -> None:
        self._loop = _Loop()
        try:
            self._async = AsyncThreadline(database_url, engines, apps, settings=settings,
                                          default_engine=default_engine, include_presets=include_presets)
        except BaseException:
            self._loop.close(_nothing)
            raise
        self._core = self._async
        self.settings = self._async.settings
        # Neither argument refers back to self: the instance stays collectable, and the finalizer
        # runs once, on close(), on garbage collection or at interpreter exit, whichever comes first.
        self._finalizer = weakref.finalize(self, self._loop.close, self._async.aclose)

    @property
    def memory(self) -> Memory:
        return Memory(self)

    @classmethod
    def from_config(cls, path: str | Path) -> Threadline:
        return cls(settings=Settings.from_file(path))

    chat = _sync(AsyncThreadline.chat)
    regenerate = _sync(AsyncThreadline.regenerate)
    edit = _sync(AsyncThreadline.edit)
    stream = _sync_iter(AsyncThreadline.stream)
    stop = _sync(AsyncThreadline.stop)
    compact = _sync(AsyncThreadline.compact)
    conversations = _sync(AsyncThreadline.conversations)
    conversation = _sync(AsyncThreadline.conversation)
    messages = _sync(AsyncThreadline.messages)
    rename_conversation = _sync(AsyncThreadline.rename_conversation)
    delete_conversation = _sync(AsyncThreadline.delete_conversation)
    upload = _sync(AsyncThreadline.upload)
    import_dify_conversation = _sync(AsyncThreadline.import_dify_conversation)

    @property
    def closed(self) -> bool:
        return self._loop.closed

    def close(self) -> None:
        """Close the engines' HTTP sessions, the store and the private loop's thread. Idempotent."""
        self._finalizer()

    def __enter__(self) -> Threadline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _step(agen: AsyncIterator[T]) -> T:
    return await agen.__anext__()


async def _nothing() -> None:
    return None
