"""A tiny image host on 127.0.0.1 for image-by-URL tests (allow-listed explicitly in engine config)."""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

ASSETS = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "dify" / "assets"


def png_bytes(name: str = "blue.png") -> bytes:
    p = ASSETS / name
    if p.exists():
        return p.read_bytes()
    # A valid 1x1 PNG, for a checkout without shared/ beside it.
    import base64

    return base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==")


def image_app(seen: list[tuple[str, str]] | None = None) -> Starlette:
    """`seen`, when given, gets (path, Host header) for every request the host answers."""

    def note(request: Request) -> None:
        if seen is not None:
            seen.append((request.url.path, request.headers.get("host", "")))

    async def img(request: Request) -> Response:
        note(request)
        return Response(png_bytes(request.path_params["name"]), media_type="image/png")

    async def redirect(request: Request) -> Response:
        note(request)
        return Response(status_code=302, headers={"location": request.query_params["to"]})

    return Starlette(routes=[Route("/img/{name}", img), Route("/redirect", redirect)])
