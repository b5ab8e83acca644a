"""``Database``: an engine, a session factory and the scoped registry behind ``db.session``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_scoped_session,
    async_sessionmaker,
    create_async_engine,
)

from ._aiosqlite import watch_aiosqlite
from ._errors import (
    AlchemyScopeError,
    InsightOffError,
    UnwatchedDatabaseError,
    _check_async_driver,
)
from ._guard import ScopedSession
from ._insight import EngineWatch, Insight, ScopeFigures
from ._lifecycle import ScopeBlock, scope
from ._pgbouncer import pgbouncer_engine_options
from ._replicas import (
    PrimaryBlock,
    Replicas,
    ReplicaSet,
    ReplicaSpec,
    format_position,
    parse_position,
)
from ._scope import Scope, _current_scope, current_scope, open_scope_key
from ._shared import SharedConnection

CommitPolicy = Literal["manual", "autocommit"]
"""``manual``: the app commits, the rest is rolled back. ``autocommit``: commit on success."""


class Database:
    """A database an app talks to: its engine, its session factory and ``db.session``.

    ``db.session`` is the session of the current scope: created on first use, the same object
    everywhere in that scope, never shared with another scope. Scopes are opened by the
    framework integration (one per request or websocket) or by ``async with db.scope():``.

    Args:
        url: An async SQLAlchemy URL (``sqlite+aiosqlite:///app.db``,
            ``postgresql+asyncpg://...``, ``mysql+asyncmy://...``) or an ``AsyncEngine``.
        commit: ``"manual"`` (the default): the app commits, and whatever it left uncommitted
            is rolled back when the scope ends. ``"autocommit"``: the scope's session is
            committed when the work succeeds (no exception and, for HTTP, a status below 400,
            committed before the response starts), rolled back otherwise.
        commit_on_redirect: With ``autocommit``, whether a 3xx response commits.
        engine_options: Keyword arguments for ``create_async_engine`` (only with a URL).
        pgbouncer: The URL is PgBouncer's in transaction mode: asyncpg's statement caches
            off and unique prepared-statement names (see ``pgbouncer_engine_options``).
        session_options: Keyword arguments for ``async_sessionmaker``. ``expire_on_commit``
            defaults to ``False``, so objects stay readable after a commit.
        replicas: PostgreSQL read replicas of the primary: a list of URLs or engines, or
            ``Replicas([...], max_lag=..., read_your_writes=...)``. A scope reads from one
            of them until it writes, then from the primary (see "Scaling out" in the docs).
        insight: Keep what each scope cost the database (``db.figures()``), warn of N+1
            queries, optionally add ``Server-Timing``: ``True`` for the defaults, or an
            ``Insight(...)``. Off (``None``) registers nothing and costs nothing.

    Attributes:
        engine: The ``AsyncEngine``.
        sessionmaker: The ``async_sessionmaker`` of ``ScopedSession``s behind ``db.session``;
            call it for a session outside scopes that you close yourself.
        scoped_session: The ``async_scoped_session`` registry, keyed by the current scope.
        commit_policy: ``"manual"`` or ``"autocommit"``, as given.
        autocommits: Whether ``commit_policy`` is ``"autocommit"``.
        commit_on_redirect: As given.
        replicas: The ``ReplicaSet`` routing reads to the replicas, or ``None`` without them.

    Raises:
        ValueError: ``commit`` is not a known policy.
        UnsupportedReplicasError: ``replicas`` were given to a database that is not PostgreSQL.
        TypeError: ``engine_options`` or ``pgbouncer`` were given together with an engine.
        PgBouncerDriverError: ``pgbouncer=True`` with a URL whose driver is not asyncpg.
        MissingAsyncDriverError: The URL names a synchronous driver (``postgresql://``,
            ``sqlite://``) or an async one that is not installed.
    """

    def __init__(
        self,
        url: str | URL | AsyncEngine,
        *,
        commit: CommitPolicy = "manual",
        commit_on_redirect: bool = True,
        engine_options: Mapping[str, Any] | None = None,
        session_options: Mapping[str, Any] | None = None,
        replicas: Replicas | Sequence[ReplicaSpec] | None = None,
        insight: bool | Insight | None = None,
        pgbouncer: bool = False,
    ) -> None:
        if commit not in ("manual", "autocommit"):
            raise ValueError(
                f"Unknown commit policy {commit!r}: use commit='manual' (the app commits) "
                "or commit='autocommit' (commit when the request succeeds)."
            )
        if isinstance(url, AsyncEngine):
            if engine_options or pgbouncer:
                raise TypeError(
                    "engine_options and pgbouncer only apply when Database creates the engine "
                    "from a URL; pass them to create_async_engine() instead (for PgBouncer: "
                    "create_async_engine(url, **alchemy_scope.pgbouncer_engine_options(url)))."
                )
            self.engine = url
        else:
            if pgbouncer:  # first: it says why asyncpg is the driver to use
                engine_options = pgbouncer_engine_options(url, engine_options)
            _check_async_driver(url)  # "postgresql://" would fail on "No module named 'psycopg'"
            self.engine = create_async_engine(url, **(engine_options or {}))
        watch_aiosqlite(self.engine)
        options: dict[str, Any] = {"expire_on_commit": False, **(session_options or {})}
        if "class_" in options and not issubclass(options["class_"], ScopedSession):
            raise TypeError(
                "session_options['class_'] must be a subclass of alchemy_scope.ScopedSession, "
                "which keeps sessions from being used concurrently or after their scope."
            )
        options.setdefault("class_", ScopedSession)
        self.replicas: ReplicaSet | None = None
        if replicas:  # routing only then: without replicas, the sessions are SQLAlchemy's own
            self.replicas = ReplicaSet(self.engine, replicas, options, dict(engine_options or {}))
        self.commit_policy: CommitPolicy = commit
        self.commit_on_redirect = commit_on_redirect
        self.autocommits = commit == "autocommit"
        self.sessionmaker: async_sessionmaker[ScopedSession] = async_sessionmaker(
            self.engine, **options
        )
        self.scoped_session: async_scoped_session[ScopedSession] = async_scoped_session(
            self.sessionmaker, scopefunc=open_scope_key
        )
        registry = self.scoped_session.registry
        registry.createfunc = self._open_session
        self._sessions_by_scope: dict[Scope, ScopedSession] = registry.registry
        self._current_session: Callable[[], ScopedSession] = registry
        self._shared: SharedConnection | None = None
        self._insight: EngineWatch | None = None
        if insight:
            self._insight = EngineWatch(self.engine, Insight() if insight is True else insight)

    @property
    def session(self) -> AsyncSession:
        """The current scope's session, created on first use.

        Raises:
            NoScopeError: No scope is open here.
            ScopeClosedError: The scope this code runs in has already ended.
        """
        return self._current_session()

    def use_primary(self) -> PrimaryBlock:
        """Send reads to the primary: ``with db.use_primary():``, or ``@db.use_primary()``.

        The block form covers the statements in the block; decorating an async function (a
        route) covers each of its calls. Writes always go to the primary; without replicas it
        does nothing.
        """
        return PrimaryBlock(None if self.replicas is None else self.replicas.forced)

    @property
    def bookmark(self) -> str | None:
        """Where the current scope's last commit ended in the primary's WAL (``16/B374D848``).

        Hand it to the client (a header, a cookie: ``BookmarkCookie`` does that) and pass it
        back to ``read_after()`` in its next request. ``None`` until a commit of this scope
        wrote, and always without ``Replicas(..., read_your_writes=True)``.
        """
        current = _current_scope.get()
        session = None if current is None else self._sessions_by_scope.get(current)
        if session is None or self.replicas is None:
            return None
        committed = getattr(session.sync_session, "_committed", None)
        return None if committed is None else format_position(committed)

    def read_after(self, bookmark: str | None) -> None:
        """Let the current scope read only from a replica that has replayed past ``bookmark``.

        Call it before the scope's first read; with no replica that far yet, the scope reads
        from the primary. ``None`` (no bookmark came) and a database without replicas: nothing.

        Raises:
            ValueError: ``bookmark`` is not one that ``db.bookmark`` gave.
        """
        if bookmark is None or self.replicas is None:
            return
        position = parse_position(bookmark)
        if position is None:
            raise ValueError(
                f"{bookmark!r} is not a bookmark: pass the text db.bookmark returned after a "
                "commit (a WAL position such as '16/B374D848'), or None when the client sent none."
            )
        self.session.sync_session._read_after = position  # type: ignore[attr-defined]

    @contextmanager
    def bound_to(
        self, connection: AsyncConnection, *, timeout: float = 10.0
    ) -> Iterator[AsyncConnection]:
        """Make every session opened in the block use ``connection``, joining its transaction.

        This is how tests run an app inside one transaction that is rolled back at the end
        (the pytest fixtures of ``alchemy_scope.pytest_plugin`` use it): begin a transaction
        on ``connection``, bind, and every session the code under test opens joins it through
        a SAVEPOINT (``join_transaction_mode="create_savepoint"``). What the app commits is
        released into the outer transaction, what it rolls back is rolled back to its
        savepoint, and nothing reaches the database once the outer transaction rolls back.

        Sessions take turns on the connection: one operation at a time, savepoints ended in
        the reverse order they began. A scope nested in another (a request sent from the test
        body through an in-process client) goes ahead of the enclosing one; scopes side by
        side (concurrent requests) wait for each other's transaction to end.

        Args:
            connection: An ``AsyncConnection`` of this database, usually in a transaction.
            timeout: How long a session waits for its turn before
                ``SharedConnectionBusyError`` says which session holds the connection.

        Yields:
            ``connection``.

        Raises:
            AlchemyScopeError: The database is already bound to a connection.
        """
        if self._shared is not None:
            raise AlchemyScopeError(
                f"{self!r} is already bound to a connection: leave the first bound_to() "
                "block before entering another."
            )
        saved = dict(self.sessionmaker.kw)
        self.sessionmaker.configure(bind=connection, join_transaction_mode="create_savepoint")
        self._shared = SharedConnection(connection, timeout)
        try:
            yield connection
        finally:
            self._shared = None
            self.sessionmaker.kw.clear()
            self.sessionmaker.kw.update(saved)

    def scope(self, *, serialize: bool = False) -> ScopeBlock:
        """Open a scope by hand; the same as :func:`alchemy_scope.scope`.

        A scope covers every ``Database``: sessions of all of them opened in the block are
        ended with it.
        """
        return scope(serialize=serialize)

    async def dispose(self) -> None:
        """Close every pooled connection of the engine. Integrations call it at shutdown."""
        if self.replicas is not None:
            await self.replicas.dispose()
        await self.engine.dispose()

    def __repr__(self) -> str:
        url = self.engine.url.render_as_string(hide_password=True)
        return f"Database({url!r}, commit={self.commit_policy!r})"

    def _open_session(self) -> ScopedSession:
        """Create the current scope's session and record it in the scope (registry miss)."""
        current = _current_scope.get()
        assert current is not None  # _open_scope_key() has just checked it
        if current._unwatched and self.autocommits:
            raise UnwatchedDatabaseError(repr(self))
        session = self.sessionmaker()
        guard = session._guard
        guard.scope = current
        if self._shared is not None:
            guard.binding = self._shared
        if current.serialize:
            guard.lock = asyncio.Lock()
        current._add(self, session)
        return session

    def figures(self) -> ScopeFigures:
        """What this database has cost the current scope so far (``insight`` on).

        Raises:
            InsightOffError: The database was created without ``insight``.
            NoScopeError: No scope is open here.
        """
        if self._insight is None:
            raise InsightOffError(repr(self))
        return self._insight.figures_of(current_scope())

    def _forget(self, scope: Scope) -> None:
        """Drop the registry entry of ``scope``; report its figures if insight is on."""
        self._sessions_by_scope.pop(scope, None)
        if self._insight is not None:
            self._insight.scope_ended(scope)


async def dispose_all(databases: tuple[Database, ...] | list[Database]) -> None:
    """Dispose every database's engine, even when one of them fails; raise the first error."""
    error: Exception | None = None
    for database in databases:
        try:
            await database.dispose()
        except Exception as exc:
            error = error or exc
    if error is not None:
        raise error
