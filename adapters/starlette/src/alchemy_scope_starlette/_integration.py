"""Install alchemy-scope's middleware in a Starlette app and dispose its engines at shutdown."""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar

from starlette.applications import Starlette

from alchemy_scope import (
    AlreadyInstalledError,
    Database,
    ScopeMiddleware,
    dispose_all,
    fail_current_scope,
)

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
    app.exception_handlers = _HandlersFailingTheScope(app.exception_handlers)
    app.router.lifespan_context = lifespan_disposing(app.router.lifespan_context, *databases)


class _HandlersFailingTheScope(dict[Any, Any]):
    """``app.exception_handlers`` whose handlers mark the current scope failed before answering.

    Starlette (and FastAPI) hand an exception to its handler inside the app, so the
    middleware never sees it: whatever response a handler gives, work that raised must not
    be committed by policy. Both read the handlers through ``items()`` when they build the
    middleware stack, handlers added later with ``add_exception_handler`` included.
    """

    def items(self) -> Any:
        return [(key, _failing_the_scope(handler)) for key, handler in super().items()]


def _is_async(handler: Any) -> bool:
    while isinstance(handler, functools.partial):
        handler = handler.func
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None)  # noqa: B004 - an object with an async __call__
    )


def _failing_the_scope(handler: Callable[..., Any]) -> Callable[..., Any]:
    if _is_async(handler):

        async def answer_async(request: Any, exc: Exception) -> Any:
            fail_current_scope()
            return await handler(request, exc)

        return answer_async

    def answer(request: Any, exc: Exception) -> Any:  # Starlette runs it in a thread
        fail_current_scope()
        return handler(request, exc)

    return answer


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
