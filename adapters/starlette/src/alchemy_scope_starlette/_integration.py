"""Install alchemy-scope's middleware in a Starlette app and dispose its engines at shutdown."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar

from starlette.applications import Starlette

from alchemy_scope import AlreadyInstalledError, Database, ScopeMiddleware, dispose_all

AppT = TypeVar("AppT")
Lifespan = Callable[[AppT], AbstractAsyncContextManager[Any]]


def install(app: Starlette, *databases: Database, serialize: bool = False) -> None:
    """Give every request and websocket of ``app`` its own scope; dispose ``databases`` at exit.

    Call it once, before the app starts serving. The middleware goes outside every other user
    middleware, so they can use ``db.session`` too.

    Args:
        app: The Starlette (or FastAPI) application.
        *databases: The databases whose engines are disposed when the app shuts down.
        serialize: Let tasks of one request that share its session wait for each other
            instead of raising ``ConcurrentSessionUseError``.
    """
    installed: list[object] = [middleware.cls for middleware in app.user_middleware]
    if ScopeMiddleware in installed:
        raise AlreadyInstalledError("`install(app, db, other_db)`")
    app.add_middleware(ScopeMiddleware, serialize=serialize)
    app.router.lifespan_context = lifespan_disposing(app.router.lifespan_context, *databases)


def lifespan_disposing(lifespan: Lifespan[AppT], *databases: Database) -> Lifespan[AppT]:
    """Wrap a lifespan so that ``databases`` are disposed after it has shut down.

    Args:
        lifespan: The app's lifespan context factory.
        *databases: The databases to dispose.

    Returns:
        A lifespan context factory that runs ``lifespan`` and then disposes the databases,
        also when the lifespan raised.
    """

    @asynccontextmanager
    async def lifespan_then_dispose(app: AppT) -> AsyncIterator[Any]:
        try:
            async with lifespan(app) as state:
                yield state
        finally:
            await dispose_all(databases)

    return lifespan_then_dispose
