"""The pytest plugin: each test in a transaction rolled back at its end, through real runs."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import Iterator

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, func, select, text

from alchemy_scope import Database, SharedConnectionBusyError
from alchemy_scope.pytest_plugin import rolled_back_transaction

from ..conftest import MakeDatabase
from ..models import Item
from ..support import count_items, item_names, leg_options, registry

# The conftest.py of the test suites the plugin's tests run: a Database on this leg's
# database and a raw ASGI app (no framework) that writes through ScopeMiddleware.
CONFTEST = """
import asyncio
import json

import pytest
from alchemy_scope import Database, ScopeMiddleware
from sqlalchemy import String, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import NullPool


class Base(DeclarativeBase):
    pass


class Row(Base):
    __tablename__ = "alchemy_scope_plugin_rows"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50), unique=True)


db = Database({url!r}, commit="autocommit", engine_options={{"poolclass": NullPool}}{options})


@pytest.fixture
def alchemy_database():
    return db


async def count():
    async with db.scope():
        return await db.session.scalar(select(func.count()).select_from(Row))


async def asgi(scope, receive, send):
    # POST /<name>?status=<code>: insert a row, answer <code>; /<name>/raise raises.
    name, _, action = scope["path"].strip("/").partition("/")
    db.session.add(Row(name=name))
    await db.session.flush()
    await asyncio.sleep(0.005)  # concurrent requests interleave here
    if action == "raise":
        raise RuntimeError("handler failed")
    status = int(scope["query_string"].decode().partition("=")[2] or 201)
    await send({{"type": "http.response.start", "status": status, "headers": []}})
    await send({{"type": "http.response.body", "body": json.dumps({{"n": 1}}).encode()}})


app = ScopeMiddleware(asgi)
"""

WRITES_AND_READS = """
import asyncio

import httpx
from conftest import Row, app, count, db


async def test_writes(alchemy_db):
    async with db.scope():
        db.session.add(Row(name="committed by a scope"))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.post("/through-the-app")).status_code == 201
        assert (await client.post("/refused?status=400")).status_code == 400
        assert (await client.post("/crashed/raise")).status_code == 500
        statuses = await asyncio.gather(*(client.post(f"/concurrent-{i}") for i in range(8)))
    assert {response.status_code for response in statuses} == {201}
    assert await count() == 10


async def test_sees_nothing(alchemy_db):
    assert await count() == 0
"""


ROWS = Table(
    "alchemy_scope_plugin_rows",
    MetaData(),
    Column("id", Integer, primary_key=True),
    Column("name", String(50), unique=True),
)


def run_suite(pytester: pytest.Pytester, url: str, tests: str, *args: str) -> pytest.RunResult:
    options = "".join(f", {name}={value!r}" for name, value in leg_options(url).items())
    pytester.makeconftest(CONFTEST.format(url=url, options=options))
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makepyfile(test_suite=textwrap.dedent(tests))
    return pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider", *args)


@pytest.fixture
def rows_table(leg_url: str) -> Iterator[str]:
    """Create the plugin suite's table on this leg, empty; drop it afterwards."""

    async def create(drop_only: bool) -> None:
        database = Database(leg_url, **leg_options(leg_url))
        async with database.engine.begin() as connection:
            await connection.run_sync(ROWS.metadata.drop_all)
            if not drop_only:
                await connection.run_sync(ROWS.metadata.create_all)
        await database.dispose()

    asyncio.run(create(drop_only=False))
    yield leg_url
    asyncio.run(create(drop_only=True))


def committed_rows(url: str) -> int:
    async def count() -> int:
        database = Database(url, **leg_options(url))
        async with database.engine.connect() as connection:
            rows = await connection.scalar(text("SELECT count(*) FROM alchemy_scope_plugin_rows"))
        await database.dispose()
        return int(rows or 0)

    return asyncio.run(count())


@pytest.mark.parametrize(
    "order", [("test_writes", "test_sees_nothing"), ("test_sees_nothing", "test_writes")]
)
def test_what_a_test_commits_is_gone_for_the_next_one(
    pytester: pytest.Pytester, rows_table: str, order: tuple[str, str]
) -> None:
    """A test that commits (by scope, by app, by concurrent requests) leaves nothing behind."""
    result = run_suite(
        pytester, rows_table, WRITES_AND_READS, *(f"test_suite.py::{name}" for name in order)
    )
    result.assert_outcomes(passed=2)
    assert committed_rows(rows_table) == 0


def test_a_failing_test_is_rolled_back_too(pytester: pytest.Pytester, rows_table: str) -> None:
    """A test that commits and then fails leaves nothing for the next test."""
    tests = """
    from conftest import Row, count, db

    async def test_commits_then_fails(alchemy_db):
        async with db.scope():
            db.session.add(Row(name="doomed"))
        assert await count() == 1
        raise AssertionError("the test fails after committing")

    async def test_sees_nothing(alchemy_db):
        assert await count() == 0
    """
    result = run_suite(pytester, rows_table, tests)
    result.assert_outcomes(passed=1, failed=1)
    assert committed_rows(rows_table) == 0


def test_the_test_body_and_the_app_share_one_transaction(
    pytester: pytest.Pytester, rows_table: str
) -> None:
    """The test body reads with db.session, the app writes, the body sees the app's write."""
    tests = """
    import httpx
    from sqlalchemy import select
    from conftest import Row, app, db

    async def test_body_then_app_then_body(alchemy_session):
        assert alchemy_session is db.session
        db.session.add(Row(name="from the test"))
        await db.session.flush()  # the test's savepoint stays open around the request
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.post("/from-the-app")).status_code == 201
        names = await db.session.scalars(select(Row.name).order_by(Row.id))
        assert list(names) == ["from the test", "from-the-app"]
    """
    result = run_suite(pytester, rows_table, tests)
    result.assert_outcomes(passed=1)
    assert committed_rows(rows_table) == 0


def test_without_the_database_fixture_the_error_says_what_to_define(
    pytester: pytest.Pytester, rows_table: str
) -> None:
    """Using the fixtures without overriding alchemy_database explains what to write."""
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makepyfile(test_suite="async def test_it(alchemy_db):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*def alchemy_database():*"])


async def test_bound_to_joins_sessions_to_one_rolled_back_transaction(db: Database) -> None:
    """bound_to(): scopes commit into the connection's transaction; rollback undoes all."""
    async with db.engine.connect() as connection, rolled_back_transaction(connection):
        with db.bound_to(connection):
            async with db.scope():
                db.session.add(Item(name="inside"))
                await db.session.commit()
            async with db.scope():
                db.session.add(Item(name="rolled back to its savepoint"))
                await db.session.flush()
                await db.session.rollback()
                assert await db.session.scalar(select(func.count()).select_from(Item)) == 1
    assert await count_items(db) == 0
    assert registry(db) == {}


async def test_side_by_side_scopes_wait_then_fail_with_a_clear_error(
    make_db: MakeDatabase,
) -> None:
    """A scope whose sibling holds the shared connection waits, then names the holder."""
    db = make_db()
    async with db.engine.connect() as connection, rolled_back_transaction(connection):
        with db.bound_to(connection, timeout=0.2):
            holder_ready = asyncio.Event()
            release = asyncio.Event()

            async def holder() -> None:
                async with db.scope():
                    await db.session.execute(select(Item))  # opens its savepoint
                    holder_ready.set()
                    await release.wait()

            task = asyncio.create_task(holder())
            await holder_ready.wait()
            with pytest.raises(SharedConnectionBusyError, match="commit or roll back"):
                async with db.scope():
                    await db.session.execute(select(Item))
            release.set()
            await task
            async with db.scope():  # once the holder has ended, the turn comes
                await db.session.execute(select(Item))
    assert await item_names(db) == []
