"""Shared fixtures: live provider doubles on 127.0.0.1, and the real PostgreSQL (required, never skipped)."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.doubles.gemini_double import GeminiDouble
from tests.doubles.images import image_app
from tests.doubles.live import LiveServer
from tests.doubles.openai_double import OpenAIDouble

PG_ADMIN = os.environ.get("THREADLINE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def openai_double() -> Iterator[tuple[OpenAIDouble, str]]:
    d = OpenAIDouble()
    srv = LiveServer(d.app()).start()
    yield d, srv.url
    srv.stop()


@pytest.fixture(scope="session")
def gemini_double() -> Iterator[tuple[GeminiDouble, str]]:
    d = GeminiDouble()
    srv = LiveServer(d.app()).start()
    yield d, srv.url
    srv.stop()


@pytest.fixture(scope="session")
def image_host() -> Iterator[str]:
    srv = LiveServer(image_app()).start()
    yield srv.url
    srv.stop()


@pytest.fixture
def oai(openai_double: tuple[OpenAIDouble, str]) -> tuple[OpenAIDouble, str]:
    openai_double[0].reset()
    return openai_double


@pytest.fixture
def gem(gemini_double: tuple[GeminiDouble, str]) -> tuple[GeminiDouble, str]:
    gemini_double[0].reset()
    return gemini_double


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A throwaway database on the machine's PostgreSQL. Missing PostgreSQL fails the run loudly."""
    name = f"tl_test_{uuid.uuid4().hex[:10]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(PG_ADMIN, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    try:
        asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"PostgreSQL at {PG_ADMIN} is required for the store suite and is not reachable: {exc}")
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    yield f"{base}/{name}"
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/t.db"
    base = request.getfixturevalue("pg_database")
    # Each test gets a clean slate: drop and recreate the schema.

    async def reset() -> None:
        conn = await asyncpg.connect(base.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")
        finally:
            await conn.close()

    asyncio.run(reset())
    return base


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path}/t.db"


def engines_for(oai_url: str | None = None, gem_url: str | None = None, **extra: dict) -> dict[str, dict]:
    engines: dict[str, dict] = {}
    if oai_url:
        engines["acc"] = {"kind": "openai", "base_url": f"{oai_url}/v1", "api_key": "sk-test-double-key", "model": "m",
                          "max_retries": 2}
    if gem_url:
        engines["gem"] = {"kind": "gemini", "base_url": f"{gem_url}/v1beta", "api_key": "AIza-test-double-key-0000",
                          "model": "gemini-2.5-pro", "max_retries": 2}
    engines.update(extra)
    return engines


@pytest.fixture
async def atl(oai: tuple[OpenAIDouble, str], gem: tuple[GeminiDouble, str], sqlite_url: str) -> AsyncIterator:
    from threadline import AsyncThreadline

    tl = AsyncThreadline(database_url=sqlite_url, engines=engines_for(oai[1], gem[1]),
                         apps={"demo": {"engine": "acc", "system": ["You are terse.", "Answer in English."]},
                               "gdemo": {"engine": "gem", "system": ["You are terse."]}},
                         include_presets=False)
    yield tl
    await tl.aclose()
