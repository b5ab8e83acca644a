"""Starlette variants: bare, alchemy-scope, and the scoped-session pattern in BaseHTTPMiddleware."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from contextvars import ContextVar

from sqlalchemy.ext.asyncio import AsyncEngine, async_scoped_session, async_sessionmaker
from starlette.applications import Starlette
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from alchemy_scope import Database
from alchemy_scope_starlette import install
from benchmarks.models import SESSION_OPTIONS, insert_item, read_item

Endpoint = Callable[[Request], Awaitable[Response]]


async def ping(_request: Request) -> Response:
    """The route that never touches the database."""
    return PlainTextResponse("pong")


def routes(read: Endpoint, create: Endpoint) -> list[Route]:
    """The three bench routes, with a variant's two database endpoints."""
    return [
        Route("/ping", ping),
        Route("/items/{item_id:int}", read),
        Route("/items", create, methods=["POST"]),
    ]


def bare(engine: AsyncEngine) -> Starlette:
    """Starlette alone: each handler opens its own `async with sessionmaker() as session`."""
    sessionmaker = async_sessionmaker(engine, **SESSION_OPTIONS)

    async def read(request: Request) -> Response:
        async with sessionmaker() as session:
            return JSONResponse(await read_item(session, request.path_params["item_id"]))

    async def create(request: Request) -> Response:
        payload = await request.json()
        async with sessionmaker() as session:
            return JSONResponse(await insert_item(session, payload["name"]), status_code=201)

    return Starlette(routes=routes(read, create))


def alchemy_scope(engine: AsyncEngine) -> Starlette:
    """`alchemy_scope_starlette.install(app, db)`; handlers use `db.session`."""
    db = Database(engine)

    async def read(request: Request) -> Response:
        return JSONResponse(await read_item(db.session, request.path_params["item_id"]))

    async def create(request: Request) -> Response:
        payload = await request.json()
        return JSONResponse(await insert_item(db.session, payload["name"]), status_code=201)

    app = Starlette(routes=routes(read, create))
    install(app, db)
    return app


def base_http_middleware(engine: AsyncEngine) -> Starlette:
    """The same scoped-session pattern written as a Starlette `BaseHTTPMiddleware`.

    A ContextVar names the request; an `async_scoped_session` keyed by it gives the request's
    session, removed (closed) after `call_next`.
    """
    request_number: ContextVar[int] = ContextVar("bench_request_number")
    numbers = itertools.count()
    session = async_scoped_session(
        async_sessionmaker(engine, **SESSION_OPTIONS), scopefunc=request_number.get
    )

    class ScopedSessionMiddleware(BaseHTTPMiddleware):
        async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
            token = request_number.set(next(numbers))
            try:
                return await call_next(request)
            finally:
                await session.remove()
                request_number.reset(token)

    async def read(request: Request) -> Response:
        return JSONResponse(await read_item(session(), request.path_params["item_id"]))

    async def create(request: Request) -> Response:
        payload = await request.json()
        return JSONResponse(await insert_item(session(), payload["name"]), status_code=201)

    app = Starlette(routes=routes(read, create))
    app.add_middleware(ScopedSessionMiddleware)
    return app
