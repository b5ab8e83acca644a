"""alchemy-scope: one SQLAlchemy ``AsyncSession`` per request, reachable as ``db.session``.

Example:
    >>> from alchemy_scope import Database
    >>> db = Database("sqlite+aiosqlite:///app.db")
    >>> async def main() -> None:
    ...     async with db.scope():
    ...         await db.session.execute(...)
"""

from __future__ import annotations

from ._database import CommitPolicy, Database, dispose_all
from ._errors import (
    AlchemyScopeError,
    AlreadyInstalledError,
    ConcurrentSessionUseError,
    InsightOffError,
    MissingAsyncDriverError,
    NoScopeError,
    PgBouncerDriverError,
    ScopeClosedError,
    SharedConnectionBusyError,
    UnsupportedReplicasError,
    UnwatchedDatabaseError,
    is_database_unavailable,
)
from ._guard import ScopedSession
from ._insight import Insight, ScopeFigures
from ._lifecycle import ScopeBlock, scope
from ._middleware import ScopeMiddleware
from ._pgbouncer import pgbouncer_engine_options
from ._replicas import PrimaryBlock, Replica, Replicas, ReplicaSet
from ._scope import Scope, current_scope, fail_current_scope

__version__ = "0.1.0"

__all__ = [
    "AlchemyScopeError",
    "AlreadyInstalledError",
    "CommitPolicy",
    "ConcurrentSessionUseError",
    "Database",
    "Insight",
    "InsightOffError",
    "MissingAsyncDriverError",
    "NoScopeError",
    "PgBouncerDriverError",
    "PrimaryBlock",
    "Replica",
    "ReplicaSet",
    "Replicas",
    "Scope",
    "ScopeBlock",
    "ScopeClosedError",
    "ScopeFigures",
    "ScopeMiddleware",
    "ScopedSession",
    "SharedConnectionBusyError",
    "UnsupportedReplicasError",
    "UnwatchedDatabaseError",
    "current_scope",
    "dispose_all",
    "fail_current_scope",
    "is_database_unavailable",
    "pgbouncer_engine_options",
    "scope",
]
