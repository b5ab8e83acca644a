"""A connection that every session of a Database uses for a while: a test's transaction."""

from __future__ import annotations

import asyncio
import contextlib

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from ._errors import SharedConnectionBusyError
from ._scope import Scope


class SharedConnection:
    """One connection shared by every session a ``Database`` opens while it is bound to it.

    The sessions join the connection's transaction through SAVEPOINTs, so they take turns:
    one operation at a time on the connection, and savepoints ended in the reverse order they
    began. A session may run when no other session's operation is in flight and every other
    session with an open transaction on the connection belongs to a scope enclosing its own
    (the test body around a request, a request around a nested scope). Otherwise it waits,
    up to ``timeout`` seconds.
    """

    def __init__(self, connection: AsyncConnection, timeout: float) -> None:
        self.connection = connection
        self.timeout = timeout
        # Sessions with an open SAVEPOINT, in the order they began, with their scopes.
        self._holders: list[tuple[AsyncSession, Scope | None]] = []
        self._running: AsyncSession | None = None
        self._changed = asyncio.Event()

    def _may_run(self, session: AsyncSession, scope: Scope | None) -> bool:
        if self._running is not None and self._running is not session:
            return False
        holders = self._holders
        if not holders or holders[-1][0] is session:
            return True
        if any(holder is session for holder, _ in holders):  # savepoints above its own
            return False
        enclosing = _enclosing_scopes(scope)
        return all(holder_scope in enclosing for _, holder_scope in holders)

    async def take_turn(self, session: AsyncSession, scope: Scope | None) -> None:
        """Wait until ``session`` may use the connection, then mark it as using it.

        Raises:
            SharedConnectionBusyError: Its turn did not come within ``timeout`` seconds.
        """
        if not self._may_run(session, scope):
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.timeout
            while not self._may_run(session, scope):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise SharedConnectionBusyError(self.timeout, self._holders[-1][1])
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)
        self._running = session
        if not any(holder is session for holder, _ in self._holders):
            self._holders.append((session, scope))

    def done(self, session: AsyncSession) -> None:
        """``session`` finished an operation; it keeps its place while its transaction is open."""
        if self._running is session:
            self._running = None
        if not session.in_transaction():
            self.leave(session)
        else:
            self._signal()

    def leave(self, session: AsyncSession) -> None:
        """``session`` no longer has anything open on the connection."""
        if self._running is session:
            self._running = None
        self._holders = [held for held in self._holders if held[0] is not session]
        self._signal()

    def _signal(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


def _enclosing_scopes(scope: Scope | None) -> set[Scope]:
    enclosing = set()
    while scope is not None:
        enclosing.add(scope)
        scope = scope.parent
    return enclosing
