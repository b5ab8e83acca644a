"""pytest fixtures: every test runs in one transaction that is rolled back when it ends.

Installed with alchemy-scope as a ``pytest11`` plugin; it does nothing until a test asks for
its fixtures. Tell it which database your app uses, in ``conftest.py``::

    import pytest
    from myapp import db

    @pytest.fixture
    def alchemy_database():
        return db

Then a test that requests ``alchemy_db`` (or ``alchemy_session``) runs inside a transaction
on one connection: every session opened meanwhile (``db.session`` in the test, ``async with
db.scope()`` blocks, the requests the test sends through the app) joins it through a
SAVEPOINT, and it is rolled back at the end of the test, whatever the app committed.

Strict N+1 mode: with ``alchemy_scope_strict_n_plus_one = true`` in the pytest ini (or
``-o alchemy_scope_strict_n_plus_one=true``), a test during which a ``Database`` created with
``insight`` reports an N+1 suspect (a statement run more than ``repeat_limit`` times in one
scope) fails, with the statement in the message.

Fixtures:
    alchemy_database: Override it: your app's ``Database``.
    alchemy_connection: The test's ``AsyncConnection``, in the transaction rolled back at
        the end.
    alchemy_db: Your ``Database``, bound to that connection for the test.
    alchemy_session: ``db.session`` of a scope opened for the test body, which can also use
        ``db.session`` directly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from ._database import Database
from ._insight import RepeatedStatement, repeat_listeners

async_fixture: Callable[..., Any]
try:  # pytest-asyncio runs async fixtures in strict mode as well as auto mode
    from pytest_asyncio import fixture as async_fixture
except ImportError:  # pragma: no cover - anyio's plugin runs plain async fixtures
    async_fixture = pytest.fixture


STRICT_OPTION = "alchemy_scope_strict_n_plus_one"
_suspects_key = pytest.StashKey[list[RepeatedStatement]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    """Declare the strict N+1 mode's ini option."""
    parser.addini(
        STRICT_OPTION,
        "Fail a test in which a Database with insight reports an N+1 query suspect.",
        type="bool",
        default=False,
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Any:
    """In strict N+1 mode, collect the suspects reported from the test's setup on."""
    if item.config.getini(STRICT_OPTION):
        suspects: list[RepeatedStatement] = []
        item.stash[_suspects_key] = suspects
        repeat_listeners.append(suspects.append)
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    """In strict N+1 mode, fail the test if a suspect was reported while it ran."""
    result = yield
    _fail_on_suspects(item)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Any:
    """In strict N+1 mode, stop collecting; a suspect reported by the teardown is an error."""
    try:
        return (yield)
    finally:
        suspects = item.stash.get(_suspects_key, None)
        if suspects is not None and suspects.append in repeat_listeners:
            repeat_listeners.remove(suspects.append)
            _fail_on_suspects(item)


def _fail_on_suspects(item: pytest.Item) -> None:
    suspects = item.stash.get(_suspects_key, None)
    if suspects:
        found, suspects[:] = list(suspects), []
        pytest.fail(
            f"{STRICT_OPTION}: " + "\n".join(str(suspect) for suspect in found), pytrace=False
        )


@pytest.fixture
def alchemy_database() -> Database:
    """Your app's ``Database``: override this fixture in your ``conftest.py``."""
    raise pytest.UsageError(
        "alchemy-scope's fixtures need your app's Database: define it in conftest.py as\n\n"
        "    @pytest.fixture\n"
        "    def alchemy_database():\n"
        "        return db  # your app's alchemy_scope.Database\n"
    )


@async_fixture
async def alchemy_connection(alchemy_database: Database) -> AsyncIterator[AsyncConnection]:
    """One connection in a transaction that is rolled back when the test ends."""
    engine = alchemy_database.engine
    pool = engine.pool
    async with engine.connect() as connection:
        async with rolled_back_transaction(connection):
            yield connection
        if engine.pool is not pool:  # the app disposed the engine (its shutdown) meanwhile:
            await connection.invalidate()  # its old pool would not close this connection


@asynccontextmanager
async def rolled_back_transaction(connection: AsyncConnection) -> AsyncIterator[None]:
    """Run the block in a transaction on ``connection`` that is rolled back at its end.

    Sessions of a database ``bound_to(connection)`` nest SAVEPOINTs inside it. On SQLite the
    sqlite3 driver begins transactions on its own and not before a SAVEPOINT: this takes that
    over, as SQLAlchemy's documentation recommends, for the block's duration.
    """
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        previous = await connection.run_sync(_set_driver_isolation, None)
    try:
        transaction = await connection.begin()
        if sqlite:
            await connection.exec_driver_sql("BEGIN")
        try:
            yield
        finally:
            await transaction.rollback()
    finally:
        if sqlite:
            await connection.run_sync(_set_driver_isolation, previous)


@async_fixture
async def alchemy_db(
    alchemy_database: Database, alchemy_connection: AsyncConnection
) -> AsyncIterator[Database]:
    """Your ``Database``, its sessions joining the test's transaction for the whole test."""
    with alchemy_database.bound_to(alchemy_connection):
        yield alchemy_database


@async_fixture
async def alchemy_session(alchemy_db: Database) -> AsyncIterator[AsyncSession]:
    """``db.session`` in a scope opened for the test body."""
    async with alchemy_db.scope():
        yield alchemy_db.session


def _set_driver_isolation(connection: Connection, level: Any) -> Any:
    """Set the sqlite3 driver's ``isolation_level``; return the one it had."""
    dbapi_connection: Any = connection.connection.dbapi_connection
    previous = dbapi_connection.isolation_level
    dbapi_connection.isolation_level = level
    return previous
