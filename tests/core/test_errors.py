"""is_database_unavailable() against real failures on every leg, the async-driver check, links."""

from __future__ import annotations

import asyncio
import importlib.util
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool, NullPool

import alchemy_scope
from alchemy_scope import (
    AlchemyScopeError,
    AlreadyInstalledError,
    ConcurrentSessionUseError,
    Database,
    InsightOffError,
    MissingAsyncDriverError,
    NoScopeError,
    PgBouncerDriverError,
    ScopeClosedError,
    SharedConnectionBusyError,
    UnsupportedReplicasError,
    UnwatchedDatabaseError,
    is_database_unavailable,
)
from alchemy_scope._errors import DOCS_URL, _check_async_driver


async def _connect_error(url: str, **engine_options: object) -> BaseException:
    """The exception that connecting to ``url`` and running one statement raises."""
    engine = create_async_engine(url, poolclass=NullPool, **engine_options)  # type: ignore[arg-type]
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except Exception as error:
        return error
    finally:
        await engine.dispose()
    raise AssertionError(f"connecting to {url} did not fail")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def engine(leg_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(leg_url, poolclass=NullPool)
    yield engine
    await engine.dispose()


# --- configuration errors: a 500, never "try again later" -----------------------------------


async def test_wrong_user_or_password_is_not_unavailable(leg_url: str) -> None:
    """Access denied (MariaDB 1045, PostgreSQL 28000/28P01) is a configuration error."""
    if leg_url.startswith("sqlite"):
        pytest.skip("SQLite has no users")
    url = make_url(leg_url).set(username="alchemy_scope_no_such_user", password="wrong")
    error = await _connect_error(url.render_as_string(hide_password=False))
    assert not is_database_unavailable(error), repr(error)


async def test_missing_database_is_not_unavailable(leg_url: str) -> None:
    """A database that does not exist (MariaDB 1049, PostgreSQL 3D000) is not an outage."""
    if leg_url.startswith("sqlite"):
        # (aiosqlite's worker thread outlives a failed connect and then calls a closed loop)
        pytest.skip("SQLite creates a missing database file")
    url = make_url(leg_url).set(database="alchemy_scope_no_such_database")
    error = await _connect_error(url.render_as_string(hide_password=False))
    assert not is_database_unavailable(error), repr(error)


async def test_bad_sql_is_not_unavailable(engine: AsyncEngine) -> None:
    """A missing table (an OperationalError on SQLite) is the app's fault."""
    async with engine.connect() as conn:
        with pytest.raises(Exception) as caught:  # noqa: PT011 - each backend raises its own
            await conn.execute(text("SELECT * FROM alchemy_scope_no_such_table"))
    assert not is_database_unavailable(caught.value), repr(caught.value)


async def test_constraint_violation_is_not_unavailable(engine: AsyncEngine) -> None:
    """A constraint violation is the request's fault: not a 503."""
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE unavailable_probe (id INTEGER PRIMARY KEY)"))
    try:
        async with engine.connect() as conn:
            await conn.execute(text("INSERT INTO unavailable_probe (id) VALUES (1)"))
            with pytest.raises(IntegrityError) as caught:
                await conn.execute(text("INSERT INTO unavailable_probe (id) VALUES (1)"))
        assert not is_database_unavailable(caught.value)
    finally:
        async with engine.begin() as conn:
            await conn.execute(text("DROP TABLE unavailable_probe"))


# --- the database cannot serve now: a 503 -------------------------------------------------


async def test_refused_connection_is_unavailable(leg_url: str) -> None:
    """A server that refuses the connection is an outage: a 503."""
    if leg_url.startswith("sqlite"):
        pytest.skip("SQLite has no server")
    url = make_url(leg_url).set(host="127.0.0.1", port=_free_port())
    error = await _connect_error(url.render_as_string(hide_password=False))
    assert is_database_unavailable(error), repr(error)


async def test_exhausted_pool_is_unavailable(leg_url: str) -> None:
    """No pooled connection free within the pool's timeout is a 503."""
    engine = create_async_engine(  # a queue pool on SQLite too (older SQLAlchemy: NullPool)
        leg_url, poolclass=AsyncAdaptedQueuePool, pool_size=1, max_overflow=0, pool_timeout=0.1
    )
    try:
        async with engine.connect() as held:
            await held.execute(text("SELECT 1"))
            with pytest.raises(Exception) as caught:  # noqa: PT011 - sqlalchemy's TimeoutError
                async with engine.connect():
                    pass
        assert is_database_unavailable(caught.value), repr(caught.value)
    finally:
        await engine.dispose()


async def test_locked_sqlite_database_is_unavailable(tmp_path: Path) -> None:
    """Another connection holding the write lock: busy, retrying helps."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'locked.db'}"
    holder = create_async_engine(url, poolclass=NullPool)
    waiter = create_async_engine(url, poolclass=NullPool, connect_args={"timeout": 0})
    try:
        async with holder.connect() as conn:
            await conn.execute(text("CREATE TABLE t (id INTEGER)"))
            await conn.commit()
            await conn.exec_driver_sql("BEGIN IMMEDIATE")
            await conn.execute(text("INSERT INTO t VALUES (1)"))
            async with waiter.connect() as other:
                with pytest.raises(Exception) as caught:  # noqa: PT011 - OperationalError
                    await other.execute(text("INSERT INTO t VALUES (2)"))
            await conn.rollback()
        assert "locked" in str(caught.value)
        assert is_database_unavailable(caught.value), repr(caught.value)
    finally:
        await holder.dispose()
        await waiter.dispose()


def test_plain_exceptions_are_not_unavailable() -> None:
    """Non-database errors are not outages; connection resets are."""
    assert not is_database_unavailable(ValueError("bad input"))
    assert not is_database_unavailable(asyncio.CancelledError())
    assert is_database_unavailable(ConnectionResetError())


# --- a URL without an async driver ----------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["sqlite:///app.db", "postgresql+psycopg2://user:secret@db/app", "mysql+pymysql://u@h/d"],
)
def test_synchronous_driver_is_refused_with_a_hint(url: str) -> None:
    """A URL with a synchronous or missing driver is refused, naming the async one to use."""
    with pytest.raises(MissingAsyncDriverError) as caught:
        _check_async_driver(url)
    message = str(caught.value)
    assert "synchronous driver" in message
    assert "+aiosqlite" in message or "+asyncpg" in message or "+asyncmy" in message
    assert "secret" not in message
    assert isinstance(caught.value, AlchemyScopeError)
    assert isinstance(caught.value, ValueError)


def test_uninstalled_async_driver_is_named() -> None:
    """``postgresql://`` means psycopg (3) on SQLAlchemy 2.1: say so, and what to write."""
    if importlib.util.find_spec("psycopg") is not None:
        pytest.skip("psycopg is installed here")
    with pytest.raises(MissingAsyncDriverError) as caught:
        _check_async_driver("postgresql+psycopg://user:secret@db/app")
    message = str(caught.value)
    assert "'psycopg' is not installed" in message
    assert "postgresql+asyncpg://" in message
    assert "pip install asyncpg" in message
    assert "secret" not in message


@pytest.mark.parametrize(
    "url",
    [
        "sqlite+aiosqlite:///app.db",
        "postgresql+asyncpg://u@h/d",
        "mysql+asyncmy://u@h/d",
        "no_such_dialect://u@h/d",  # SQLAlchemy's own error says it better
    ],
)
def test_async_drivers_pass(url: str) -> None:
    """URLs naming an installed async driver pass the check."""
    _check_async_driver(url)
    _check_async_driver(make_url(url))


def test_database_refuses_a_url_without_an_async_driver() -> None:
    with pytest.raises(MissingAsyncDriverError, match=r"sqlite\+aiosqlite:///"):
        Database("sqlite:///app.db")
    with pytest.raises(MissingAsyncDriverError, match="synchronous driver") as caught:
        Database("mysql+pymysql://app:secret@db/app")
    assert "secret" not in str(caught.value)


# --- every message ends with its documentation link ---------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        NoScopeError(),
        ScopeClosedError(),
        ConcurrentSessionUseError("execute", "scalar"),
        ConcurrentSessionUseError("add", "execute", synchronous=True),
        SharedConnectionBusyError(10, "<Scope GET />"),
        AlreadyInstalledError("`install(app, db)`"),
        MissingAsyncDriverError("sqlite", "uses pysqlite, a synchronous driver"),
        UnwatchedDatabaseError("Database('sqlite+aiosqlite://', commit='autocommit')"),
        InsightOffError("Database('sqlite+aiosqlite://', commit='manual')"),
        UnsupportedReplicasError("mysql+asyncmy://root@127.0.0.1/test"),
        PgBouncerDriverError("postgresql+psycopg"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_message_ends_with_its_documentation_link(error: AlchemyScopeError) -> None:
    """Every exception's message ends with the link to its section of the errors page."""
    link = f"{DOCS_URL}errors/#{type(error).__name__.lower()}"
    assert str(error).endswith(link)


def test_every_public_exception_has_a_link_test() -> None:
    """No exported exception is left out of the documentation-link test above."""
    exported = {
        name
        for name in alchemy_scope.__all__
        if isinstance(getattr(alchemy_scope, name), type)
        and issubclass(getattr(alchemy_scope, name), AlchemyScopeError)
        and name != "AlchemyScopeError"
    }
    tested = {
        "NoScopeError",
        "ScopeClosedError",
        "ConcurrentSessionUseError",
        "SharedConnectionBusyError",
        "AlreadyInstalledError",
        "MissingAsyncDriverError",
        "UnwatchedDatabaseError",
        "InsightOffError",
        "UnsupportedReplicasError",
        "PgBouncerDriverError",
    }
    assert exported <= tested
