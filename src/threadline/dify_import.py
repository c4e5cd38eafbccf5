"""Pull an existing Dify conversation into Threadline, so it can continue on any engine."""

from __future__ import annotations

from typing import Any

from .engines.dify import DifyEngine
from .errors import InvalidParamError
from .gateway import Gateway


async def import_dify_conversation(gw: Gateway, remote_conversation_id: str, *, user: str, app: str | None,
                                   engine: str | None, remote_user: str | None) -> dict[str, Any]:
    app_cfg = gw.app_config(app, engine)
    eng_name = engine or app_cfg.engine
    eng = gw.engine(eng_name)
    if not isinstance(eng, DifyEngine):
        raise InvalidParamError(f"engine {eng_name!r} is not a Dify engine")
    ruser = remote_user or gw.remote_user(app_cfg.name, user)
    items = await eng.list_messages(remote_conversation_id, ruser)
    cid = await gw.import_pairs(app=app_cfg.name, user=user, engine=eng_name, name=(items[0].get("query") or "")[:60]
                                if items else "",
                                turns=[{"query": (m.get("query") or "").replace("\x00", ""),
                                        "answer": (m.get("answer") or "").replace("\x00", ""),
                                        "remote_id": m.get("id"), "inputs": m.get("inputs") or None,
                                        "status": "failed" if m.get("status") == "error" else "completed"}
                                       for m in items])
    if remote_user is None or remote_user == gw.remote_user(app_cfg.name, user):
        await gw.store.set_remote(cid, eng_name, remote_conversation_id, 2 * len(items))
    return await gw.store.get_conversation(cid, app=app_cfg.name, user=user)
