"""The embedded default engine: a real SmolLM2-135M on the CPU via llama-cpp-python (the [local] extra)."""

from __future__ import annotations

import httpx

from tests.doubles.live import LiveServer
from threadline.config import Settings, local_engine_available
from threadline.server.app import create_app


def test_local_model_is_installed_for_ci():
    # CI installs the [local] extra; without it this suite must fail, not skip.
    assert local_engine_available() is None


def test_no_keys_server_turn_answers_from_the_real_local_model(tmp_path, monkeypatch):
    for var in ("NVIDIA_API_KEY", "XAI_API_KEY", "DEEPSEEK_API_KEY", "OPENAI_API_KEY", "GEMINI_API_KEY", "DIFY_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    settings = Settings.build(database_url=f"sqlite+aiosqlite:///{tmp_path}/l.db")
    assert settings.default_engine == "local"
    srv = LiveServer(create_app(settings, open_access=True)).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            r = c.post("/v1/chat-messages", json={"query": "What is the capital of France?", "user": "u", "inputs": {}})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["answer"].strip()
            r2 = c.post("/v1/chat-messages", json={"query": "Say it again.", "user": "u", "inputs": {},
                                                   "conversation_id": body["conversation_id"]})
            assert r2.status_code == 200 and r2.json()["answer"].strip()
            m = c.get("/v1/messages", params={"conversation_id": body["conversation_id"], "user": "u"}).json()
            assert len(m["data"]) == 2
    finally:
        srv.stop()
