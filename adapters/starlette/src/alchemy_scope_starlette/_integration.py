"""Install alchemy-scope's middleware in a Starlette app and dispose its engines at shutdown."""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.types import ASGIApp

from alchemy_scope import (
    AlreadyInstalledError,
    Database,
    NoScopeError,
    ScopeMiddleware,
    dispose_all,
    fail_current_scope,
)

NoScopeError.add_integration_hint(
    "alchemy-scope-starlette",
    "In Starlette and FastAPI: `install(app, db)` where the app is created.",
)

AppT = TypeVar("AppT")
Lifespan = Callable[[AppT], AbstractAsyncContextManager[Any]]


def install(app: Starlette, *databases: Database, serialize: bool = False) -> None:
    """Give every request and websocket of ``app`` its own scope; dispose ``databases`` at exit.

    Call it once, before the app starts serving. The scope goes outside the whole middleware
    stack, whatever order middleware are added in, so every user middleware (including
    ``@app.middleware("http")``) can use ``db.session`` too.

    Args:
        app: The Starlette (or FastAPI) application.
        *databases: The databases the app uses: their engines are disposed when the app
            shuts down, and the scope watches responses only if one of them commits by
            policy (``commit="autocommit"``). Give every one; with none given, every
            response is watched.
        serialize: Let tasks of one request that share its session wait for each other
            instead of raising ``ConcurrentSessionUseError``.
    """
    if isinstance(app.build_middleware_stack, _StackInAScope):
        raise AlreadyInstalledError("`install(app, db, other_db)`")
    if app.middleware_stack is not None:
        raise RuntimeError("Cannot add middleware after an application has started")
    stack = _StackInAScope(app.build_middleware_stack, databases, serialize)
    app.build_middleware_stack = stack  # type: ignore[method-assign]
    app.exception_handlers = _HandlersFailingTheScope(app.exception_handlers)
    app.router.lifespan_context = lifespan_disposing(app.router.lifespan_context, *databases)


class _StackInAScope:
    """``app.build_middleware_stack`` that wraps the stack the app builds in ``ScopeMiddleware``.

    Not ``add_middleware``: each middleware it adds goes outside those added before it, so
    middleware added after install() (``@app.middleware("http")`` included) would run outside
    the scope, where ``db.session`` raises ``NoScopeError``. Starlette builds the stack once,
    at the first call, with ``self.build_middleware_stack()`` (FastAPI overrides that method,
    and this instance attribute shadows both). The scope ends up outside
    ``ServerErrorMiddleware`` too: the 500 handler runs in it, and an unhandled exception,
    which that middleware re-raises after sending its 500, still fails the scope.
    """

    def __init__(
        self, build: Callable[[], ASGIApp], databases: tuple[Database, ...], serialize: bool
    ) -> None:
        self.build = build
        self.databases = databases or None  # none given: unknown, so responses are watched
        self.serialize = serialize

    def __call__(self) -> ASGIApp:
        return ScopeMiddleware(self.build(), databases=self.databases, serialize=self.serialize)


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
