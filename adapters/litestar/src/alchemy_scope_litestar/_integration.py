"""The Litestar init plugin: a scope per request, ``db.session`` as a dependency, disposal."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from litestar import Litestar
from litestar.config.app import AppConfig
from litestar.di import Provide
from litestar.exceptions import ImproperlyConfiguredException
from litestar.plugins import InitPlugin
from litestar.types import ASGIApp, Scope
from sqlalchemy.ext.asyncio import AsyncSession

from alchemy_scope import (
    AlreadyInstalledError,
    Database,
    NoScopeError,
    ScopeMiddleware,
    dispose_all,
    fail_current_scope,
)

NoScopeError.add_integration_hint(
    "alchemy-scope-litestar",
    "Litestar's AlchemyScopePlugin opens scopes once the app has started: run its lifespan "
    "(in tests, `with TestClient(app) as client:`).",
)

# ScopeMiddleware takes scopes as plain mappings; Litestar types them as TypedDicts.
_SCOPE_MIDDLEWARE = cast("Callable[..., ASGIApp]", ScopeMiddleware)


class AlchemyScopePlugin(InitPlugin):
    """Give every request and websocket of a Litestar app its own scope.

    When the app starts (its lifespan), the plugin wraps Litestar's request handling in
    :class:`alchemy_scope.ScopeMiddleware`, outside every other middleware and exception
    handler, so Litestar's exception handling, ``after_response`` hooks and background tasks
    all run inside the request's scope. (Added as a Litestar middleware instead, it would
    make Litestar wrap every route in one more exception handler: about 1.3 µs a request.)
    Requests therefore need the lifespan to have run, as every server does by default; in
    tests, enter the client: ``with TestClient(app) as client:``. A request or websocket
    whose handler raised never commits, whatever Litestar's exception handlers answer. The
    plugin provides ``database.session`` to dependency injection under ``dependency_key``
    and disposes every database's engine after the app has shut down.

    Args:
        database: The database whose session is injected under ``dependency_key``.
        *databases: More databases the app uses, disposed at shutdown. A scope covers every
            ``Database``, but the middleware watches responses (to commit before they
            start) only if one of the listed databases commits by policy: list them all.
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
        """Add scopes at startup, the session dependency and engine disposal to the app.

        Raises:
            AlreadyInstalledError: The plugin was added twice.
            ImproperlyConfiguredException: The app already has a dependency named
                ``dependency_key``.
        """
        if sum(isinstance(plugin, AlchemyScopePlugin) for plugin in app_config.plugins) > 1:
            raise AlreadyInstalledError("`plugins=[AlchemyScopePlugin(db, other_db)]`")
        key = self.dependency_key
        if key is not None:
            if key in app_config.dependencies:
                raise ImproperlyConfiguredException(
                    f"The app already has a dependency named {key!r}: give the session "
                    "another name with AlchemyScopePlugin(db, dependency_key='...')."
                )
            app_config.dependencies[key] = Provide(self.provide_session)
        app_config.on_startup.append(self.open_scopes)
        app_config.after_exception.append(_fail_current_scope)
        # on_shutdown hooks run after every lifespan context manager has exited.
        app_config.on_shutdown.append(self.dispose)
        return app_config

    def open_scopes(self, app: Litestar) -> None:
        """Wrap ``app``'s request handling in ``ScopeMiddleware``, once (a startup hook)."""
        if not isinstance(app.asgi_handler, ScopeMiddleware):
            app.asgi_handler = _SCOPE_MIDDLEWARE(
                app.asgi_handler, databases=self.databases, serialize=self.serialize
            )

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
    fail_current_scope()  # before the lifespan has run no scope is open: nothing to do
