"""A Quart extension: a scope per request and websocket, disposal at shutdown, scoped jobs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from quart import Quart, current_app
from quart.signals import got_request_exception, got_websocket_exception

from alchemy_scope import (
    AlreadyInstalledError,
    Database,
    NoScopeError,
    ScopeMiddleware,
    dispose_all,
    fail_current_scope,
    scope,
)

EXTENSION_NAME = "alchemy_scope"

NoScopeError.add_integration_hint(
    "alchemy-scope-quart",
    "In Quart: `AlchemyScope(app, db)`, or `alchemy.init_app(app, db)` in an app factory.",
)


class AlchemyScope:
    """Give every request and websocket of a Quart app its own scope; dispose engines at exit.

    Use it like any Flask-style extension, either at once or from an app factory::

        alchemy = AlchemyScope(app, db)
        # or
        alchemy = AlchemyScope()
        alchemy.init_app(app, db)

    The scope wraps ``app.asgi_app``, outside Quart itself, so it stays open while a streamed
    body is sent, covers a whole websocket connection, and ends after Quart's own
    ``teardown_*`` functions. A view or websocket that raises fails its scope (nothing is
    committed) even when Quart answers the exception itself. The engines are disposed in an
    ``after_serving`` function, which Quart runs after its background tasks have finished.

    Args:
        app: The app to install into now, or ``None`` to call :meth:`init_app` later.
        *databases: The databases the app uses, disposed when every app this extension is
            installed in shuts down. A scope covers every ``Database``, but responses are
            watched (to commit before they start) only if a listed one commits by policy:
            list them all (with none listed, every response is watched).
        serialize: Let tasks that share a request's session wait for each other instead of
            raising ``ConcurrentSessionUseError``.
    """

    def __init__(
        self, app: Quart | None = None, *databases: Database, serialize: bool = False
    ) -> None:
        self.databases = databases
        self.serialize = serialize
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Quart, *databases: Database) -> None:
        """Install the extension in ``app``, before it starts serving.

        Args:
            app: The Quart application.
            *databases: Databases to dispose when ``app`` shuts down, besides those given to
                the constructor.

        Raises:
            TypeError: A ``Database`` was given where the app belongs.
            AlreadyInstalledError: An ``AlchemyScope`` is already installed in ``app``.
        """
        if isinstance(app, Database):
            raise TypeError(
                "AlchemyScope takes the Quart app first, then the databases: "
                "AlchemyScope(app, db), or AlchemyScope() and later alchemy.init_app(app, db)."
            )
        if EXTENSION_NAME in app.extensions:
            raise AlreadyInstalledError("`AlchemyScope(app, db, other_db)`")
        app.extensions[EXTENSION_NAME] = self
        to_dispose = (*self.databases, *databases)
        middleware = ScopeMiddleware(
            app.asgi_app,  # type: ignore[arg-type]
            databases=to_dispose or None,  # none given: unknown, so responses are watched
            serialize=self.serialize,
        )
        app.asgi_app = middleware  # type: ignore[assignment,method-assign]
        # Quart turns an exception into its own answer (a 500, an error handler's response, a
        # websocket closed with code 1000), so the middleware may never see it. An exception
        # an errorhandler answers passes through handle_user_exception (no signal is sent for
        # it); one none answers is signalled.
        app.handle_user_exception = _failing_the_scope(app.handle_user_exception)  # type: ignore[assignment,method-assign]
        got_request_exception.connect(_fail_current_scope, app)
        got_websocket_exception.connect(_fail_current_scope, app)

        async def dispose_databases() -> None:
            await dispose_all(to_dispose)

        app.after_serving(dispose_databases)

    def add_background_task(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run ``func(*args, **kwargs)`` as a Quart background task, in a scope of its own.

        Quart's ``app.add_background_task`` runs work that outlives the request, in a task
        that still names the request's scope: once the request has ended, ``db.session`` there
        raises ``ScopeClosedError``. Tasks added here get their own session instead, committed
        (by its database's policy) and closed when ``func`` returns. Like Quart's own method,
        it needs an app context (any view, websocket or ``before_serving`` function has one),
        and the app waits for the task before it shuts down.

        Args:
            func: The coroutine function to run (like Quart, a sync one runs in a thread).
            *args: Positional arguments for ``func``.
            **kwargs: Keyword arguments for ``func``.
        """

        async def run_in_own_scope() -> None:  # Quart runs it in an app context of its own
            async with scope(serialize=self.serialize):
                await current_app.ensure_async(func)(*args, **kwargs)

        current_app.add_background_task(run_in_own_scope)


def _failing_the_scope(handle: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Wrap Quart's ``handle_user_exception`` to fail the scope before an errorhandler answers."""

    async def handle_user_exception(*args: Any, **kwargs: Any) -> Any:
        fail_current_scope()
        return await handle(*args, **kwargs)

    return handle_user_exception


async def _fail_current_scope(_app: Quart, **_signal_data: Any) -> None:
    """Mark the scope of the failed request or websocket as failed, so nothing is committed."""
    fail_current_scope()
