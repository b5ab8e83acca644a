"""The app of every variant, one function per framework (see benchmarks.variants.build).

``app(handlers, db, wrap)``: the same three routes in the framework's own idiom (typed path
parameters, FastAPI's pydantic body), ``db`` installed with the framework's integration when
given, the ASGI callable wrapped by ``wrap``. Each framework is imported inside its function:
a process measures one framework and holds only its modules.
"""

from collections.abc import Callable
from typing import Any

from alchemy_scope import Database
from benchmarks.variants import Handlers

Wrap = Callable[[Any], Any]


def starlette(handlers: Handlers, db: Database | None, wrap: Wrap) -> Any:
    """Starlette, with ``alchemy_scope_starlette.install``."""
    from starlette.applications import Starlette  # noqa: PLC0415
    from starlette.requests import Request  # noqa: PLC0415
    from starlette.responses import JSONResponse, PlainTextResponse, Response  # noqa: PLC0415
    from starlette.routing import Route  # noqa: PLC0415

    from alchemy_scope_starlette import install  # noqa: PLC0415

    async def ping(_request: Request) -> Response:
        return PlainTextResponse("pong")

    async def read(request: Request) -> Response:
        return JSONResponse(await handlers.read(request.path_params["item_id"]))

    async def create(request: Request) -> Response:
        payload = await request.json()
        return JSONResponse(await handlers.insert(payload["name"]), status_code=201)

    app = Starlette(
        routes=[
            Route("/ping", ping),
            Route("/items/{item_id:int}", read),
            Route("/items", create, methods=["POST"]),
        ]
    )
    if db is not None:
        install(app, db)
    return wrap(app)


def fastapi(handlers: Handlers, db: Database | None, wrap: Wrap) -> Any:
    """FastAPI, with ``alchemy_scope_fastapi.install``; the body is a pydantic model."""
    from fastapi import FastAPI  # noqa: PLC0415
    from fastapi.responses import PlainTextResponse  # noqa: PLC0415
    from pydantic import BaseModel  # noqa: PLC0415

    from alchemy_scope_fastapi import install  # noqa: PLC0415

    class NewItem(BaseModel):
        name: str

    app = FastAPI()

    @app.get("/ping")
    async def ping() -> PlainTextResponse:
        return PlainTextResponse("pong")

    @app.get("/items/{item_id}")
    async def read(item_id: int) -> dict[str, Any]:
        return await handlers.read(item_id)

    @app.post("/items", status_code=201)
    async def create(new: NewItem) -> dict[str, Any]:
        return await handlers.insert(new.name)

    if db is not None:
        install(app, db)
    return wrap(app)


def litestar(handlers: Handlers, db: Database | None, wrap: Wrap) -> Any:
    """Litestar, with ``AlchemyScopePlugin``."""
    from litestar import Litestar, MediaType, get, post  # noqa: PLC0415

    from alchemy_scope_litestar import AlchemyScopePlugin  # noqa: PLC0415

    @get("/ping", media_type=MediaType.TEXT)
    async def ping() -> str:
        return "pong"

    @get("/items/{item_id:int}")
    async def read(item_id: int) -> dict[str, Any]:
        return await handlers.read(item_id)

    @post("/items")
    async def create(data: dict[str, Any]) -> dict[str, Any]:
        return await handlers.insert(data["name"])

    plugins = [] if db is None else [AlchemyScopePlugin(db)]
    return wrap(Litestar([ping, read, create], plugins=plugins))


def quart(handlers: Handlers, db: Database | None, wrap: Wrap) -> Any:
    """Quart, with ``AlchemyScope``; ``wrap`` wraps ``asgi_app``."""
    from quart import Quart, request  # noqa: PLC0415

    from alchemy_scope_quart import AlchemyScope  # noqa: PLC0415

    app = Quart(__name__)

    @app.get("/ping")
    async def ping() -> str:
        return "pong"

    @app.get("/items/<int:item_id>")
    async def read(item_id: int) -> dict[str, Any]:
        return await handlers.read(item_id)

    @app.post("/items")
    async def create() -> tuple[dict[str, Any], int]:
        payload = await request.get_json()
        return await handlers.insert(payload["name"]), 201

    if db is not None:
        AlchemyScope(app, db)
    app.asgi_app = wrap(app.asgi_app)  # type: ignore[method-assign]
    return app
