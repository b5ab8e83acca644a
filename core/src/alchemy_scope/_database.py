"""``Database``: an engine, a session factory and the scoped registry behind ``db.session``."""

from __future__ import annotations

import asyncio
import functools
import traceback
from collections.abc import Awaitable, Callable, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncResult,
    AsyncScalarResult,
    AsyncSession,
    async_scoped_session,
    async_sessionmaker,
    create_async_engine,
)

from ._core import (
    Scope,
    ScopeBlock,
    _current_scope,
    _open_scope_key,
    commit_or_discard,
    policies,
    scope,
)
from ._errors import AlchemyScopeError, ConcurrentSessionUseError, ScopeClosedError
from ._shared import SharedConnection

if TYPE_CHECKING:
    from collections.abc import Coroutine, Iterator

CommitPolicy = Literal["manual", "autocommit"]
"""``manual``: the app commits, the rest is rolled back. ``autocommit``: commit on success."""


class ScopedSession(AsyncSession):
    """The ``AsyncSession`` that ``db.session`` hands out.

    It is an ordinary ``AsyncSession`` that also refuses two things SQLAlchemy cannot detect
    reliably: two tasks running operations on it at the same time, and use after its scope
    has ended. Synchronous methods that change the session (``add()``, ``expunge_all()``,
    ...) cannot wait for another task's operation, so they raise instead, even with
    ``serialize=True``.
    """

    _alchemy_scope: Scope | None = None  # None: made by db.sessionmaker(), outside scopes
    _alchemy_owner: asyncio.Task[Any] | None = None
    _alchemy_running: str | None = None
    _alchemy_lock: asyncio.Lock | None = None
    _alchemy_idle: asyncio.Future[None] | None = None
    _alchemy_binding: SharedConnection | None = None  # set while its Database is bound_to()
    # An operation was cancelled half-way: the connection's state is unknown.
    _alchemy_interrupted = False
    # Results of stream()/stream_scalars(), closed when the scope ends.
    _alchemy_streams: list[AsyncResult[Any] | AsyncScalarResult[Any]] | tuple[()] = ()

    async def _alchemy_wait_idle(self) -> None:
        """Wait until the operation another task is running on this session has returned."""
        while self._alchemy_owner is not None:
            if self._alchemy_idle is None:
                self._alchemy_idle = asyncio.get_running_loop().create_future()
            await self._alchemy_idle

    def _alchemy_release(self) -> None:
        """The running operation has returned: wake whoever waits for the session."""
        self._alchemy_owner = None
        self._alchemy_running = None
        idle = self._alchemy_idle
        if idle is not None:
            self._alchemy_idle = None
            if not idle.done():
                idle.set_result(None)

    async def _alchemy_hold(self, work: Callable[[ScopedSession], Awaitable[None]]) -> None:
        """Run ``work`` (the commit policy's) as an operation of its own on this session.

        It waits for an operation another task is running, and operations that other tasks
        start meanwhile wait for it instead of raising ``ConcurrentSessionUseError``.
        """
        task = asyncio.current_task()
        if self._alchemy_owner is task:  # pragma: no cover - called from inside an operation
            await work(self)
            return
        lock = self._alchemy_lock
        if lock is not None:
            async with lock:
                await _run_owning(self, task, _POLICY, work)
            return
        await self._alchemy_wait_idle()
        await _run_owning(self, task, _POLICY, work)


_POLICY = "commit"  # what _alchemy_running says while the commit policy holds the session

# Methods that end a session stay allowed on a session whose scope has ended.
_ALLOWED_AFTER_SCOPE = frozenset({"close", "invalidate", "reset"})
_GUARDED_METHODS = (
    "close",
    "commit",
    "connection",
    "delete",
    "execute",
    "flush",
    "get",
    "get_one",
    "invalidate",
    "merge",
    "refresh",
    "reset",
    "rollback",
    "run_sync",
    "scalar",
    "scalars",
    "stream",
    "stream_scalars",
)
# Synchronous methods that change what the next flush writes: they cannot wait for a turn.
_GUARDED_SYNC_METHODS = ("add", "add_all", "expire", "expire_all", "expunge", "expunge_all")


async def _run_owning(
    session: ScopedSession,
    task: asyncio.Task[Any] | None,
    name: str,
    call: Callable[..., Awaitable[Any]],
    /,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """Run ``call`` as the one operation in flight on ``session``, on behalf of ``task``."""
    session._alchemy_owner = task
    session._alchemy_running = name
    binding = session._alchemy_binding
    try:
        if binding is not None:
            await binding.take_turn(session)
        return await call(session, *args, **kwargs)
    except asyncio.CancelledError as cancellation:
        # The connection's state is unknown: the scope discards it. The finished frames
        # below hold the half-run cursor, which on SQLite keeps its lock until they go.
        session._alchemy_interrupted = True
        traceback.clear_frames(cancellation.__traceback__)
        raise
    finally:
        if binding is not None:
            binding.done(session)
        session._alchemy_release()


async def _stream(
    method: Callable[..., Awaitable[Any]], session: ScopedSession, /, *args: Any, **kwargs: Any
) -> Any:
    """Call ``stream()``/``stream_scalars()`` and remember the result, to close it at scope end."""
    result = await method(session, *args, **kwargs)
    streams = session._alchemy_streams
    if streams:
        streams[:] = [kept for kept in streams if not kept._soft_closed]
        streams.append(result)
    else:
        session._alchemy_streams = [result]
    return result


def _guarded(name: str) -> Callable[..., Coroutine[Any, Any, Any]]:
    """Build the guarded version of the ``AsyncSession`` method ``name``.

    The guard refuses use after the scope ended (except for methods that end a session),
    runs the method directly when the task already owns the session (``AsyncSession``
    calling itself), waits for a turn with ``serialize=True`` or while the commit policy
    holds the session, and otherwise raises ``ConcurrentSessionUseError`` when another
    task's operation is in flight.
    """
    method = commit_or_discard if name == "commit" else getattr(AsyncSession, name)
    if name in ("stream", "stream_scalars"):
        unguarded: Callable[..., Awaitable[Any]] = functools.partial(_stream, method)
    else:
        unguarded = method
    allowed_after_scope = name in _ALLOWED_AFTER_SCOPE

    async def guarded(self: ScopedSession, /, *args: Any, **kwargs: Any) -> Any:
        owning_scope = self._alchemy_scope
        if owning_scope is not None and owning_scope.closed and not allowed_after_scope:
            raise ScopeClosedError()
        task = asyncio.current_task()
        owner = self._alchemy_owner
        if owner is task:  # AsyncSession calling itself (scalars() runs execute())
            return await unguarded(self, *args, **kwargs)
        lock = self._alchemy_lock
        if lock is not None:
            async with lock:
                return await _run_owning(self, task, name, unguarded, *args, **kwargs)
        while owner is not None and self._alchemy_running is _POLICY:
            await self._alchemy_wait_idle()  # the policy's commit: wait for it to return
            owner = self._alchemy_owner
        if owner is not None:
            raise ConcurrentSessionUseError(name, self._alchemy_running or "?")
        return await _run_owning(self, task, name, unguarded, *args, **kwargs)

    guarded.__name__ = guarded.__qualname__ = name
    guarded.__doc__ = method.__doc__
    return guarded


def _guarded_sync(name: str) -> Callable[..., Any]:
    """Build the guarded version of the synchronous ``AsyncSession`` method ``name``."""
    unguarded = getattr(AsyncSession, name)

    def guarded(self: ScopedSession, /, *args: Any, **kwargs: Any) -> Any:
        owning_scope = self._alchemy_scope
        if owning_scope is not None and owning_scope.closed:
            raise ScopeClosedError()
        owner = self._alchemy_owner
        if owner is not None and owner is not _current_task():
            raise ConcurrentSessionUseError(name, self._alchemy_running or "?", synchronous=True)
        return unguarded(self, *args, **kwargs)

    guarded.__name__ = guarded.__qualname__ = name
    guarded.__doc__ = unguarded.__doc__
    return guarded


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # a worker thread (a sync route): never the owning task
        return None


for _name in _GUARDED_METHODS:
    if hasattr(AsyncSession, _name):  # ``get_one`` is newer than some supported versions
        setattr(ScopedSession, _name, _guarded(_name))
for _name in _GUARDED_SYNC_METHODS:
    setattr(ScopedSession, _name, _guarded_sync(_name))


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
        session_options: Keyword arguments for ``async_sessionmaker``. ``expire_on_commit``
            defaults to ``False``, so objects stay readable after a commit.

    Raises:
        ValueError: ``commit`` is not a known policy.
        TypeError: ``engine_options`` were given together with an engine.
    """

    def __init__(
        self,
        url: str | URL | AsyncEngine,
        *,
        commit: CommitPolicy = "manual",
        commit_on_redirect: bool = True,
        engine_options: Mapping[str, Any] | None = None,
        session_options: Mapping[str, Any] | None = None,
    ) -> None:
        if commit not in ("manual", "autocommit"):
            raise ValueError(
                f"Unknown commit policy {commit!r}: use commit='manual' (the app commits) "
                "or commit='autocommit' (commit when the request succeeds)."
            )
        if isinstance(url, AsyncEngine):
            if engine_options:
                raise TypeError(
                    "engine_options only apply when Database creates the engine from a URL; "
                    "pass them to create_async_engine() instead."
                )
            self.engine = url
        else:
            self.engine = create_async_engine(url, **(engine_options or {}))
        options: dict[str, Any] = {"expire_on_commit": False, **(session_options or {})}
        if "class_" in options and not issubclass(options["class_"], ScopedSession):
            raise TypeError(
                "session_options['class_'] must be a subclass of alchemy_scope.ScopedSession, "
                "which keeps sessions from being used concurrently or after their scope."
            )
        options.setdefault("class_", ScopedSession)
        self.commit_policy: CommitPolicy = commit
        self.commit_on_redirect = commit_on_redirect
        self._autocommit = commit == "autocommit"
        if self._autocommit:
            policies.autocommit = True
        self.sessionmaker: async_sessionmaker[ScopedSession] = async_sessionmaker(
            self.engine, **options
        )
        self.scoped_session: async_scoped_session[ScopedSession] = async_scoped_session(
            self.sessionmaker, scopefunc=_open_scope_key
        )
        registry = self.scoped_session.registry
        registry.createfunc = self._open_session
        self._sessions_by_scope: dict[Scope, ScopedSession] = registry.registry
        self._current_session: Callable[[], ScopedSession] = registry
        self._shared: SharedConnection | None = None

    @property
    def session(self) -> AsyncSession:
        """The current scope's session, created on first use.

        Raises:
            NoScopeError: No scope is open here.
            ScopeClosedError: The scope this code runs in has already ended.
        """
        return self._current_session()

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
        await self.engine.dispose()

    def __repr__(self) -> str:
        url = self.engine.url.render_as_string(hide_password=True)
        return f"Database({url!r}, commit={self.commit_policy!r})"

    def _open_session(self) -> ScopedSession:
        """Create the current scope's session and record it in the scope (registry miss)."""
        current = _current_scope.get()
        assert current is not None  # _open_scope_key() has just checked it
        session = self.sessionmaker()
        session._alchemy_scope = current
        if self._shared is not None:
            session._alchemy_binding = self._shared
        if current.serialize:
            session._alchemy_lock = asyncio.Lock()
        current._add(self, session)
        return session

    def _commits(self, status: int | None) -> bool:
        """Whether this database's policy commits a scope that ended with ``status``."""
        if not self._autocommit:
            return False
        if status is None or status < 300:
            return True
        return status < 400 and self.commit_on_redirect

    def _forget(self, scope: Scope) -> None:
        """Drop the registry entry of ``scope``."""
        self._sessions_by_scope.pop(scope, None)


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
