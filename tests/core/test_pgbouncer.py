"""PgBouncer in transaction mode: ``Database(url, pgbouncer=True)`` and its engine options."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

import alchemy_scope
from alchemy_scope import Database, PgBouncerDriverError, pgbouncer_engine_options

from ..support import PGBOUNCER_ENV, assert_no_leaks, database_legs, through_pgbouncer

BOUNCER_URL = "postgresql+asyncpg://app@127.0.0.1:6432/app"


@pytest.fixture
def bouncer_url() -> str:
    """This run's database through the PgBouncer leg; skipped (saying so) without one."""
    legs = [leg for leg in database_legs() if through_pgbouncer(leg)]
    if not legs:
        pytest.skip(
            f"needs a PgBouncer in transaction mode: `nox -s pgbouncer` starts one, or set "
            f"{PGBOUNCER_ENV}=host:port"
        )
    return legs[0]


def test_options_turn_both_caches_off_and_name_every_statement_uniquely() -> None:
    """The options turn asyncpg's and SQLAlchemy's statement caches off, and no name repeats."""
    connect_args = pgbouncer_engine_options(BOUNCER_URL)["connect_args"]
    assert connect_args["statement_cache_size"] == 0
    assert connect_args["prepared_statement_cache_size"] == 0
    names = {connect_args["prepared_statement_name_func"]() for _ in range(1000)}
    assert len(names) == 1000
    assert all(name.startswith("__asyncpg_") for name in names)


def test_your_engine_options_are_kept_and_your_connect_args_win() -> None:
    """Options given along are returned with them; a connect_args key of yours wins."""
    options = pgbouncer_engine_options(
        BOUNCER_URL,
        {"pool_size": 3, "connect_args": {"statement_cache_size": 5, "timeout": 2}},
    )
    assert options["pool_size"] == 3
    assert options["connect_args"]["statement_cache_size"] == 5
    assert options["connect_args"]["timeout"] == 2
    assert options["connect_args"]["prepared_statement_cache_size"] == 0


@pytest.mark.parametrize(
    "url",
    [
        "sqlite+aiosqlite:///app.db",
        "postgresql+psycopg://app@127.0.0.1:6432/app",
        "postgresql://app@127.0.0.1:6432/app",
        "mysql+asyncmy://app@127.0.0.1:3306/app",
    ],
)
def test_pgbouncer_with_another_driver_says_to_use_asyncpg(url: str) -> None:
    """pgbouncer=True with a driver other than asyncpg raises, saying which URL to write."""
    with pytest.raises(PgBouncerDriverError, match=r"postgresql\+asyncpg://") as raised:
        Database(url, pgbouncer=True)
    assert isinstance(raised.value, ValueError)
    assert str(raised.value).endswith(
        f"{alchemy_scope._errors.DOCS_URL}errors/#pgbouncerdrivererror"
    )
    with pytest.raises(PgBouncerDriverError):
        pgbouncer_engine_options(url)


async def test_pgbouncer_with_an_engine_says_to_pass_the_options_to_it() -> None:
    """pgbouncer=True beside an engine raises TypeError naming pgbouncer_engine_options."""
    engine = create_async_engine(BOUNCER_URL)
    try:
        with pytest.raises(TypeError, match="pgbouncer_engine_options"):
            Database(engine, pgbouncer=True)
    finally:
        await engine.dispose()


async def _busy_clients(databases: list[Database]) -> None:
    """Scopes on every database at once, each running several parametrized statements."""

    async def work(db: Database, n: int) -> None:
        for i in range(10):
            async with db.scope():
                assert (
                    await db.session.scalar(
                        text("SELECT CAST(:a AS INTEGER) + :b"), {"a": n, "b": i}
                    )
                    == n + i
                )
                await db.session.execute(text("SELECT 1"))

    # Every client runs to its end, failed or not: none is left holding a connection.
    jobs = (work(db, n) for n, db in enumerate(databases) for _ in range(3))
    errors = [e for e in await asyncio.gather(*jobs, return_exceptions=True) if e is not None]
    if errors:
        raise errors[0]


async def test_many_clients_through_pgbouncer_run_every_statement(bouncer_url: str) -> None:
    """Through PgBouncer in transaction mode, Databases with pgbouncer=True never collide."""
    databases = [Database(bouncer_url, pgbouncer=True) for _ in range(4)]
    try:
        await _busy_clients(databases)
        await assert_no_leaks(*databases)
    finally:
        for db in databases:
            await db.dispose()


async def test_the_leg_pools_by_transaction_so_plain_asyncpg_fails(bouncer_url: str) -> None:
    """The leg is real transaction pooling: asyncpg's default caches fail on it."""
    failure: DBAPIError | None = None
    for _ in range(5):  # the first round fails in practice; five make it certain enough
        databases = [Database(bouncer_url) for _ in range(4)]
        try:
            await _busy_clients(databases)
        except DBAPIError as error:
            failure = error
            break
        finally:
            for db in databases:
                await db.dispose()
    assert failure is not None, (
        "asyncpg's statement cache worked: PgBouncer not in transaction mode?"
    )
    assert "prepared statement" in str(failure)
