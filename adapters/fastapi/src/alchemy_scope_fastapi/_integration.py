"""Install alchemy-scope in a FastAPI app and hand the request's session to dependencies."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, FastAPI
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import HTTPConnection

import alchemy_scope_starlette
from alchemy_scope import AlchemyScopeError, Database

# Where install() records the databases of an app, on ``app.state``.
_DATABASES_STATE = "alchemy_scope_databases"


class NotInstalledError(AlchemyScopeError):
    """``SessionDep`` was used in an app that ``install(app, db)`` was not given a database."""

    def __init__(self) -> None:
        super().__init__(
            "SessionDep gives the session of the first Database passed to "
            "alchemy_scope_fastapi.install(app, db), but this app has none: call "
            "`install(app, db)` once, where the app is created. In an app mounted inside "
            "another one, or for another database, declare the dependency explicitly: "
            "`Annotated[AsyncSession, Depends(session_dependency(db))]`. "
            f"See {self.documentation()}"
        )


def install(app: FastAPI, *databases: Database, serialize: bool = False) -> None:
    """Give every request and websocket of ``app`` its own scope; dispose ``databases`` at exit.

    Call it once, before the app starts serving. ``SessionDep`` then gives the session of the
    first database. The middleware goes outside every other user middleware, so they can use
    ``db.session`` too.

    Args:
        app: The FastAPI application.
        *databases: The databases whose engines are disposed when the app shuts down; the
            first one is the database of ``SessionDep``.
        serialize: Let tasks of one request that share its session wait for each other
            instead of raising ``ConcurrentSessionUseError``.
    """
    alchemy_scope_starlette.install(app, *databases, serialize=serialize)
    setattr(app.state, _DATABASES_STATE, databases)


async def _installed_session(connection: HTTPConnection) -> AsyncSession:
    """The session of the current scope, of the first database installed on the app."""
    databases: tuple[Database, ...] = getattr(connection.app.state, _DATABASES_STATE, ())
    if not databases:
        raise NotInstalledError()
    return databases[0].session


SessionDep = Annotated[AsyncSession, Depends(_installed_session)]
"""The request's session of the app's first installed database: ``db.session``, as a dependency.

Example:
    >>> @app.post("/items")
    ... async def create_item(session: SessionDep) -> None:
    ...     session.add(Item())
"""


def session_dependency(database: Database) -> Callable[[], Coroutine[Any, Any, AsyncSession]]:
    """A dependency that gives ``database.session``, for apps with more than one database.

    Args:
        database: The database whose session of the current scope the dependency gives.

    Returns:
        An async dependency callable, for ``Depends``.

    Example:
        >>> ReportsSession = Annotated[AsyncSession, Depends(session_dependency(reports_db))]
    """

    async def database_session() -> AsyncSession:
        return database.session

    return database_session
