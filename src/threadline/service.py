"""The one conversation service every surface goes through: Dify-style and OpenAI-style routes,
the Python API, the CLI and the web page.

It owns (app, user) scoping. Before it, the surfaces called the store directly at 32 sites, each
with its own copy of the ownership check, and the copies drifted: the Python API's `messages()` and
`delete_conversation()` skipped the app check when `app` was left out, so a caller with the same user
name in another app read and deleted that app's conversation, while `conversation()` answered
not-found for the same id; the file preview skipped the owner check when `user` was absent. Now
every operation takes a `Scope` — an app that exists and a valid user, resolved once — and the store
is asked only with both, so another user's or another app's id is not-found everywhere, the same
way, by construction (tests/test_ownership.py drives every route and method through one table).

httpx has one `Client` and one transport interface for the same reason: one place owns the rules.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .compaction import SUMMARY_ROLE, Compaction
from .errors import InvalidParamError, NotFoundError, SuggestionsDisabledError
from .gateway import Gateway, check_user
from .messages import TurnEvent
from .store.store import ROOT_PARENT, new_id
from .tokens import estimate_text
from .turns import PastMessage, TurnRequest, counted_hash, history_hash


@dataclass(frozen=True, slots=True)
class Scope:
    """Who is asking: an app that exists (None: any app, for the Python API's id-based calls made
    without one) and a user id the store can hold."""

    app: str | None
    user: str

    @property
    def own_app(self) -> str:
        """The app, for operations that create or list (never run in an any-app scope)."""
        if self.app is None:
            raise InvalidParamError("app is required for this operation")
        return self.app


class ConversationService:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.store = gateway.store

    async def start(self) -> None:
        await self.gateway.start()

    def scope(self, app: str | None, user: str, *, any_app: bool = False) -> Scope:
        """Resolve the caller's app and check the user, once per call. Without an app: the default
        app, or with `any_app` (an operation on an id the caller holds, in the Python API: the
        library's caller holds every app) the id's own app, the user still checked."""
        check_user(user)
        if app is None and any_app:
            return Scope(None, user)
        return Scope(self.gateway.app_config(app).name, user)

    # ---- turns -----------------------------------------------------------------------------------

    def turn(self, scope: Scope, req: TurnRequest) -> AsyncGenerator[TurnEvent, None]:
        """Run one turn in `scope` (the request's own app and user are replaced by the scope's). In
        an any-app scope, a turn continuing a conversation runs in that conversation's app. The
        gateway's own generator is handed back when nothing is to be looked up first (no extra
        generator layer on the turn path of the HTTP routes)."""
        if scope.app is None and req.conversation_id is not None:
            return self._turn_in_its_app(scope, req)
        if req.app != scope.app or req.user != scope.user:
            req = replace(req, app=scope.app, user=scope.user)
        return self.gateway.turn(req)

    async def _turn_in_its_app(self, scope: Scope, req: TurnRequest) -> AsyncGenerator[TurnEvent, None]:
        app = (await self.conversation(scope, req.conversation_id or ""))["app"]
        # Closed with this generator, not by a finalizer later: a caller leaving early has its partial
        # answer stored before the next turn of the conversation can begin.
        async with contextlib.aclosing(self.gateway.turn(replace(req, app=app, user=scope.user))) as turn:
            async for ev in turn:
                yield ev

    async def stop(self, scope: Scope, task_id: str) -> bool:
        return await self.gateway.stop(task_id, user=scope.user, app=scope.app)

    async def compact(self, scope: Scope, conversation_id: str, *, tip_id: str | None = None,
                      engine: str | None = None) -> Compaction:
        """Fold a conversation's branch (the current one, or the one ending at `tip_id`) into a
        summary its next turns send instead of those turns (compaction.py). Written by `engine`, else
        the app's `summary_engine`, else the app's own engine if it is stateless; a Dify app without
        `summary_engine` is refused (CompactionUnavailableError). Another's conversation: not-found."""
        return await self.gateway.compact(app=scope.app, user=scope.user, conversation_id=conversation_id,
                                          tip_id=tip_id, engine=engine)

    # ---- conversations ---------------------------------------------------------------------------

    async def conversations(self, scope: Scope, *, limit: int = 20, last_id: str | None = None,
                            sort_by: str = "-updated_at") -> tuple[list[dict[str, Any]], bool]:
        await self.start()
        return await self.store.list_conversations(app=scope.app, user=scope.user, last_id=last_id, limit=limit,
                                                   sort_by=sort_by)

    async def conversation(self, scope: Scope, conversation_id: str) -> dict[str, Any]:
        await self.start()
        return await self.store.get_conversation(conversation_id, app=scope.app, user=scope.user)

    async def rename(self, scope: Scope, conversation_id: str, name: str | None = None, *,
                     auto_generate: bool = False) -> dict[str, Any]:
        """Rename; with `auto_generate`, the first question's first line unless it has a name."""
        conv = await self.conversation(scope, conversation_id)
        if auto_generate:
            first, _ = await self.store.turns_page(conversation_id, first_id=None, limit=1)
            name = conv["name"] or (first[0][0]["content"][:60] if first and first[0][0] else "New conversation")
        else:
            name = (name or "").replace("\x00", "").strip()[:255]
            if not name:
                raise InvalidParamError("name is required when auto_generate is false")
        return await self.store.rename_conversation(conversation_id, app=scope.app, user=scope.user, name=name)

    async def delete(self, scope: Scope, conversation_id: str) -> None:
        await self.start()
        await self.store.delete_conversation(conversation_id, app=scope.app, user=scope.user)

    async def messages(self, scope: Scope, conversation_id: str, *, before_seq: int | None = None,
                       limit: int = 100, tip_id: str | None = None) -> tuple[list[dict[str, Any]], bool]:
        """Oldest first: the newest `limit` messages older than `before_seq` of the current branch
        (the one ending at the newest message, or at `tip_id`)."""
        conv = await self.conversation(scope, conversation_id)
        if not conv.get("forked") and tip_id is None:
            return await self.store.list_messages(conversation_id, before_seq=before_seq, limit=limit)
        rows = await self._branch(conversation_id, tip_id)
        if before_seq is not None:
            rows = [r for r in rows if r["seq"] < before_seq]
        return rows[-limit:] if limit else [], len(rows) > limit

    async def _branch(self, conversation_id: str, tip_id: str | None) -> list[dict[str, Any]]:
        rows = await self.store.branch(conversation_id, tip_id)
        if tip_id is not None and (not rows or rows[-1]["id"] != tip_id):
            raise NotFoundError("Message Not Exists.")
        return rows

    async def turns(self, scope: Scope, conversation_id: str, *, first_id: str | None,
                    limit: int) -> tuple[list[tuple[dict[str, Any] | None, dict[str, Any]]], bool]:
        """Dify-style paging: (question, answer) pairs of the current branch, newest page first."""
        conv = await self.conversation(scope, conversation_id)
        if not conv.get("forked"):
            return await self.store.turns_page(conversation_id, first_id=first_id, limit=limit)
        rows = await self.store.branch(conversation_id)
        by_id = {r["id"]: r for r in rows}
        pairs = [(by_id.get(r.get("parent_id") or ""), r) for r in rows if r["role"] == "assistant"]
        if first_id:
            at = next((i for i, (_, a) in enumerate(pairs) if a["id"] == first_id), None)
            if at is None:
                raise NotFoundError("First Message Not Exists.")
            pairs = pairs[:at]
        return pairs[-limit:], len(pairs) > limit

    async def branch_point(self, scope: Scope, message_id: str) -> tuple[dict[str, Any], str]:
        """For regenerate and edit: a question of the caller's conversations and the answer it
        followed (ROOT_PARENT for the first question), so a new turn can start a branch there."""
        await self.start()
        msg = await self.store.get_message(message_id)
        if msg is None or msg["role"] == SUMMARY_ROLE:  # a summary is no question to ask again
            raise NotFoundError("Message Not Exists.")
        try:  # another's message answers exactly as a missing one
            await self.conversation(scope, msg["conversation_id"])
        except NotFoundError:
            raise NotFoundError("Message Not Exists.") from None
        if msg["role"] == "assistant":  # an answer: its question
            msg = await self.store.get_message(msg.get("parent_id") or "")
            if msg is None:
                raise NotFoundError("Message Not Exists.")
        parent = msg.get("parent_id")
        if not parent:
            before = [r for r in await self.store.branch(msg["conversation_id"], msg["id"]) if r["seq"] < msg["seq"]]
            parent = before[-1]["id"] if before else ROOT_PARENT
        return msg, parent

    async def message(self, scope: Scope, message_id: str) -> dict[str, Any]:
        """One answer of the caller's own conversations (not-found otherwise)."""
        await self.start()
        msg = await self.store.get_message(message_id)
        if msg is None or msg["role"] != "assistant":
            raise NotFoundError("Message Not Exists.")
        try:
            await self.store.get_conversation(msg["conversation_id"], app=scope.app, user=scope.user)
        except NotFoundError:
            raise NotFoundError("Message Not Exists.") from None
        return msg

    async def feedback(self, scope: Scope, message_id: str, rating: str | None, content: str | None) -> None:
        msg = await self.message(scope, message_id)
        if rating is None and not msg.get("feedback"):
            raise InvalidParamError("rating cannot be None when feedback not exists")
        content = content.replace("\x00", "") if content else content
        now = time.time()
        old = msg.get("feedback") or {}
        # When it was first given and last changed, for GET /v1/app/feedbacks (older rows have neither).
        fb = {"rating": rating, "content": content, "created_at": old.get("created_at") or now, "updated_at": now}
        await self.store.update_message(msg["id"], feedback=fb if rating else None)

    async def suggested(self, scope: Scope, message_id: str) -> list[str]:
        """Follow-up questions after one of the caller's answers, as Dify answers GET
        /messages/{id}/suggested: the message is checked first (another's or a missing one is not
        found), then whether the app suggests at all."""
        msg = await self.message(scope, message_id)
        app = self.gateway.app_config(scope.own_app)
        if not app.suggested_questions_after_answer:
            raise SuggestionsDisabledError("Suggested Questions Is Disabled.")
        question = await self.store.get_message(msg.get("parent_id") or "") if msg.get("parent_id") else None
        return await self.gateway.suggest(app.name, scope.user, msg, (question or {}).get("content") or "")

    async def app_feedbacks(self, app: str, *, page: int, limit: int) -> list[dict[str, Any]]:
        """Every feedback on `app`'s answers, whoever gave it, the latest first (an app's own view,
        as Dify's GET /app/feedbacks: the key is the app's, so no user scope)."""
        await self.start()
        return await self.store.app_feedbacks(app=app, offset=(page - 1) * limit, limit=limit)

    async def find_conversation(self, scope: Scope, history: Sequence[PastMessage]) -> str | None:
        """The newest stored conversation whose messages are exactly `history` (an OpenAI client
        resends its whole list): same roles, texts and function call/result ids."""
        await self.start()
        digest = ""
        for m in history:
            digest = history_hash(digest, m.role, m.text, m.items)
        return await self.store.find_by_history(app=scope.own_app, user=scope.user,
                                                history_hash=counted_hash(len(history), digest))

    # ---- the key-owned surfaces: OpenAI Responses and Conversations -----------------------------
    # There a key owns what its app made, as an OpenAI key owns its project's responses: `user` is a
    # label the caller sets (OpenAI's safety identifier), and a retrieve or delete carries none. So
    # ownership is the app; a conversation started on another surface keeps its own user.

    async def owned(self, app: str, conversation_id: str) -> tuple[Scope, dict[str, Any]]:
        """A conversation of `app` and the scope it lives in (its own user)."""
        await self.start()
        conv = await self.store.conversation_in_app(conversation_id, app=app)
        return Scope(app, conv["user"]), conv

    async def answer_in_app(self, app: str, message_id: str) -> tuple[Scope, dict[str, Any]]:
        """An answer of `app`'s conversations, and its conversation's scope."""
        await self.start()
        msg = await self.store.message_with_owner(message_id)  # the row and its owner in one read
        if msg is None or msg["role"] != "assistant" or msg.pop("_app") != app:
            raise NotFoundError("Message Not Exists.")
        return Scope(app, msg.pop("_user")), msg

    async def summary_in_app(self, app: str, summary_id: str) -> tuple[Scope, dict[str, Any]]:
        """A compaction summary of `app`'s conversations, and its conversation's scope."""
        await self.start()
        row = await self.store.get_message(summary_id)
        if row is None or row["role"] != SUMMARY_ROLE:
            raise NotFoundError("Summary Not Exists.")
        try:
            scope, _ = await self.owned(app, row["conversation_id"])
        except NotFoundError:
            raise NotFoundError("Summary Not Exists.") from None
        return scope, row

    async def import_history(self, scope: Scope, engine: str, history: Sequence[PastMessage]) -> str:
        """Store messages a caller already had as a new conversation of `scope` (no turn runs)."""
        return await self.gateway.import_history(app=scope.own_app, user=scope.user, engine=engine, messages=history)

    async def question_of(self, scope: Scope, answer: dict[str, Any]) -> dict[str, Any] | None:
        """The question an answer (already checked for `scope`) answers."""
        q = await self.store.get_message(answer.get("parent_id") or "")
        return q if q is not None and q["conversation_id"] == answer["conversation_id"] else None

    async def branch_rows(self, scope: Scope, conversation_id: str, tip_id: str | None = None) -> list[dict[str, Any]]:
        """Every message of the branch ending at `tip_id` (default: the newest), oldest first."""
        await self.conversation(scope, conversation_id)
        return await self._branch(conversation_id, tip_id)

    async def set_response(self, scope: Scope, message_id: str, response: dict[str, Any]) -> None:
        """Replace what a Responses answer records about its request (e.g. deleted)."""
        await self.store.update_message(message_id, response=response)

    async def set_metadata(self, scope: Scope, conversation_id: str, meta: dict[str, str] | None) -> dict[str, Any]:
        conv = await self.conversation(scope, conversation_id)
        await self.store.set_conversation_fields(conversation_id, meta=meta)
        conv["meta"] = meta
        return conv

    async def create_conversation(self, scope: Scope, *, meta: dict[str, str] | None,
                                  rows: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """A new conversation of `scope`, holding finished messages `rows` (the Conversations API's
        create): one transaction. Named after its first question, as a first turn names one."""
        await self.start()
        app = self.gateway.app_config(scope.own_app)
        first = next((r.get("content") or "" for r in rows if r["role"] == "user" and (r.get("content") or "").strip()), "")
        cid = new_id()
        conv: dict[str, Any] = {"id": cid, "app": app.name, "user": scope.user, "engine": app.engine,
                "name": first.strip().splitlines()[0][:60] if first.strip() else "", "meta": meta}
        written = await self.gateway.change_messages(cid, new_rows=rows, new_conversation=conv)
        return await self.conversation(scope, cid), written

    async def append_messages(self, scope: Scope, conversation_id: str,
                              rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Finished messages after the conversation's newest one, never inside a running turn."""
        await self.conversation(scope, conversation_id)
        return await self.gateway.change_messages(conversation_id, new_rows=rows)

    async def edit_message(self, scope: Scope, conversation_id: str, message_id: str,
                           change: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        """Apply `change` (row → values to set) to one message of the conversation, read and written
        in one transaction outside any running turn (e.g. blanking a deleted item: rows stay, so
        the tree that later messages hang from does not move)."""
        await self.conversation(scope, conversation_id)
        return (await self.gateway.change_messages(conversation_id, edit=(message_id, change)))[0]

    async def purge(self, scope: Scope, conversation_id: str) -> None:
        """Remove a conversation for good (what a `store: false` response ran in)."""
        await self.conversation(scope, conversation_id)
        await self.gateway.purge(conversation_id)

    # ---- files -----------------------------------------------------------------------------------

    async def upload(self, scope: Scope, *, name: str, data: bytes, mime_type: str,
                     extension: str) -> dict[str, Any]:
        await self.start()
        return await self.store.add_file(app=scope.own_app, user=scope.user, name=name.replace("\x00", "")[:255],
                                         data=data, mime_type=mime_type[:128], extension=extension[:32])

    async def file(self, scope: Scope, file_id: str) -> dict[str, Any]:
        await self.start()
        return await self.store.get_file(file_id, app=scope.app, user=scope.user)

    async def signed_file(self, file_id: str) -> dict[str, Any]:
        """A file by id alone, for a request whose signed URL the server verified first: the
        signature is the permission (the server signed it for a caller the owner check let see it)."""
        await self.start()
        return await self.store.get_file(file_id, app=None, user=None)

    async def server_secret(self, name: str, make: Callable[[], str]) -> str:
        await self.start()
        return await self.store.server_secret(name, make)

    # ---- long-term memory ------------------------------------------------------------------------

    async def remember(self, scope: Scope, text: str) -> dict[str, Any]:
        text = text.replace("\x00", "").strip()
        if not text:
            raise InvalidParamError("memory text is empty")
        await self.start()
        return await self.store.add_memory(app=scope.own_app, user=scope.user, text=text,
                                           token_estimate=estimate_text(text) + 2)

    async def memories(self, scope: Scope) -> list[dict[str, Any]]:
        await self.start()
        return await self.store.list_memory(app=scope.own_app, user=scope.user)

    async def forget(self, scope: Scope, memory_id: str) -> None:
        await self.start()
        await self.store.delete_memory(memory_id, app=scope.own_app, user=scope.user)

    # ---- imports ---------------------------------------------------------------------------------

    async def import_pairs(self, scope: Scope, *, engine: str, turns: list[dict[str, Any]], name: str = "",
                           remote: tuple[str, int] | None = None) -> dict[str, Any]:
        """A new conversation of finished turns (a Dify export); `remote`: the engine's own
        conversation id and how many messages it has seen."""
        cid = await self.gateway.import_pairs(app=scope.own_app, user=scope.user, engine=engine, turns=turns, name=name)
        if remote is not None:
            await self.store.set_remote(cid, engine, remote[0], remote[1])
        return await self.conversation(scope, cid)
