"""The Starlette app of every variant (see benchmarks.variants.build)."""

from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from alchemy_scope import Database
from alchemy_scope_starlette import install
from benchmarks.variants import Handlers


def app(handlers: Handlers, db: Database | None, wrap: Callable[[Any], Any]) -> Any:
    async def ping(_request: Request) -> Response:
        return PlainTextResponse("pong")

    async def read(request: Request) -> Response:
        return JSONResponse(await handlers.read(request.path_params["item_id"]))

    async def create(request: Request) -> Response:
        payload = await request.json()
        return JSONResponse(await handlers.insert(payload["name"]), status_code=201)

    routes = [
        Route("/ping", ping),
        Route("/items/{item_id:int}", read),
        Route("/items", create, methods=["POST"]),
    ]
    starlette = Starlette(routes=routes)
    if db is not None:
        install(starlette, db)
    return wrap(starlette)
