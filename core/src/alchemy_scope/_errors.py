"""The exceptions alchemy-scope raises when it is used the wrong way."""

from __future__ import annotations

from sqlalchemy import exc as sa_exc


class AlchemyScopeError(Exception):
    """Base class of every exception alchemy-scope raises."""


class NoScopeError(AlchemyScopeError, LookupError):
    """``db.session`` was used where no scope is open."""

    def __init__(self) -> None:
        super().__init__(
            "db.session was used outside of a scope, so there is no session to give. "
            "In a web app, install the alchemy-scope integration for your framework so "
            "that every request opens a scope (for example "
            "`alchemy_scope_starlette.install(app, db)`, or add "
            "`alchemy_scope.ScopeMiddleware` to any ASGI app); in scripts, jobs and tests, "
            "wrap the work in `async with db.scope(): ...`. Litestar's AlchemyScopePlugin "
            "opens scopes once the app has started: run its lifespan (in tests, "
            "`with TestClient(app) as client:`)."
        )


class ScopeClosedError(AlchemyScopeError):
    """A session was used after the scope that owned it had ended."""

    def __init__(self) -> None:
        super().__init__(
            "The session was used after its scope had ended: this code runs in a task that "
            "outlived the request (or the `async with db.scope()` block) that started it, "
            "and that scope's session is already closed. Give the late work a scope of its "
            "own: `async with db.scope(): ...` inside the task."
        )


class ConcurrentSessionUseError(AlchemyScopeError):
    """Two tasks used one scope's session at the same time."""

    def __init__(self, attempted: str, running: str, *, synchronous: bool = False) -> None:
        if synchronous:
            advice = (
                f"{attempted}() is synchronous, so it cannot wait for its turn, even with "
                "serialize=True: call it before starting the other task's operation or after "
                "awaiting it, or give each concurrent branch its own session by wrapping it "
                "in `async with db.scope(): ...`."
            )
        else:
            advice = (
                "A session runs one operation at a time: await the calls one after another, "
                "pass serialize=True to the integration (or db.scope()) to make tasks take "
                "turns, or give each concurrent branch its own session by wrapping it in "
                "`async with db.scope(): ...`."
            )
        super().__init__(
            f"AsyncSession.{attempted}() was called while AsyncSession.{running}() was still "
            f"running on the same session, from another task of the same scope. {advice}"
        )


class SharedConnectionBusyError(AlchemyScopeError):
    """A session waited too long for its turn on a connection its Database shares (tests)."""

    def __init__(self, timeout: float, holder: object) -> None:
        super().__init__(
            f"A session waited {timeout:g} s for its turn on the connection its Database is "
            f"bound to (db.bound_to(), as in the alchemy-scope pytest fixtures), which a "
            f"session of {holder!r} still holds in an open transaction. Sessions sharing one "
            "connection take turns by transaction: commit or roll back that session (often "
            "`await db.session.commit()` in the test body) before another scope needs the "
            "database, and send requests through an in-process client (httpx.ASGITransport) "
            "started inside the test, so their scopes nest inside the test's."
        )


class AlreadyInstalledError(AlchemyScopeError, RuntimeError):
    """An integration was installed twice in one app, which would nest scopes."""

    def __init__(self, how_to_install_once: str) -> None:
        super().__init__(
            "alchemy-scope is already installed in this app; a second installation would nest "
            f"scopes and dispose engines twice. Install it once, with every database: "
            f"{how_to_install_once}."
        )


# SQLSTATE classes that mean "not now" rather than "wrong": connection exception,
# insufficient resources (too many connections), operator intervention (shutting down,
# starting up).
_UNAVAILABLE_SQLSTATES = ("08", "53", "57P")


def is_database_unavailable(error: BaseException) -> bool:
    """Whether ``error`` means the database cannot serve the request right now.

    True when no pooled connection came free within the pool's timeout, when the server
    refuses, drops or resets the connection, is starting up or shutting down, or has no
    connection slot left: cases where an app should answer 503 (try again later), unlike a
    constraint violation or a bad query. Exception handlers use it to tell the two apart.

    Args:
        error: An exception raised while using the database.

    Returns:
        Whether retrying later could succeed without any change to the request.
    """
    if isinstance(error, sa_exc.TimeoutError):  # no pooled connection free in time
        return True
    if isinstance(error, sa_exc.DBAPIError):
        if error.connection_invalidated or isinstance(
            error, (sa_exc.OperationalError, sa_exc.InterfaceError)
        ):
            return True
        return error.orig is not None and is_database_unavailable(error.orig)
    if isinstance(error, OSError):  # refused, reset, unreachable, timed out
        return True
    sqlstate = getattr(error, "sqlstate", None)  # drivers' own errors raised while connecting
    return isinstance(sqlstate, str) and sqlstate.startswith(_UNAVAILABLE_SQLSTATES)
