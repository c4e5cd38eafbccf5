"""`threadline` — serve, chat, conversations, show, engines, keys.

The CLI is a thin caller of the core (AsyncThreadline / Gateway); it holds no turn logic.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import getpass
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .api import AsyncThreadline
from .config import Settings
from .errors import ThreadlineError
from .messages import FunctionCall, FunctionResult, ReasoningDelta, TextDelta, TurnCompleted, TurnStarted

T = TypeVar("T")

app = typer.Typer(add_completion=False, no_args_is_help=True, help="One conversation API for every chat engine.")
keys_app = typer.Typer(no_args_is_help=True, help="Manage app keys for the HTTP API.")
app.add_typer(keys_app, name="keys")
console = Console()
err = Console(stderr=True)

ConfigOpt = Annotated[str | None, typer.Option("--config", help="Path to threadline.toml.")]


def load_settings(config: str | None) -> Settings:
    path = config or os.environ.get("THREADLINE_CONFIG")
    if path is None and Path("threadline.toml").exists():
        path = "threadline.toml"
    return Settings.from_file(path)


def _call(config: str | None, fn: Callable[[AsyncThreadline], Awaitable[T]]) -> T:
    """Open the core, make one call, close it; a ThreadlineError becomes a clean CLI error."""

    async def run() -> T:
        tl = AsyncThreadline(settings=load_settings(config))
        try:
            return await fn(tl)
        finally:
            await tl.aclose()

    try:
        return asyncio.run(run())
    except ThreadlineError as exc:
        _fail(exc)
        raise


def _fail(exc: ThreadlineError) -> None:
    err.print(f"[red]error[/red] {escape(f'[{exc.code}] {exc.message}')}")
    raise typer.Exit(1)


@app.command()
def serve(
    config: ConfigOpt = None,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    open_access: Annotated[bool, typer.Option("--open", help="Local single-user mode: no app key needed.")] = False,
    workers: Annotated[int, typer.Option(min=1, help="Server processes sharing the port (one per core uses "
                                                     "them all; turns coordinate through the store).")] = 1,
    reuse_port: Annotated[bool, typer.Option("--reuse-port", hidden=True)] = False,
    access_log: Annotated[bool | None, typer.Option(
        "--access-log/--no-access-log",
        help="One line per request on stderr: method, path, status, ms, app (default: on; "
             "[server] access_log = false turns it off).")] = None,
) -> None:
    """Run the HTTP server: Dify-compatible and OpenAI-compatible APIs, and the web page at /."""
    import uvicorn

    from .server.app import create_app, enable_access_log

    try:
        settings = load_settings(config)
    except ThreadlineError as exc:
        _fail(exc)
    if open_access and not reuse_port and host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"[bold red]WARNING[/bold red] open mode (--open) on {escape(host)}: no key is needed, so anyone who can "
                  f"reach this address can use every engine and read every conversation of the default app. Open "
                  f"mode answers only requests addressed to this host or a loopback name ([server] allowed_hosts "
                  f"adds more); use app keys (threadline keys create) to serve a network.")
    if not reuse_port:
        console.print(f"Threadline on http://{host}:{port}  (store: {settings.database_url.split('://')[0]}, "
                      f"default engine: {settings.default_engine or 'none'}, workers: {workers})")
    if reuse_port:
        _die_with_parent()
    if access_log is None:
        access_log = settings.server.access_log
    if workers == 1 or reuse_port:
        if access_log:
            enable_access_log()
        app_ = create_app(settings, open_access=open_access, own_process=True, listen_host=host)
        server = uvicorn.Server(uvicorn.Config(app_, host=host, port=port, log_level="info", access_log=False,
                                               loop="auto", http="auto"))
        sockets = None
        if reuse_port:  # one of `serve --workers N`: its own socket on the shared port
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sockets = [sock]
        server.run(sockets=sockets)
        if not server.started:  # as uvicorn.run: a server that never started (port taken ...) fails
            raise typer.Exit(3)
        return
    argv = [sys.executable, "-m", "threadline.cli", "serve", "--host", host, "--port", str(port), "--reuse-port",
            *(["--config", config] if config else []), *(["--open"] if open_access else []),
            "--access-log" if access_log else "--no-access-log"]
    _serve_workers(config, workers, argv)


PARENT_ENV = "THREADLINE_SERVE_PARENT"


def _die_with_parent() -> None:
    """A worker of `serve --workers N` stops (SIGTERM: it shuts down as when the parent stops it) when
    its parent dies, even by SIGKILL. Otherwise it went on serving the port, and a server started
    again after the crash ran its own workers beside the orphans. Linux only (prctl)."""
    import ctypes
    import signal

    parent = int(os.environ.get(PARENT_ENV) or 0)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if parent and os.getppid() != parent:  # the parent died before that took effect
        raise typer.Exit(1)


def _serve_workers(config: str | None, workers: int, argv: list[str]) -> None:
    """N processes, each with its own SO_REUSEPORT socket, so the kernel spreads connections evenly
    (with one shared socket the first process to wake accepts a whole burst of keep-alive
    connections and the others idle). Any process exiting stops the rest."""
    import signal
    import subprocess
    import time

    _call(config, lambda tl: tl.gateway.start())  # migrate once: workers never race each other's schema changes
    children = [subprocess.Popen(argv, env={**os.environ, PARENT_ENV: str(os.getpid())}) for _ in range(workers)]

    asked = False

    def stop(*_: object) -> None:
        nonlocal asked
        asked = True
        for c in children:
            if c.poll() is None:
                c.send_signal(signal.SIGINT)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not asked and all(c.poll() is None for c in children):
        time.sleep(0.2)
    crashed = not asked  # a worker exited by itself: stop the others and fail
    stop()
    for c in children:
        try:
            c.wait(15)
        except subprocess.TimeoutExpired:
            c.kill()
    if crashed:
        raise typer.Exit(1)


@app.command()
def chat(
    engine: Annotated[str | None, typer.Option("-e", "--engine", help="Engine for this session.")] = None,
    app_name: Annotated[str | None, typer.Option("-a", "--app", help="App (engine + system modules).")] = None,
    conversation: Annotated[str | None, typer.Option("-c", "--cid", help="Continue this conversation id.")] = None,
    cont: Annotated[bool, typer.Option("--continue", help="Continue the most recent conversation.")] = False,
    image: Annotated[list[str] | None, typer.Option("--image", help="Image URL for the first message.")] = None,
    user: Annotated[str | None, typer.Option("--user", help="User id (default: your login).")] = None,
    config: ConfigOpt = None,
) -> None:
    """A streaming chat REPL. Ctrl-C stops the answer and keeps what came; Ctrl-D quits."""
    user = user or getpass.getuser()
    asyncio.run(_chat(load_settings(config), engine, app_name, conversation, cont, image or [], user))


async def _chat(settings: Settings, engine: str | None, app_name: str | None, cid: str | None, cont: bool,
                images: list[str], user: str) -> None:
    tl = AsyncThreadline(settings=settings)
    try:
        if cont and not cid:
            convs = await tl.conversations(user=user, app=app_name, limit=1)
            cid = convs[0].id if convs else None
        if cid:
            for m in await tl.messages(cid, user=user, app=app_name, limit=20):
                style = "bold cyan" if m.role == "user" else ""
                console.print(f"[{style}]{m.role}>[/{style}] {m.content}" if style else f"{m.role}> {m.content}")
        label = engine or (settings.apps[app_name].engine if app_name in settings.apps else settings.default_engine)
        console.print(f"[dim]engine: {label} · Ctrl-C stops an answer · Ctrl-D quits[/dim]")
        while True:
            try:
                text = await asyncio.to_thread(console.input, "[bold cyan]you>[/bold cyan] ")
            except (EOFError, KeyboardInterrupt):
                console.print()
                return
            if not text.strip():
                continue
            task = asyncio.create_task(_one_turn(tl, text, user, app_name, cid, engine, images))
            try:
                cid = await asyncio.shield(task) or cid
            except (KeyboardInterrupt, asyncio.CancelledError):
                # Ctrl-C: stop this answer (the partial is kept as `stopped`) and stay in the REPL.
                task.cancel()
                with contextlib.suppress(BaseException):
                    cid = await task or cid
                current = asyncio.current_task()
                if current is not None:
                    current.uncancel()
            except ThreadlineError as exc:
                err.print(f"[red]error[/red] {escape(f'[{exc.code}] {exc.message}')}")
            images = []
    finally:
        await tl.aclose()


async def _one_turn(tl: AsyncThreadline, text: str, user: str, app_name: str | None, cid: str | None,
                    engine: str | None, images: list[str]) -> str | None:
    in_reasoning = False
    new_cid = cid
    try:
        async for ev in tl.stream(text, user=user, app=app_name, conversation_id=cid, engine=engine, images=images):
            if isinstance(ev, TurnStarted):
                new_cid = ev.conversation_id
            elif isinstance(ev, ReasoningDelta):
                if not in_reasoning:
                    console.print("[dim]thinking: [/dim]", end="")
                    in_reasoning = True
                console.print(ev.text, end="", markup=False, highlight=False, style="dim")
            elif isinstance(ev, TextDelta):
                if in_reasoning:
                    console.print()
                    in_reasoning = False
                console.print(ev.text, end="", markup=False, highlight=False)
            elif isinstance(ev, TurnCompleted):
                u = ev.reply.usage
                status = "" if ev.reply.status == "completed" else f" · {ev.reply.status}"
                console.print(f"\n[dim]{u.prompt_tokens} in · {u.completion_tokens} out"
                              f"{' (est.)' if u.estimated else ''} · {ev.reply.latency:.2f}s · "
                              f"{ev.reply.engine}{status}[/dim]")
    except asyncio.CancelledError:
        console.print("\n[dim](stopped; partial answer kept)[/dim]")
    return new_cid


@app.command()
def conversations(
    user: Annotated[str | None, typer.Option("--user")] = None,
    app_name: Annotated[str | None, typer.Option("-a", "--app")] = None,
    limit: int = 20,
    config: ConfigOpt = None,
) -> None:
    """List conversations, most recently updated first."""
    who = user or getpass.getuser()
    rows = _call(config, lambda tl: tl.conversations(user=who, app=app_name, limit=limit))
    t = Table("id", "name", "engine", "updated")
    for c in rows:
        t.add_row(c.id, c.name, c.engine, dt.datetime.fromtimestamp(c.updated_at).strftime("%Y-%m-%d %H:%M"))
    console.print(t)


@app.command()
def show(
    conversation_id: str,
    user: Annotated[str | None, typer.Option("--user")] = None,
    config: ConfigOpt = None,
) -> None:
    """Print a conversation's messages, with the function calls and outputs they carry. Takes the
    id any surface shows (a Conversations/Responses `conv_…` too). Conversations made by the OpenAI
    routes belong to user `openai-user` unless the request named a user: `--user openai-user`."""
    who = user or getpass.getuser()
    if conversation_id.startswith("conv_") and len(conversation_id) == 37:
        h = conversation_id[5:]
        conversation_id = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
    for m in _call(config, lambda tl: tl.messages(conversation_id, user=who)):
        extra = f" [{m.status}]" if m.status not in ("completed",) else ""
        for i in m.items:
            if isinstance(i, FunctionResult):
                console.print(f"[bold]tool[/bold] {escape(i.name or i.call_id)} → {escape(i.output)}", highlight=False)
        if m.content or not any(isinstance(i, FunctionCall | FunctionResult) for i in m.items):
            console.print(f"[bold]{m.role}[/bold] ({m.engine}){extra}: {escape(m.content)}", markup=True,
                          highlight=False)
        for i in m.items:
            if isinstance(i, FunctionCall):
                console.print(f"[bold]{m.role}[/bold] calls {escape(i.name)}({escape(i.arguments)}) "
                              f"[dim]{escape(i.call_id)}[/dim]", highlight=False)


@app.command()
def engines(config: ConfigOpt = None) -> None:
    """Configured engines and presets, whether each is usable, and why not."""
    s = load_settings(config)
    t = Table("engine", "kind", "model", "status")
    for name, e in s.engines.items():
        # escape: a reason such as 'pip install "threadline[local]"' is text, not Rich markup
        status = "[green]ready[/green]" if not e.missing else f"[yellow]unavailable[/yellow]: {escape(e.missing)}"
        if name == s.default_engine:
            status += " (default)"
        t.add_row(name, e.kind, e.model, status)
    console.print(t)


@keys_app.command("create")
def keys_create(
    app_name: Annotated[str, typer.Option("--app", help="App the key selects.")],
    rpm: Annotated[int | None, typer.Option("--rpm", help="Requests (turns) per minute this key may make.")] = None,
    tokens_per_day: Annotated[int | None, typer.Option("--tokens-per-day", help="Tokens per UTC day.")] = None,
    spend_per_day: Annotated[str | None, typer.Option("--spend-per-day", metavar="AMOUNT",
                                                      help="Spend cap per UTC day, in --currency.")] = None,
    currency: Annotated[str, typer.Option("--currency", help="Currency of --spend-per-day; only turns priced "
                                                             "in it count.")] = "USD",
    config: ConfigOpt = None,
) -> None:
    """Create an app key. It is printed once, alone on the last line; only its hash is stored.

    A key's limits apply on top of its app's ([apps.NAME.limits]) and are fixed for its life: to
    change them, create a new key and revoke the old one."""
    from .limits import parse_limits
    from .server.keys import create_key

    s = load_settings(config)
    if app_name not in s.apps and app_name != "default":
        err.print(f"[red]error[/red] app {app_name!r} is not configured")
        raise typer.Exit(1)
    raw = {"requests_per_minute": rpm, "tokens_per_day": tokens_per_day, "spend_per_day": spend_per_day,
           "currency": currency}
    try:
        limits = parse_limits({k: v for k, v in raw.items() if v is not None}, "key limits", concurrency=False)
    except ThreadlineError as exc:
        _fail(exc)
        raise
    key = asyncio.run(create_key(s, app_name, limits))
    console.print(f"Key for app {app_name!r} (shown once; limits: {limits.describe() if limits else 'none'}):",
                  highlight=False)
    print(key)


@keys_app.command("list")
def keys_list(config: ConfigOpt = None) -> None:
    from .limits import Limits
    from .server.keys import list_keys

    rows = asyncio.run(list_keys(load_settings(config)))
    t = Table("id", "prefix", "app", "revoked", "limits")
    for r in rows:
        limits = Limits.from_key_row(r)
        t.add_row(r["id"], r["prefix"] + "…", r["app"], "yes" if r["revoked"] else "no",
                  limits.describe() if limits else "none")
    console.print(t)


@keys_app.command("revoke")
def keys_revoke(key_id: str, config: ConfigOpt = None) -> None:
    """Revoke by key id or prefix."""
    from .server.keys import revoke_key

    n = asyncio.run(revoke_key(load_settings(config), key_id))
    if not n:
        err.print("[red]error[/red] no such key")
        raise typer.Exit(1)
    console.print(f"revoked {n} key(s)")


def main() -> None:
    app()


if __name__ == "__main__":  # the worker processes of `serve --workers N`
    main()
