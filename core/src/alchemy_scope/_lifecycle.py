"""When a scope's sessions are committed, rolled back, closed: the whole decision, in one place.

Entering and leaving a scope (:func:`enter`, :func:`leave`) is the same for the middleware and
for ``async with db.scope()``. What happens to each session opened in the scope, by event:

| Event | `commit="manual"` | `commit="autocommit"` |
|---|---|---|
| response start, status < 400 (2) | nothing | commit (1), before the client hears of the response |
| response start, status >= 400 | nothing | nothing now; rolled back at scope end |
| last body chunk, or pathsend | nothing | commit (1) what the body wrote, before the last chunk |
| scope end, work succeeded | roll back what is left uncommitted | commit (1) what is left |
| work raised, or the framework answered its exception (3) | roll back | roll back, never commit |
| HTTP app returned without a response | roll back | roll back |
| a COMMIT fails | `commit()` raises; connection discarded | connection discarded; scope fails (4) |
| work cancelled (disconnect, timeout) | connections discarded, no ROLLBACK | the same |
| an app's `begin()` block is open | the app's (5) | the app's (5) |

1. Only a transaction the policy owns: autobegun (the first statement began it), still
   active (no failed statement, connection not lost), no ``begin()``/``begin_nested()``
   block of the app's open in it, and no streamed result still being read (the commit is
   left for the scope's end). Each commit takes its turn on the session like any operation.
2. 3xx counts as success unless ``commit_on_redirect=False``.
3. Integrations call ``fail_current_scope()`` wherever the framework turns an exception
   into a response itself.
4. Nothing more is committed in the scope. At response start a plain 500 (503 when the
   database is unavailable) replaces the app's response; at the last body chunk the
   response is aborted, so the client never sees it complete.
5. Never committed or rolled back from under the block. A block still open when the scope
   ends is rolled back, and a warning names the scope.

Whatever happens, every session is then closed (its streamed results first), its connection
returned to the pool or discarded, and its registry entry dropped, also when ending it fails
or the caller is cancelled meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from contextvars import Token
from types import TracebackType
from typing import Any, cast

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, SessionTransaction, SessionTransactionOrigin

from ._errors import is_database_unavailable
from ._guard import ScopedSession, SessionGuard, commit_or_discard
from ._scope import Scope, SessionOwner, _current_scope

logger = logging.getLogger("alchemy_scope")

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]


# -- Entering and leaving ------------------------------------------------------------------


def enter(scope: Scope) -> Token[Scope | None]:
    """Make ``scope`` the current one; the token restores the enclosing scope."""
    token = scope._token = _current_scope.set(scope)
    return token


def leave(
    scope: Scope, token: Token[Scope | None], error: BaseException | None
) -> Coroutine[Any, Any, None] | None:
    """Close ``scope``, whose work returned or raised ``error``; return its ending to await.

    A scope that opened no session has nothing to end: the enclosing scope is current again
    at once and ``None`` is returned, with no coroutine to await (most requests of most apps
    never touch a database).
    """
    scope.closed = True
    if error is not None:
        scope._fail(error)
    if not scope._opened:
        _current_scope.reset(token)
        return None
    return _end_and_restore(scope, token, error is not None)


async def _end_and_restore(scope: Scope, token: Token[Scope | None], work_raised: bool) -> None:
    """End the sessions of ``scope``, then make the enclosing scope current again.

    When the work raised, its exception is the one that matters: a failure to end the
    sessions is logged, naming the scope, instead of replacing it.
    """
    try:
        if not work_raised:
            await _end(scope)
            return
        try:
            await _end(scope)
        except Exception:
            logger.exception(
                "Ending %r failed after its work had raised; the work's exception propagates",
                scope,
            )
    finally:
        _current_scope.reset(token)


class ScopeBlock:
    """The async context manager returned by :func:`scope`."""

    __slots__ = ("_scope", "_token")

    def __init__(self, scope: Scope) -> None:
        self._scope = scope

    async def __aenter__(self) -> Scope:
        self._token = enter(self._scope)
        return self._scope

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        ending = leave(self._scope, self._token, exc)
        if ending is not None:
            await ending


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


# -- The response: commit before the client hears ------------------------------------------


async def before_send(scope: Scope, message: Message, send: Send) -> bool:
    """Commit where the policy says so before ``message`` tells the client the outcome.

    Returns:
        Whether ``message`` should still be forwarded.
    """
    if scope._replaced_response:
        return False
    kind = message["type"]
    if kind == "http.response.start":
        try:
            await _commit_due(scope)
        except Exception as exc:
            # The database gone or out of connections is worth a retry (503); anything else
            # is a 500. Either way the app's response, which announced success, is dropped.
            start, end = _UNAVAILABLE if is_database_unavailable(exc) else _FAILED
            logger.exception(
                "Commit failed before the response started; sending a %s instead", start["status"]
            )
            scope.failed = True
            scope._replaced_response = True
            await send(start)
            await send(end)
            return False
    elif (
        kind == "http.response.body" and not message.get("more_body", False)
    ) or kind == "http.response.pathsend":
        # Writes made while the body streamed are committed before its last chunk: if that
        # fails the exception aborts the response, so the client never sees it complete.
        await _commit_due(scope)
    return True


def _plain_response(status: int, body: bytes) -> tuple[Message, Message]:
    """The two messages of a plain-text response: what replaces one whose commit failed."""
    start: Message = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
        ],
    }
    return start, {"type": "http.response.body", "body": body, "more_body": False}


_FAILED = _plain_response(500, b"Internal Server Error")
_UNAVAILABLE = _plain_response(503, b"Service Unavailable")


async def _commit_due(scope: Scope) -> None:
    """Commit each session whose policy commits on the scope's outcome so far (table, note 1)."""
    if scope.failed:
        return
    for owner, session in scope._opened:
        if _policy_commits(owner, scope) and _policy_owns_transaction(session):
            try:
                await _guard_of(session).hold(_scoped(session), _commit_if_still_due)
            except BaseException:
                scope.failed = True  # nothing more is committed: not later, not elsewhere
                raise


async def _commit_if_still_due(session: ScopedSession) -> None:
    """Commit, unless the operation the commit waited for opened a stream or a block."""
    if _policy_owns_transaction(session):
        await commit_or_discard(session)


# -- The decision --------------------------------------------------------------------------


def _policy_commits(owner: SessionOwner, scope: Scope) -> bool:
    """Whether ``owner``'s policy commits the work of ``scope``, given how it went so far."""
    if not owner.autocommits or scope.failed:
        return False
    status = scope.status
    if status is None or status < 300:
        return True
    return status < 400 and owner.commit_on_redirect


def _policy_owns_transaction(session: AsyncSession) -> bool:
    """Whether the session has a transaction the policy may commit now (table, note 1)."""
    return (
        session.in_transaction()
        and _still_active(session)
        and not _begun_by_app(session)
        and not _guard_of(session).streaming()
    )


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


def _still_active(session: AsyncSession) -> bool:
    """Whether the session's transaction can still commit.

    After a statement failed, or was cancelled where the framework swallowed the
    cancellation (a streamed body's task), SQLAlchemy keeps the transaction but only lets it
    roll back: committing it would raise ``PendingRollbackError`` in place of what failed.
    A connection SQLAlchemy invalidated under the transaction (a cancelled fetch it took for
    a lost connection) can only be rolled back too.
    """
    transaction = session.sync_session.get_transaction()
    if transaction is None or not transaction.is_active:
        return False
    return not any(connection.invalidated for connection, *_ in transaction._connections.values())


# -- Ending the sessions -------------------------------------------------------------------


async def _end(scope: Scope) -> None:
    """End the sessions of a closed scope, finishing even if the caller is cancelled.

    The sessions end in the caller's task: on the common path there is no task to create.
    Work that was cancelled ends in a task of its own that no cancellation reaches. So does
    what a cancellation striking half-way through the ending left (a disconnect, a timeout;
    it may strike every await after it too, as anyio's cancel scopes do), the session it cut
    short included; then the cancellation goes on.
    """
    if scope.cancelled:
        # The work was cancelled: under anyio the cancellation strikes every await of this
        # task, so a connection's graceful close would be cut short too (some drivers then
        # leave their socket to the garbage collector). End in a task of its own from the start.
        await _run_to_completion(scope, _end_sessions)
        return
    try:
        await _end_sessions(scope)
    except asyncio.CancelledError:
        await _run_to_completion(scope, _end_sessions)
        raise


async def _end_sessions(scope: Scope) -> None:
    """End every session of ``scope``, even when an earlier one fails; raise the first error.

    A cancellation stops the loop at once, leaving the session it cut short and the rest in
    ``scope._opened`` for :func:`_end` to finish.
    """
    error: BaseException | None = None
    opened = scope._opened
    while opened:
        owner, session = opened[0]
        try:
            await _end_session(scope, owner, _scoped(session))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            error = error or exc
        del opened[0]
    if error is not None:
        raise error


async def _end_session(scope: Scope, owner: SessionOwner, session: ScopedSession) -> None:
    """End one session: close its streams, commit or roll back, close, forget.

    Whatever raises on the way, the session is closed and its registry entry dropped; if
    closing fails, its connections are discarded so none stays checked out. A session whose
    work was cancelled half-way is discarded without a ROLLBACK: its connection may be in
    the middle of a statement (aiosqlite goes on running it in its thread), so it is closed
    instead of returned to the pool. So is one whose ending a cancellation cut short.
    """
    guard = session._guard
    binding = guard.binding
    discard = (scope.cancelled or guard.interrupted) and binding is None
    try:
        try:
            if guard.owner is not None:  # a task still uses it: let it finish
                await guard.wait_idle()
            if binding is not None:
                await binding.take_turn(session, scope)
            if guard.streams:  # before COMMIT and before the connection returns
                await _close_streams(guard, quietly=discard)
            if not discard:
                await _commit_or_leave(scope, owner, session)
        finally:
            await _close(session, guard, discard)
    except asyncio.CancelledError:
        guard.interrupted = True  # its connection's state is unknown: discarded by _end
        raise
    finally:
        owner._forget(scope)
        if binding is not None:
            binding.leave(session)


async def _close(session: ScopedSession, guard: SessionGuard, discard: bool) -> None:
    """Close ``session``, returning its connection to the pool, or discard its connections.

    When the ROLLBACK inside ``close()`` raises, SQLAlchemy has already detached the
    transaction from the session and never closes its connections; the transaction is
    captured first (and kept on the guard, for a close that a cancellation cut short), so
    they can still be discarded.
    """
    transaction = session.sync_session.get_transaction() or guard.ending
    guard.ending = transaction
    try:
        if discard:
            await _discard(session, transaction)
        else:
            await AsyncSession.close(session)
    except asyncio.CancelledError:
        raise
    except BaseException:
        await _discard(session, transaction)
        raise
    guard.ending = None


async def _commit_or_leave(scope: Scope, owner: SessionOwner, session: AsyncSession) -> None:
    """At scope end: commit the policy's transaction; warn of a block the app left open."""
    if not session.in_transaction():
        return
    if _begun_by_app(session):
        logger.warning(
            "%r ended inside a transaction the app began (begin() or begin_nested()) "
            "and never ended: rolled back",
            scope,
        )
    elif _policy_commits(owner, scope) and _still_active(session):
        await commit_or_discard(session)


async def _close_streams(guard: SessionGuard, *, quietly: bool) -> None:
    """Close every result the session streamed, so no cursor outlives the scope.

    A streamed result left unread keeps its cursor open after the session has returned the
    connection; on SQLite that open read blocks every writer until garbage collection.
    ``quietly``: the connection is about to be discarded; a failure to close is ignored.
    """
    streams, guard.streams = guard.streams, ()
    for result in streams:
        try:
            await result.close()
        except Exception:
            if not quietly:
                raise


async def _discard(session: AsyncSession, transaction: SessionTransaction | None) -> None:
    """Discard the connections of ``session`` (and of ``transaction``), then close it: no I/O."""
    try:
        await AsyncSession.run_sync(session, _discard_connections, transaction)
    except asyncio.CancelledError:
        raise
    except Exception:  # pragma: no cover - best effort after a failure already reported
        logger.warning("Could not discard the connections of %r", session, exc_info=True)


def _discard_connections(sync_session: Session, transaction: SessionTransaction | None) -> None:
    """Invalidate and close every connection of ``transaction``, then close the session."""
    if transaction is not None:
        for connection, *_ in set(transaction._connections.values()):
            if not connection.closed:
                connection.invalidate()
                connection.close()
    sync_session.close()  # nothing left to roll back: no I/O


async def _run_to_completion(scope: Scope, work: Callable[[Scope], Awaitable[None]]) -> None:
    """Run ``work(scope)`` in its own task and wait for it even when the caller is cancelled.

    Cancellation (a client disconnect, a timeout, an anyio cancel scope) is re-raised once the
    work is done, so sessions are always ended and their connections returned. The original
    ``CancelledError`` is re-raised: anyio recognises its own cancellations by it.
    """
    task = asyncio.ensure_future(work(scope))
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


def _scoped(session: AsyncSession) -> ScopedSession:
    """The ``ScopedSession`` a scope recorded (``Database`` opens no other kind)."""
    return cast("ScopedSession", session)


def _guard_of(session: AsyncSession) -> SessionGuard:
    return _scoped(session)._guard
