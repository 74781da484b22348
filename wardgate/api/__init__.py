"""HTTP API of the gateway (health for now; the exec API builds on it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

if TYPE_CHECKING:
    from ..app import Gateway


def create_app(gateway: "Gateway") -> Starlette:
    async def healthz(_: Request) -> JSONResponse:
        return JSONResponse(gateway.health(), status_code=200 if gateway.ready else 503)

    return Starlette(routes=[Route("/healthz", healthz)])
