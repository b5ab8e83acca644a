"""alchemy-scope: one SQLAlchemy ``AsyncSession`` per request, reachable as ``db.session``.

Example:
    >>> from alchemy_scope import Database
    >>> db = Database("sqlite+aiosqlite:///app.db")
    >>> async def main() -> None:
    ...     async with db.scope():
    ...         await db.session.execute(...)
"""

from __future__ import annotations

from ._core import Scope, ScopeBlock, current_scope, fail_current_scope, scope
from ._database import CommitPolicy, Database, ScopedSession, dispose_all
from ._errors import (
    AlchemyScopeError,
    AlreadyInstalledError,
    ConcurrentSessionUseError,
    MissingAsyncDriverError,
    NoScopeError,
    ScopeClosedError,
    SharedConnectionBusyError,
    is_database_unavailable,
)
from ._middleware import ScopeMiddleware

__version__ = "0.1.0"

__all__ = [
    "AlchemyScopeError",
    "AlreadyInstalledError",
    "CommitPolicy",
    "ConcurrentSessionUseError",
    "Database",
    "MissingAsyncDriverError",
    "NoScopeError",
    "Scope",
    "ScopeBlock",
    "ScopeClosedError",
    "ScopeMiddleware",
    "ScopedSession",
    "SharedConnectionBusyError",
    "current_scope",
    "dispose_all",
    "fail_current_scope",
    "is_database_unavailable",
    "scope",
]
