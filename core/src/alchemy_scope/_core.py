"""Scopes, the units of work that own sessions, and the ContextVar naming the current one."""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar, Token
from types import TracebackType
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, SessionTransaction, SessionTransactionOrigin

from ._errors import NoScopeError, ScopeClosedError

if TYPE_CHECKING:
    from ._database import Database, ScopedSession

logger = logging.getLogger("alchemy_scope")

_current_scope: ContextVar[Scope | None] = ContextVar("alchemy_scope.current_scope", default=None)


class _Policies:
    """What the commit policies of every Database in this process need from the middleware."""

    # Set once any Database commits by policy: only then must the middleware watch the
    # response (its status, and the moment it starts) to commit before the client hears.
    autocommit = False


policies = _Policies()


class Scope:
    """One unit of work (a request, a websocket connection, a job) and the sessions opened in it.

    A scope is cheap: it holds no session and no connection until code in it first reads
    ``db.session``. Its identity is the key of every ``Database``'s session registry, so one
    scope gives one session per ``Database``, and ending it ends them all.

    Attributes:
        closed: ``True`` once the scope has ended; its sessions refuse further use.
        status: The HTTP status of the response, once the middleware has seen it.
        failed: ``True`` when the work raised or its commit failed; nothing will be committed.
        serialize: When ``True``, tasks that share this scope's session wait for each other
            instead of raising ``ConcurrentSessionUseError``.
    """

    # Class-level defaults keep opening a scope to one small allocation: a request that never
    # touches the database sets no attribute beyond these.
    _opened: list[tuple[Database, ScopedSession]] | tuple[()] = ()
    _token: Token[Scope | None] | None = None  # how it was entered: its .old_value is the parent
    _replaced_response = False
    _request: Mapping[str, Any] | None = None  # the ASGI scope, when the middleware opened it
    closed = False
    failed = False
    cancelled = False  # the work was cancelled: its connections' state is unknown
    serialize = False
    status: int | None = None

    @property
    def parent(self) -> Scope | None:
        """The scope that was current where this one was opened, if any."""
        token = self._token
        parent: object = None if token is None else token.old_value
        return parent if isinstance(parent, Scope) else None

    @property
    def sessions(self) -> tuple[AsyncSession, ...]:
        """The sessions opened in this scope so far, in the order they were opened."""
        return tuple(session for _, session in self._opened)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        request = self._request
        if request is None:
            what = f"{id(self):#x}"
        elif request["type"] == "http":
            what = f"{request.get('method', '?')} {request.get('path', '?')}"
        else:
            what = f"{request['type']} {request.get('path', '?')}"
        return f"<Scope {what} {state}, {len(self._opened)} session(s)>"

    def _cancel(self, cancellation: asyncio.CancelledError) -> None:
        """The work was cancelled: discard its connections, and free what its frames hold.

        A statement cancelled half-way leaves its cursor in the frames of the cancellation's
        traceback; on SQLite that cursor keeps its read lock, even on a discarded connection,
        until the traceback is garbage-collected. The frames' locals are of no use to
        anyone reading a cancellation, so they are cleared now.
        """
        self.cancelled = True
        traceback.clear_frames(cancellation.__traceback__)

    async def _commit_due(self) -> None:
        """Commit each session whose commit policy commits on this scope's outcome so far.

        A transaction the app began itself (``begin()``, ``begin_nested()``) is the app's to
        end; a session with a streamed result still open keeps its transaction until the
        scope ends (a COMMIT would close the stream's cursor under the code reading it).
        Each commit takes its turn on the session like any operation: it waits for the one
        another task is running, and operations that arrive meanwhile wait for it.
        """
        if self.failed:
            return
        for database, session in self._opened:
            if database._commits(self.status) and _policy_may_commit(session):
                try:
                    await session._alchemy_hold(_commit_if_still_due)
                except BaseException:
                    self.failed = True  # nothing more is committed: not later, not elsewhere
                    raise

    async def _finish(self) -> None:
        """Commit what the policy says, then close every session and drop its registry entry.

        Every session is ended even when an earlier one fails (or the ending is cancelled);
        the first error is raised.
        """
        error: BaseException | None = None
        opened, self._opened = self._opened, ()
        for database, session in opened:
            try:
                await self._end_session(database, session)
            except BaseException as exc:
                error = error or exc
        if error is not None:
            raise error

    async def _end_session(self, database: Database, session: ScopedSession) -> None:
        """End one session: close its streams, commit or roll back, close, forget.

        Whatever raises on the way, the session is closed and its registry entry dropped;
        if closing fails, its connections are discarded so none stays checked out. A
        session whose work was cancelled half-way is discarded without a ROLLBACK: its
        connection may be in the middle of a statement (aiosqlite goes on running it in its
        thread), so it is closed instead of returned to the pool.
        """
        binding = session._alchemy_binding
        discard = (self.cancelled or session._alchemy_interrupted) and binding is None
        try:
            if session._alchemy_owner is not None:  # a task still uses it: let it finish
                await session._alchemy_wait_idle()
            if binding is not None:
                await binding.take_turn(session)
            if session._alchemy_streams:  # before COMMIT and before the connection returns
                await _close_streams(session, quietly=discard)
            if discard:
                return
            await self._commit_or_leave(database, session)
        finally:
            transaction = session.sync_session.get_transaction()
            try:
                if discard:
                    await AsyncSession.invalidate(session)
                else:
                    await AsyncSession.close(session)
            except BaseException:
                await _discard_connections(session, transaction)
                raise
            finally:
                database._forget(self)
                if binding is not None:
                    binding.leave(session)

    async def _commit_or_leave(self, database: Database, session: ScopedSession) -> None:
        """At scope end: commit the policy's transaction; warn of one the app left open."""
        if not session.in_transaction():
            return
        if _begun_by_app(session):
            logger.warning(
                "%r ended inside a transaction the app began (begin() or begin_nested()) "
                "and never ended: rolled back",
                self,
            )
        elif not self.failed and database._commits(self.status) and _still_active(session):
            await commit_or_discard(session)

    async def _leave(self, token: Token[Scope | None], work_raised: bool) -> None:
        """End this scope's sessions and make the enclosing scope current again.

        When the work raised, its exception is the one that matters: a failure to end the
        sessions is logged, naming the scope, instead of replacing it.
        """
        try:
            if not work_raised:
                await self._end()
                return
            try:
                await self._end()
            except Exception:
                logger.exception(
                    "Ending %r failed after its work had raised; the work's exception propagates",
                    self,
                )
        finally:
            _current_scope.reset(token)

    async def _end(self) -> None:
        """End the sessions of a closed scope, finishing even if the caller is cancelled."""
        if self._may_wait():
            await _run_to_completion(self._finish)
        else:
            # No transaction to end, no task to wait for, no turn to take: closing never
            # suspends, so a cancellation cannot cut it short, and a task would only cost time.
            await self._finish()
            # Still give the event loop a turn, as ending in a task would: without it, under
            # load, a worker that loops over requests starts the next one in the same turn,
            # and the loop batches I/O worse (measured: +40 µs of CPU per request at 32
            # concurrent in-process inserts on PostgreSQL).
            await asyncio.sleep(0)

    def _may_wait(self) -> bool:
        """Whether ending a session may suspend: for I/O, for another task, or for a turn."""
        for _, session in self._opened:
            if (
                session.in_transaction()
                or session._alchemy_owner is not None
                or session._alchemy_binding is not None
                or session._alchemy_streams
            ):
                return True
        return False

    def _add(self, database: Database, session: ScopedSession) -> None:
        """Record a session opened in this scope."""
        if self._opened:
            self._opened.append((database, session))
        else:
            self._opened = [(database, session)]


async def commit_or_discard(session: AsyncSession) -> None:
    """Commit ``session``; if the COMMIT itself fails, discard its connection.

    After a failed COMMIT, SQLAlchemy takes the transaction for ended, but some databases
    keep it open (SQLite does, after a deferred foreign key fails): returned to the pool,
    that connection would carry the failed transaction's writes and locks to the next
    request. Flushing first tells a failed statement (the transaction can still be rolled
    back) from a failed COMMIT (the connection is invalidated instead of reused).
    """
    shared = getattr(session, "_alchemy_binding", None) is not None
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


def _begun_by_app(session: AsyncSession) -> bool:
    """Whether the session's transaction was begun by the app (``begin()``, ``begin_nested()``).

    Such a transaction belongs to the app's block: the policy neither commits nor rolls it
    back while the block is open. Autobegun transactions (the first statement began them)
    are the policy's.
    """
    sync_session = session.sync_session
    if sync_session.get_nested_transaction() is not None:
        return True
    transaction = sync_session.get_transaction()
    return transaction is not None and transaction.origin is not SessionTransactionOrigin.AUTOBEGIN


def _policy_may_commit(session: ScopedSession) -> bool:
    """Whether the session has a transaction of the policy's, with no stream reading it."""
    return (
        session.in_transaction()
        and _still_active(session)
        and not _begun_by_app(session)
        and not _streaming(session)
    )


def _still_active(session: AsyncSession) -> bool:
    """Whether the session's transaction can still commit.

    After a statement failed, or was cancelled where the framework swallowed the
    cancellation (a streamed body's task), SQLAlchemy keeps the transaction but only lets it
    roll back: committing it would raise ``PendingRollbackError`` in place of what failed.
    """
    transaction = session.sync_session.get_transaction()
    if transaction is None or not transaction.is_active:
        return False
    # A connection SQLAlchemy invalidated under the transaction (a cancelled fetch it took
    # for a lost connection) can only be rolled back too.
    return not any(connection.invalidated for connection, *_ in transaction._connections.values())


async def _commit_if_still_due(session: ScopedSession) -> None:
    """Commit, unless the operation the commit waited for opened a stream or a block."""
    if _policy_may_commit(session):
        await commit_or_discard(session)


def _streaming(session: ScopedSession) -> bool:
    """Whether a result the session streamed is still being read (not exhausted, not closed)."""
    return any(not result._soft_closed for result in session._alchemy_streams)


async def _close_streams(session: ScopedSession, *, quietly: bool) -> None:
    """Close every result the session streamed, so no cursor outlives the scope.

    A streamed result left unread keeps its cursor open after the session has returned the
    connection; on SQLite that open read blocks every writer until garbage collection.
    ``quietly``: the connection is about to be discarded; a failure to close is ignored.
    """
    streams, session._alchemy_streams = session._alchemy_streams, ()
    for result in streams:
        try:
            await result.close()
        except Exception:
            if not quietly:
                raise


async def _discard_connections(
    session: AsyncSession, transaction: SessionTransaction | None
) -> None:
    """Discard the connections of a session whose ``close()`` failed, so none stays checked out.

    When the ROLLBACK inside ``close()`` raises, SQLAlchemy has already detached the
    transaction from the session and never closes its connections: ``invalidate()`` would
    find nothing. The transaction captured before ``close()`` still knows them.
    """
    try:
        if transaction is None:
            await AsyncSession.invalidate(session)
        else:
            await AsyncSession.run_sync(session, _invalidate_connections, transaction)
    except Exception:  # pragma: no cover - best effort after a failure already reported
        logger.warning("Could not discard the connections of %r", session, exc_info=True)


def _invalidate_connections(_session: Session, transaction: SessionTransaction) -> None:
    for connection, *_ in set(transaction._connections.values()):
        if not connection.closed:
            connection.invalidate()
            connection.close()


async def _run_to_completion(work: Callable[[], Awaitable[None]]) -> None:
    """Run ``work`` in its own task and wait for it even when the caller is cancelled.

    Cancellation (a client disconnect, a timeout, an anyio cancel scope) is re-raised once the
    work is done, so sessions are always ended and their connections returned. The original
    ``CancelledError`` is re-raised: anyio recognises its own cancellations by it.
    """
    task = asyncio.ensure_future(work())
    cancellation: asyncio.CancelledError | None = None
    while True:
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError as exc:
            cancellation = cancellation or exc
            if not task.done():
                continue
        except Exception:
            if cancellation is None:
                raise
            logger.exception("Ending a scope failed while its task was being cancelled")
        break
    if cancellation is not None:
        raise cancellation


def _open_scope_key() -> Scope:
    """Return the current scope: the registry key of ``db.session``. Raise if there is none."""
    current = _current_scope.get()
    if current is None:
        raise NoScopeError()
    if current.closed:
        raise ScopeClosedError()
    return current


class ScopeBlock:
    """The async context manager returned by :func:`scope`."""

    __slots__ = ("_scope", "_token")

    def __init__(self, scope: Scope) -> None:
        self._scope = scope

    async def __aenter__(self) -> Scope:
        self._token = self._scope._token = _current_scope.set(self._scope)
        return self._scope

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        current = self._scope
        current.closed = True
        if exc_type is not None:
            current.failed = True
            if isinstance(exc, asyncio.CancelledError):
                current._cancel(exc)
        if current._opened:
            await current._leave(self._token, exc_type is not None)
        else:
            _current_scope.reset(self._token)


def scope(*, serialize: bool = False) -> ScopeBlock:
    """Open a scope by hand, for scripts, jobs, background tasks and tests.

    Inside the block every ``Database``'s ``db.session`` is one session of this scope; at the
    end each is committed if its policy says so and the block did not raise, then rolled back,
    closed and removed from the registry. Inside another scope this opens an independent one
    and restores the outer scope on exit.

    Args:
        serialize: Let tasks that share this scope's session wait for each other instead of
            raising ``ConcurrentSessionUseError``.

    Returns:
        An async context manager that yields the new :class:`Scope`.
    """
    current = Scope()
    if serialize:
        current.serialize = True
    return ScopeBlock(current)


def fail_current_scope() -> None:
    """Mark the current scope as failed, if one is open: nothing in it will be committed.

    Integrations call it where the framework answers an exception itself (an exception
    handler, a websocket it closes), so that work which raised is never committed by policy,
    whatever response the client got.
    """
    current = _current_scope.get()
    if current is not None:
        current.failed = True


def current_scope() -> Scope:
    """Return the scope this code runs in.

    Raises:
        NoScopeError: No scope is open here.
    """
    current = _current_scope.get()
    if current is None:
        raise NoScopeError()
    return current
