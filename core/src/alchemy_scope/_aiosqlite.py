"""aiosqlite: what a task cancelled while it awaits the driver would leave locked or unclosed.

``Database`` hooks every aiosqlite engine it makes or is given (:func:`watch_aiosqlite`).
"""

from __future__ import annotations

import asyncio
import functools
import threading
import weakref
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

# aiosqlite: what a cancelled task would leave to the garbage collector. A task cancelled while
# it awaits aiosqlite (a client gone from a streamed body, a timeout) can leave behind:
# - the sqlite3 cursor of a fetch it cancelled: SQLAlchemy takes the cancellation for a lost
#   connection and closes that connection with the cursor still open, held by the frames of the
#   cancellation's traceback or by the result. Python 3.11+ closes a sqlite3 connection with
#   sqlite3_close_v2: while one of its statements is unfinished the file stays read-locked, and
#   every writer waits for its busy timeout, then fails with "database is locked";
# - a connection whose opening it cancelled: aiosqlite drops it unclosed (3.13 warns).

_closing: set[asyncio.Task[None]] = set()  # connections opened for a cancelled task, closing
# The engines hooked (weakly: event.contains() can take a new engine for a collected one at
# the same address).
_watched: weakref.WeakSet[Any] = weakref.WeakSet()


def watch_aiosqlite(engine: AsyncEngine) -> None:
    """Hook ``engine`` if its driver is aiosqlite (once, however many Databases share it)."""
    sync_engine = engine.sync_engine
    if engine.dialect.driver != "aiosqlite" or sync_engine in _watched:
        return
    _watched.add(sync_engine)
    event.listen(sync_engine, "handle_error", _close_cursor_before_its_connection)
    event.listen(sync_engine, "do_connect", _connect_aiosqlite)


def _close_cursor_before_its_connection(context: Any) -> None:
    """A statement or fetch failed so that SQLAlchemy discards its connection: close its cursor.

    In aiosqlite's thread, whose queue runs in order: after the operation that failed, before
    the close SQLAlchemy queues next. Not awaited: the task may be cancelled, and anyio cancels
    every await of a cancelled task again.
    """
    execution = context.execution_context
    if not context.is_disconnect or execution is None:
        return
    driver_cursor = getattr(getattr(execution, "cursor", None), "_cursor", None)
    sqlite_cursor = getattr(driver_cursor, "_cursor", None)
    queue = getattr(getattr(driver_cursor, "_conn", None), "_tx", None)
    if sqlite_cursor is not None and queue is not None:
        done = asyncio.get_running_loop().create_future()  # aiosqlite 0.20 needs one
        done.add_done_callback(_ignore_outcome)
        queue.put_nowait((done, sqlite_cursor.close))


def _ignore_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: a cursor that failed to close is not worth a log


def _connect_aiosqlite(dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
    """Open the DBAPI connection as SQLAlchemy does, through :func:`_open_aiosqlite`."""
    dbapi = dialect.loaded_dbapi
    opener = functools.partial(_open_aiosqlite, dbapi.aiosqlite)
    return dbapi.connect(*cargs, async_creator_fn=opener, **cparams)


async def _open_aiosqlite(aiosqlite: Any, /, *args: Any, **kwargs: Any) -> Any:
    """Open an aiosqlite connection; if the caller is cancelled meanwhile, close it once open."""
    connection = aiosqlite.connect(*args, **kwargs)
    # As SQLAlchemy does: the interpreter's exit never waits for the thread (0.22+ has one).
    thread = connection if isinstance(connection, threading.Thread) else connection._thread
    thread.daemon = True
    opening = asyncio.ensure_future(_opened(connection))
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        opening.add_done_callback(_close_once_open)
        raise


async def _opened(connection: Any) -> Any:
    return await connection


def _close_once_open(opening: asyncio.Future[Any]) -> None:
    if opening.cancelled() or opening.exception() is not None:
        return
    closing = asyncio.ensure_future(opening.result().close())
    _closing.add(closing)
    closing.add_done_callback(_closing.discard)
