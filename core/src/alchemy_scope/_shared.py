"""A connection that every session of a Database uses for a while: a test's transaction."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncConnection

from ._errors import SharedConnectionBusyError

if TYPE_CHECKING:
    from ._core import Scope
    from ._database import ScopedSession


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
        self._holders: list[ScopedSession] = []  # sessions with an open SAVEPOINT, in order
        self._running: ScopedSession | None = None
        self._changed = asyncio.Event()

    def _may_run(self, session: ScopedSession) -> bool:
        if self._running is not None and self._running is not session:
            return False
        holders = self._holders
        if not holders or holders[-1] is session:
            return True
        if session in holders:  # later sessions hold savepoints above its own
            return False
        enclosing = _enclosing_scopes(session._alchemy_scope)
        return all(holder._alchemy_scope in enclosing for holder in holders)

    async def take_turn(self, session: ScopedSession) -> None:
        """Wait until ``session`` may use the connection, then mark it as using it.

        Raises:
            SharedConnectionBusyError: Its turn did not come within ``timeout`` seconds.
        """
        if not self._may_run(session):
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.timeout
            while not self._may_run(session):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise SharedConnectionBusyError(self.timeout, self._holders[-1]._alchemy_scope)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)
        self._running = session
        if session not in self._holders:
            self._holders.append(session)

    def done(self, session: ScopedSession) -> None:
        """``session`` finished an operation; it keeps its place while its transaction is open."""
        if self._running is session:
            self._running = None
        if not session.in_transaction():
            self.leave(session)
        else:
            self._signal()

    def leave(self, session: ScopedSession) -> None:
        """``session`` no longer has anything open on the connection."""
        if self._running is session:
            self._running = None
        if session in self._holders:
            self._holders.remove(session)
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
