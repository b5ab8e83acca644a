"""A fault injector: make the Nth database operation of a run fail, in turn, like SQLite's tests.

The injector hooks one engine at the points where SQLAlchemy meets the driver, so the fault
is what the driver would do and SQLAlchemy's own handling (wrapping, invalidation, pool
reset) runs for real:

- ``checkout``: a connection leaves the pool (pool ``checkout`` event);
- ``execute <VERB>``: a statement (``Dialect.do_execute`` and friends);
- ``fetch``: a read from a streamed (server-side) cursor;
- ``commit`` / ``rollback``: the DBAPI COMMIT / ROLLBACK (``Dialect.do_commit``/``do_rollback``);
- ``return``: the connection goes back to the pool (pool ``reset`` event), and
  ``rollback on return`` the ROLLBACK the pool may run then.

Faults, applied just before the operation runs:

- ``error``: the driver raises its ``OperationalError``;
- ``lost``: the connection dies for real (PostgreSQL: ``pg_terminate_backend``; MariaDB:
  ``KILL``; SQLite: the driver connection is closed), then the operation runs on it;
- ``cancel``: the task running the operation is cancelled, then the operation runs (and is
  interrupted at its first await, as a timeout would);
- ``disconnect`` (behind a real server only): the client drops its connection, then the
  operation runs; the server and framework react as they do to a real disconnect.

Record a run first (``FaultInjector.recording``), then arm each recorded operation with
each fault in turn: the cases are generated from what a scenario really does.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util import await_only

FAULTS = ("error", "lost", "cancel")
# SQLite has no connection to lose: closing the driver connection from under SQLAlchemy is
# not a failure SQLite can have (the "lost" fault is for client/server databases).
SQLITE_FAULTS = ("error", "cancel")


_FETCHES = ("fetchone", "fetchmany", "fetchall")


class InjectedError(Exception):
    """Marks the driver errors this module raises (mixed into the driver's own class)."""


@dataclasses.dataclass(frozen=True)
class Case:
    """One generated case: fail the ``index``-th operation (``label``) with ``fault``."""

    index: int
    label: str
    fault: str

    def __str__(self) -> str:
        return f"#{self.index} {self.label} <- {self.fault}"


class FaultInjector:
    """Counts one engine's database operations and fails the armed one.

    Args:
        engine: The engine to hook; its dialect and pool are patched until ``remove()``.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.operations: list[str] = []
        self.armed: Case | None = None
        self.fired: Case | None = None
        self.mismatch: str | None = None
        # Set by a client behind a real server: drop the connection of the request in flight.
        self.disconnect: Callable[[], None] | None = None
        self._returning = False
        sync_engine = engine.sync_engine
        self._dialect = dialect = sync_engine.dialect
        self._patched: dict[str, Any] = {}
        self._cursor_classes: dict[type, dict[str, Any]] = {}
        for name in ("do_execute", "do_execute_no_params", "do_executemany"):
            self._patch(name, self._wrap_execute)
        self._patch("do_commit", lambda original: self._wrap_simple(original, "commit"))
        self._patch("do_rollback", self._wrap_rollback)
        self._listeners: list[tuple[Any, str, Callable[..., Any]]] = [
            (sync_engine.pool, "checkout", self._on_checkout),
            (sync_engine.pool, "reset", self._on_reset),
        ]
        for target, name, listener in self._listeners:
            event.listen(target, name, listener)
        self._error_class = type(
            "InjectedOperationalError", (dialect.loaded_dbapi.OperationalError, InjectedError), {}
        )

    def remove(self) -> None:
        """Undo every hook."""
        for name in self._patched:
            delattr(self._dialect, name)
        for cursor_class, originals in self._cursor_classes.items():
            for name, original in originals.items():
                if original is None:
                    delattr(cursor_class, name)
                else:
                    setattr(cursor_class, name, original)
        for target, name, listener in self._listeners:
            event.remove(target, name, listener)

    def arm(self, case: Case | None) -> None:
        """Fail ``case`` (counting operations from zero again); ``None`` only records."""
        self.operations = []
        self.armed = case
        self.fired = None
        self.mismatch = None

    def cases(self, *extra_faults: str) -> list[Case]:
        """Every recorded operation with every fault (and ``extra_faults``: ``disconnect``)."""
        faults = SQLITE_FAULTS if self.engine.dialect.name == "sqlite" else FAULTS
        faults = (*faults, *extra_faults)
        return [
            Case(index, label, fault)
            for index, label in enumerate(self.operations)
            for fault in faults
            # A connection killed as it returns to the pool dies idle there: the ROLLBACK the
            # pool may run is no I/O for some drivers (asyncpg after a COMMIT), and the next
            # user's first statement meets the dead connection (pool_pre_ping's job, not a
            # scope's). The "error" fault covers a return that fails.
            if not (label in ("return", "rollback on return") and fault == "lost")
        ]

    # -- hooks ---------------------------------------------------------------------------

    def _patch(self, name: str, wrap: Callable[[Any], Any]) -> None:
        original = getattr(self._dialect, name)
        self._patched[name] = original
        setattr(self._dialect, name, wrap(original))

    def _operation(self, label: str, driver_connection: Any) -> None:
        """Count one operation; apply the fault if it is the armed one."""
        index = len(self.operations)
        self.operations.append(label)
        armed = self.armed
        if armed is None or armed.index != index or self.fired is not None:
            return
        if armed.label != label:  # this run took another path: the case does not apply
            self.mismatch = label
            return
        self.fired = armed
        if armed.fault == "error":
            raise self._error_class(f"injected fault at {armed}")
        if armed.fault == "lost":
            await_only(_kill(self.engine.url, driver_connection))
        elif armed.fault == "disconnect":  # the client drops the connection, then it goes on
            assert self.disconnect is not None
            self.disconnect()
            await_only(asyncio.sleep(0.05))  # the server sees the connection go
        else:  # cancel: the next await of this task raises CancelledError
            task = asyncio.current_task()
            assert task is not None
            if _is_private_ending_task(task):
                # The task alchemy-scope ends a scope in is its own and shielded: nothing
                # can cancel it. A cancellation of the request while it ends is the
                # request's task, covered by the scope-end cancellation tests.
                self.fired = None
                return
            task.cancel()

    def _wrap_execute(self, original: Any) -> Any:
        def execute(cursor: Any, statement: str, *args: Any) -> Any:
            context = args[-1]
            verb = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else "?"
            self._operation(f"execute {verb}", context.root_connection.connection.driver_connection)
            result = original(cursor, statement, *args)
            if getattr(context, "_is_server_side", False):
                self._watch_fetches(type(cursor))
            return result

        return execute

    def _watch_fetches(self, cursor_class: type) -> None:
        """Count every fetch of this server-side cursor class (its instances refuse patching)."""
        if cursor_class in self._cursor_classes:
            return
        self._cursor_classes[cursor_class] = {
            name: cursor_class.__dict__.get(name) for name in _FETCHES
        }
        for name in _FETCHES:
            setattr(cursor_class, name, self._counting_fetch(getattr(cursor_class, name)))

    def _counting_fetch(self, original: Any) -> Any:
        def fetch(cursor: Any, *args: Any) -> Any:
            self._operation("fetch", cursor._adapt_connection.driver_connection)
            return original(cursor, *args)

        return fetch

    def _wrap_simple(self, original: Any, label: str) -> Any:
        def call(dbapi_connection: Any) -> Any:
            self._operation(label, dbapi_connection.driver_connection)
            return original(dbapi_connection)

        return call

    def _wrap_rollback(self, original: Any) -> Any:
        def rollback(dbapi_connection: Any) -> Any:
            label = "rollback on return" if self._returning else "rollback"
            self._returning = False
            self._operation(label, dbapi_connection.driver_connection)
            return original(dbapi_connection)

        return rollback

    def _on_checkout(self, dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        self._operation("checkout", dbapi_connection.driver_connection)

    def _on_reset(self, dbapi_connection: Any, _record: Any, state: Any) -> None:
        self._returning = not state.transaction_was_reset
        self._operation("return", dbapi_connection.driver_connection)


def _is_private_ending_task(task: asyncio.Task[Any]) -> bool:
    return getattr(task.get_coro(), "__qualname__", "") == "_end_sessions"


async def _kill(url: URL, driver_connection: Any) -> None:
    """End ``driver_connection`` from the server side (SQLite: close it), as a crash would."""
    backend = url.get_backend_name()
    if backend == "sqlite":
        await driver_connection.close()
        return
    if backend == "postgresql":
        import asyncpg

        admin = await asyncpg.connect(
            user=url.username, host=url.host, port=url.port or 5432, database=url.database
        )
        try:  # the timeout makes it wait until the backend has gone
            await admin.execute(
                "SELECT pg_terminate_backend($1, 5000)", driver_connection.get_server_pid()
            )
        finally:
            await admin.close()
        return
    import asyncmy

    thread_id = driver_connection.thread_id()
    admin = await asyncmy.connect(
        host=url.host, port=url.port or 3306, user=url.username, password=url.password or ""
    )
    try:
        async with admin.cursor() as cursor:
            await cursor.execute(f"KILL {int(thread_id)}")
            for _ in range(100):  # until the server has dropped it
                await cursor.execute(
                    "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = %s",
                    (thread_id,),
                )
                if (await cursor.fetchone())[0] == 0:
                    break
                await asyncio.sleep(0.01)
    finally:
        admin.close()
