"""``ScopedSession``: the ``AsyncSession`` of ``db.session``, and the guard that keeps it safe.

SQLAlchemy cannot reliably detect two tasks running operations on one ``AsyncSession`` at
once, nor use of a session after its scope has ended. Each ``ScopedSession`` carries one
:class:`SessionGuard` that does: every awaited method runs through it, as the one operation
in flight on the session.
"""

from __future__ import annotations

import asyncio
import functools
import traceback
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from sqlalchemy.ext.asyncio import AsyncResult, AsyncScalarResult, AsyncSession
from sqlalchemy.orm import Session, SessionTransaction

from ._errors import ConcurrentSessionUseError, ScopeClosedError
from ._scope import Scope
from ._shared import SharedConnection

Stream = AsyncResult[Any] | AsyncScalarResult[Any]

POLICY = "commit"  # what ``SessionGuard.running`` says while the commit policy holds it


class SessionGuard:
    """The state of one session that the guard and the scope's ending read.

    Attributes:
        scope: The scope that owns the session; ``None`` for ``db.sessionmaker()`` sessions.
        owner: The task whose operation is running on the session, if any.
        running: The name of that operation (``"execute"``, or :data:`POLICY`).
        lock: With ``serialize=True``, the lock tasks queue on for their turn.
        binding: The connection the session shares while its ``Database`` is ``bound_to()`` one.
        interrupted: An operation was cancelled half-way: the connection's state is unknown.
        streams: Results of ``stream()``/``stream_scalars()``, closed when the scope ends.
        ending: The transaction the scope's end is closing, until the session is closed.
    """

    __slots__ = (
        "_idle",
        "binding",
        "ending",
        "interrupted",
        "lock",
        "owner",
        "running",
        "scope",
        "streams",
    )

    def __init__(self) -> None:
        self.scope: Scope | None = None
        self.owner: asyncio.Task[Any] | None = None
        self.running: str | None = None
        self.lock: asyncio.Lock | None = None
        self.binding: SharedConnection | None = None
        self.interrupted = False
        self.streams: list[Stream] | tuple[()] = ()
        self.ending: SessionTransaction | None = None
        self._idle: asyncio.Future[None] | None = None

    async def wait_idle(self) -> None:
        """Wait until the operation another task is running on the session has returned."""
        while self.owner is not None:
            if self._idle is None:
                self._idle = asyncio.get_running_loop().create_future()
            await self._idle

    def _release(self) -> None:
        """The running operation has returned: wake whoever waits for the session."""
        self.owner = None
        self.running = None
        idle = self._idle
        if idle is not None:
            self._idle = None
            if not idle.done():
                idle.set_result(None)

    async def run(
        self,
        session: ScopedSession,
        task: asyncio.Task[Any] | None,
        name: str,
        call: Callable[..., Awaitable[Any]],
        /,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        """Run ``call(session, ...)`` as the one operation in flight, on behalf of ``task``."""
        self.owner = task
        self.running = name
        binding = self.binding
        try:
            if binding is not None:
                await binding.take_turn(session, self.scope)
            return await call(session, *args, **kwargs)
        except asyncio.CancelledError as cancellation:
            # The connection's state is unknown: the scope discards it. The finished frames
            # below hold the half-run cursor, which on SQLite keeps its lock until they go.
            self.interrupted = True
            traceback.clear_frames(cancellation.__traceback__)
            raise
        finally:
            if binding is not None:
                binding.done(session)
            self._release()

    async def hold(
        self, session: ScopedSession, work: Callable[[ScopedSession], Awaitable[None]]
    ) -> None:
        """Run ``work`` (the commit policy's) as an operation of its own on the session.

        It waits for an operation another task is running, and operations that other tasks
        start meanwhile wait for it instead of raising ``ConcurrentSessionUseError``.
        """
        task = asyncio.current_task()
        if self.owner is task:  # pragma: no cover - called from inside an operation
            await work(session)
            return
        lock = self.lock
        if lock is not None:
            async with lock:
                await self.run(session, task, POLICY, work)
            return
        await self.wait_idle()
        await self.run(session, task, POLICY, work)

    def keep_stream(self, result: Stream) -> None:
        """Remember a streamed result, to close it when the scope ends."""
        streams = self.streams
        if streams:
            streams[:] = [kept for kept in streams if not kept._soft_closed]
            streams.append(result)
        else:
            self.streams = [result]

    def streaming(self) -> bool:
        """Whether a result the session streamed is still being read (not exhausted or closed)."""
        return any(not result._soft_closed for result in self.streams)


class ScopedSession(AsyncSession):
    """The ``AsyncSession`` that ``db.session`` hands out.

    It is an ordinary ``AsyncSession`` that also refuses two things SQLAlchemy cannot detect
    reliably: two tasks running operations on it at the same time, and use after its scope
    has ended. Synchronous methods that change the session (``add()``, ``expunge_all()``,
    ...) cannot wait for another task's operation, so they raise instead, even with
    ``serialize=True``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._guard = SessionGuard()


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


async def _stream(
    method: Callable[..., Awaitable[Stream]], session: ScopedSession, /, *args: Any, **kwargs: Any
) -> Stream:
    """Call ``stream()``/``stream_scalars()`` and remember the result, to close it at scope end."""
    result = await method(session, *args, **kwargs)
    session._guard.keep_stream(result)
    return result


def guarded(
    name: str, method: Callable[..., Awaitable[Any]]
) -> Callable[..., Coroutine[Any, Any, Any]]:
    """Wrap the awaited ``AsyncSession`` method ``name`` (implemented by ``method``) in the guard.

    In order, the guarded method:

    1. refuses use after the scope ended (except the methods that end a session);
    2. runs ``method`` directly when this task already owns the session (``AsyncSession``
       calling itself: ``scalars()`` runs ``execute()``);
    3. with ``serialize=True``, queues on the session's lock for its turn;
    4. waits while the commit policy holds the session;
    5. raises ``ConcurrentSessionUseError`` when another task's operation is in flight;
    6. otherwise runs ``method`` as the session's one operation.
    """
    if name in ("stream", "stream_scalars"):
        method = functools.partial(_stream, method)
    allowed_after_scope = name in _ALLOWED_AFTER_SCOPE

    async def guarded_method(self: ScopedSession, /, *args: Any, **kwargs: Any) -> Any:
        guard = self._guard
        owning_scope = guard.scope
        if owning_scope is not None and owning_scope.closed and not allowed_after_scope:
            raise ScopeClosedError()
        task = asyncio.current_task()
        owner = guard.owner
        if owner is task:
            return await method(self, *args, **kwargs)
        lock = guard.lock
        if lock is not None:
            async with lock:
                return await guard.run(self, task, name, method, *args, **kwargs)
        while owner is not None and guard.running is POLICY:
            await guard.wait_idle()
            owner = guard.owner
        if owner is not None:
            raise ConcurrentSessionUseError(name, guard.running or "?")
        return await guard.run(self, task, name, method, *args, **kwargs)

    guarded_method.__name__ = guarded_method.__qualname__ = name
    guarded_method.__doc__ = getattr(AsyncSession, name).__doc__
    return guarded_method


def guarded_sync(name: str) -> Callable[..., Any]:
    """Wrap the synchronous ``AsyncSession`` method ``name``: it raises instead of waiting."""
    method = getattr(AsyncSession, name)

    def guarded_method(self: ScopedSession, /, *args: Any, **kwargs: Any) -> Any:
        guard = self._guard
        owning_scope = guard.scope
        if owning_scope is not None and owning_scope.closed:
            raise ScopeClosedError()
        owner = guard.owner
        if owner is not None and owner is not _current_task():
            raise ConcurrentSessionUseError(name, guard.running or "?", synchronous=True)
        return method(self, *args, **kwargs)

    guarded_method.__name__ = guarded_method.__qualname__ = name
    guarded_method.__doc__ = method.__doc__
    return guarded_method


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # a worker thread (a sync route): never the owning task
        return None


async def commit_or_discard(session: AsyncSession) -> None:
    """Commit ``session``; if the COMMIT itself fails, discard its connection.

    This is what ``ScopedSession.commit()`` and every commit of the policy run. After a failed
    COMMIT, SQLAlchemy takes the transaction for ended, but some databases keep it open
    (SQLite does, after a deferred foreign key fails): returned to the pool, that connection
    would carry the failed transaction's writes and locks to the next request. Flushing
    first tells a failed statement (the transaction can still be rolled back) from a failed
    COMMIT (the connection is invalidated instead of reused).
    """
    guard: SessionGuard | None = getattr(session, "_guard", None)
    shared = guard is not None and guard.binding is not None
    # One greenlet round trip for the three steps: a separate `await flush()` costs 15-20 us.
    await AsyncSession.run_sync(session, _flush_then_commit, shared)


def _flush_then_commit(sync_session: Session, shared: bool) -> None:
    """Flush, then COMMIT; invalidate the connection if the COMMIT fails, unless ``shared``."""
    sync_session.flush()
    try:
        sync_session.commit()
    except BaseException:
        if not shared:  # never a connection we share
            sync_session.invalidate()
        raise


for _name in _GUARDED_METHODS:
    if hasattr(AsyncSession, _name):  # ``get_one`` is newer than some supported versions
        _method = commit_or_discard if _name == "commit" else getattr(AsyncSession, _name)
        setattr(ScopedSession, _name, guarded(_name, _method))
for _name in _GUARDED_SYNC_METHODS:
    setattr(ScopedSession, _name, guarded_sync(_name))
