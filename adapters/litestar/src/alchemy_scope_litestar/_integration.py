"""The Litestar init plugin: a scope per request, ``db.session`` as a dependency, disposal."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from litestar.config.app import AppConfig
from litestar.di import Provide
from litestar.exceptions import ImproperlyConfiguredException
from litestar.middleware import DefineMiddleware
from litestar.plugins import InitPlugin
from litestar.types import ASGIApp, Scope
from sqlalchemy.ext.asyncio import AsyncSession

from alchemy_scope import (
    AlreadyInstalledError,
    Database,
    ScopeMiddleware,
    dispose_all,
    fail_current_scope,
)

# ScopeMiddleware takes scopes as plain mappings; Litestar types them as TypedDicts.
_SCOPE_MIDDLEWARE = cast("Callable[..., ASGIApp]", ScopeMiddleware)


class AlchemyScopePlugin(InitPlugin):
    """Give every request and websocket of a Litestar app its own scope.

    The plugin installs :class:`alchemy_scope.ScopeMiddleware` outside every other middleware,
    so Litestar's exception handling, ``after_response`` hooks and background tasks all run
    inside the request's scope. A request or websocket whose handler raised never commits,
    whatever Litestar's exception handlers answer. The plugin provides ``database.session``
    to dependency injection under ``dependency_key`` and disposes every database's engine
    after the app has shut down.

    Args:
        database: The database whose session is injected under ``dependency_key``.
        *databases: More databases to dispose at shutdown; their ``db.session`` works in
            requests too (a scope covers every ``Database``).
        dependency_key: The name handlers and dependencies use to receive
            ``database.session``; ``None`` to register no dependency.
        serialize: Let tasks of one request that share its session wait for each other
            instead of raising ``ConcurrentSessionUseError``. Litestar resolves independent
            dependencies concurrently, so this is on by default.

    Raises:
        TypeError: An argument given as a database is not an ``alchemy_scope.Database``.
    """

    __slots__ = ("databases", "dependency_key", "serialize")

    def __init__(
        self,
        database: Database,
        *databases: Database,
        dependency_key: str | None = "db_session",
        serialize: bool = True,
    ) -> None:
        self.databases = (database, *databases)
        for given in self.databases:
            if not isinstance(given, Database):
                raise TypeError(
                    f"AlchemyScopePlugin takes alchemy_scope.Database objects, not {given!r}: "
                    'create one with Database("sqlite+aiosqlite:///app.db") and pass it.'
                )
        self.dependency_key = dependency_key
        self.serialize = serialize

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        """Add the middleware, the session dependency and engine disposal to the app.

        Raises:
            AlreadyInstalledError: The plugin was added twice.
            ImproperlyConfiguredException: The app already has a dependency named
                ``dependency_key``.
        """
        if any(_is_scope_middleware(middleware) for middleware in app_config.middleware):
            raise AlreadyInstalledError("`plugins=[AlchemyScopePlugin(db, other_db)]`")
        key = self.dependency_key
        if key is not None:
            if key in app_config.dependencies:
                raise ImproperlyConfiguredException(
                    f"The app already has a dependency named {key!r}: give the session "
                    "another name with AlchemyScopePlugin(db, dependency_key='...')."
                )
            app_config.dependencies[key] = Provide(self.provide_session)
        middleware = DefineMiddleware(_SCOPE_MIDDLEWARE, serialize=self.serialize)
        app_config.middleware.insert(0, middleware)
        app_config.after_exception.append(_fail_current_scope)
        # on_shutdown hooks run after every lifespan context manager has exited.
        app_config.on_shutdown.append(self.dispose)
        return app_config

    async def provide_session(self) -> AsyncSession:
        """Return the current request's session: the same object as ``db.session``."""
        return self.databases[0].session

    async def dispose(self) -> None:
        """Close the pooled connections of every database."""
        await dispose_all(self.databases)


async def _fail_current_scope(_exc: Exception, _connection: Scope) -> None:
    """Keep a request or websocket whose handler raised from committing.

    Litestar turns the exception into a response or a websocket close code before it could
    reach the middleware; whatever status an exception handler chose, the work failed.
    """
    fail_current_scope()  # outside the routes no scope is open: nothing to do


def _is_scope_middleware(middleware: object) -> bool:
    return isinstance(middleware, DefineMiddleware) and middleware.middleware is _SCOPE_MIDDLEWARE
