"""The Python API's shape and lifetime: every async method has a sync twin with the same signature, and
the library closes what it opens (engines' HTTP sessions, the store, the sync facade's loop thread)
whether the caller uses `with`, `async with`, or forgets to close at all."""

from __future__ import annotations

import gc
import inspect
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest

from threadline import AsyncThreadline, Threadline
from threadline.api import AsyncMemory, Memory
from threadline.messages import TextDelta, TurnCompleted

SRC = Path(__file__).resolve().parents[1] / "src"
RENAMED = {"aclose": "close"}  # async name -> sync name where they differ


def _public_async(cls: type) -> dict[str, object]:
    return {n: f for n, f in vars(cls).items() if not n.startswith("_")
            and (inspect.iscoroutinefunction(f) or inspect.isasyncgenfunction(f))}


@pytest.mark.parametrize(("acls", "scls"), [(AsyncThreadline, Threadline), (AsyncMemory, Memory)])
def test_every_async_method_has_a_sync_twin_with_the_same_signature(acls, scls):
    methods = _public_async(acls)
    assert methods, acls
    for name, afn in methods.items():
        sfn = getattr(scls, RENAMED.get(name, name), None)
        assert sfn is not None, f"{scls.__name__} has no twin of {acls.__name__}.{name}"
        asig, ssig = inspect.signature(afn), inspect.signature(sfn)
        assert list(ssig.parameters.values()) == list(asig.parameters.values()), name
        assert not any(p.kind is p.VAR_KEYWORD for p in ssig.parameters.values()), name
        expected_return = str(asig.return_annotation)
        if inspect.isasyncgenfunction(afn):
            assert expected_return.startswith("AsyncIterator[")
            expected_return = expected_return.replace("AsyncIterator[", "Iterator[", 1)
        assert str(ssig.return_annotation) == expected_return, name
        if name not in RENAMED:
            assert sfn.__doc__ == afn.__doc__ and sfn.__name__ == name
            assert sfn.__qualname__ == f"{scls.__name__}.{name}"
    # and nothing public on the sync side that the async side lacks
    sync_public = {n for n, f in vars(scls).items() if not n.startswith("_") and callable(f)}
    twins = {RENAMED.get(n, n) for n in methods}
    assert sync_public - twins <= {"from_config"}


def test_sync_twins_bind_like_methods_and_refuse_unknown_keywords(oai, tmp_path):
    with Threadline(database_url=f"sqlite+aiosqlite:///{tmp_path}/t.db", engines=_engines(oai[1]),
                    apps={"demo": {"engine": "acc"}}, include_presets=False) as tl:
        assert list(inspect.signature(tl.chat).parameters)[:3] == ["text", "user", "app"]
        with pytest.raises(TypeError, match="usr"):
            tl.chat("hi", usr="u", app="demo")  # type: ignore[call-arg]
        r = tl.chat("hi", user="u", app="demo")
        assert r.answer == "Answer to: hi"
        events = list(tl.stream("more", user="u", app="demo", conversation_id=r.conversation_id))
        assert any(isinstance(e, TextDelta) for e in events) and isinstance(events[-1], TurnCompleted)
        assert [m.role for m in tl.messages(r.conversation_id, user="u")] == ["user", "assistant"] * 2


def _engines(url: str) -> dict[str, dict[str, object]]:
    return {"acc": {"kind": "openai", "base_url": f"{url}/v1", "api_key": "sk-test-double-key", "model": "m"}}


def test_close_is_idempotent_and_a_closed_threadline_refuses_calls(tmp_path):
    tl = Threadline(database_url=f"sqlite+aiosqlite:///{tmp_path}/t.db", include_presets=False)
    loop = tl._loop
    tl.close()
    assert tl.closed and not loop.thread.is_alive() and loop.loop.is_closed()
    tl.close()  # twice: nothing happens
    with pytest.raises(RuntimeError, match="closed"):
        tl.conversations(user="u")


def test_a_forgotten_threadline_is_collectable_and_closed_when_collected(oai, tmp_path):
    tl = Threadline(database_url=f"sqlite+aiosqlite:///{tmp_path}/t.db", engines=_engines(oai[1]),
                    apps={"demo": {"engine": "acc"}}, include_presets=False)
    assert tl.chat("hi", user="u", app="demo").answer == "Answer to: hi"
    loop, ref = tl._loop, weakref.ref(tl)
    del tl
    gc.collect()
    assert ref() is None
    assert loop.closed and not loop.thread.is_alive() and loop.loop.is_closed()
    assert not (tmp_path / "t.db-wal").exists()  # SQLite's last connection closed cleanly


def test_a_temporary_threadline_lives_as_long_as_its_stream_or_memory(oai, tmp_path):
    kw = dict(database_url=f"sqlite+aiosqlite:///{tmp_path}/t.db", engines=_engines(oai[1]),
              apps={"demo": {"engine": "acc"}}, include_presets=False)
    stream = Threadline(**kw).stream("hi", user="u", app="demo")
    gc.collect()
    events = list(stream)
    assert events[-1].reply.answer == "Answer to: hi"
    del stream, events
    assert Threadline(**kw).memory.add(user="u", app="demo", text="likes tea").text == "likes tea"


SCRIPTS = {
    "with": """
        with Threadline(**KW) as tl:
            print(tl.chat("hi", user="u", app="demo").answer)
    """,
    "forgotten": """
        tl = Threadline(**KW)
        print(tl.chat("hi", user="u", app="demo").answer)
        print(next(iter(tl.stream("again", user="u", app="demo"))).__class__.__name__)
    """,
    "forgotten_in_a_function": """
        def f():
            tl = Threadline(**KW)
            print(tl.chat("hi", user="u", app="demo").answer)
        f()
    """,
    "async_with": """
        async def main():
            async with AsyncThreadline(**KW) as tl:
                print((await tl.chat("hi", user="u", app="demo")).answer)
        asyncio.run(main())
    """,
    "async_forgotten": """
        async def main():
            tl = AsyncThreadline(**KW)
            print((await tl.chat("hi", user="u", app="demo")).answer)
        asyncio.run(main())
    """,
}


@pytest.mark.parametrize("case", sorted(SCRIPTS))
def test_a_script_ends_with_everything_closed(case, oai, tmp_path):
    db = tmp_path / "x.db"
    script = textwrap.dedent(f"""
        import asyncio
        from threadline import AsyncThreadline, Threadline
        KW = dict(database_url="sqlite+aiosqlite:///{db}", engines={_engines(oai[1])!r},
                  apps={{"demo": {{"engine": "acc"}}}}, include_presets=False)
    """) + textwrap.dedent(SCRIPTS[case])
    proc = subprocess.run([sys.executable, "-W", "always::ResourceWarning", "-c", script], capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Answer to: hi\n")
    assert "Unclosed" not in proc.stderr and "ResourceWarning" not in proc.stderr and "unclosed" not in proc.stderr, \
        proc.stderr
    assert proc.stderr == ""
    assert db.exists() and not Path(f"{db}-wal").exists()  # SQLite's last connection was closed cleanly
