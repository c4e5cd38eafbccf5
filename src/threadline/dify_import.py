"""Pull an existing Dify conversation into Threadline, so it can continue on any engine."""

from __future__ import annotations

from typing import Any

from .engines.dify import DifyEngine
from .errors import InvalidParamError
from .service import ConversationService, Scope


async def import_dify_conversation(service: ConversationService, scope: Scope, remote_conversation_id: str, *,
                                   engine: str | None, remote_user: str | None) -> dict[str, Any]:
    gw = service.gateway
    app_cfg = gw.app_config(scope.app, engine)
    eng_name = engine or app_cfg.engine
    eng = gw.engine(eng_name)
    if not isinstance(eng, DifyEngine):
        raise InvalidParamError(f"engine {eng_name!r} is not a Dify engine")
    ruser = remote_user or gw.remote_user(scope.own_app, scope.user)
    items = await eng.list_messages(remote_conversation_id, ruser)
    # The remote conversation is ours to continue only when it is this user's own there.
    ours = remote_user is None or remote_user == gw.remote_user(scope.own_app, scope.user)
    return await service.import_pairs(
        scope, engine=eng_name, name=(items[0].get("query") or "")[:60] if items else "",
        turns=[{"query": (m.get("query") or "").replace("\x00", ""),
                "answer": (m.get("answer") or "").replace("\x00", ""),
                "remote_id": m.get("id"), "inputs": m.get("inputs") or None,
                "status": "failed" if m.get("status") == "error" else "completed"} for m in items],
        remote=(remote_conversation_id, 2 * len(items)) if ours else None)
