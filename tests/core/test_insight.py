"""Insight: what each scope cost a database, N+1 warnings and Server-Timing, on real databases."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import ForeignKey, String, event, func, select, text
from sqlalchemy.ext.asyncio import AsyncAttrs
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from alchemy_scope import (
    AlchemyScopeError,
    Database,
    Insight,
    InsightOffError,
    NoScopeError,
    Scope,
    ScopeFigures,
    ScopeMiddleware,
    current_scope,
)

from ..conftest import MakeDatabase
from ..models import Item

Ended = list[tuple[Scope, ScopeFigures]]


class ShelfBase(AsyncAttrs, DeclarativeBase):
    pass


class Shelf(ShelfBase):
    __tablename__ = "alchemy_scope_insight_shelves"
    id: Mapped[int] = mapped_column(primary_key=True)
    books: Mapped[list[Book]] = relationship()


class Book(ShelfBase):
    __tablename__ = "alchemy_scope_insight_books"
    id: Mapped[int] = mapped_column(primary_key=True)
    shelf_id: Mapped[int] = mapped_column(ForeignKey(Shelf.id))
    title: Mapped[str] = mapped_column(String(50))


def watched(
    make_db: MakeDatabase, engine_options: dict[str, Any] | None = None, **options: Any
) -> tuple[Database, Ended]:
    """A Database with insight on, and the list its ``on_scope_end`` appends each scope to."""
    ended: Ended = []
    insight = Insight(on_scope_end=lambda scope, figures: ended.append((scope, figures)), **options)
    return make_db(insight=insight, engine_options=engine_options or {}), ended


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def respond(send: Any, body: bytes = b"ok") -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
async def shelves(make_db: MakeDatabase) -> AsyncIterator[None]:
    """The shelves and books tables, with 8 shelves of one book each."""
    setup = make_db()
    async with setup.engine.begin() as conn:
        await conn.run_sync(ShelfBase.metadata.drop_all)
        await conn.run_sync(ShelfBase.metadata.create_all)
    async with setup.scope():
        for number in range(1, 9):  # MySQL takes an id of 0 for "generate one"
            setup.session.add(Shelf(id=number, books=[Book(title=f"book {number}")]))
        await setup.session.commit()
    yield
    async with setup.engine.begin() as conn:
        await conn.run_sync(ShelfBase.metadata.drop_all)


async def test_a_route_with_three_statements_and_a_commit_reports_exactly_that(
    make_db: MakeDatabase,
) -> None:
    """A request running 3 statements and committing reports 3 statements, 1 commit, 0 rollbacks."""
    db, ended = watched(make_db, server_timing=True)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await db.session.execute(text("INSERT INTO alchemy_scope_items (name) VALUES ('one')"))
        await db.session.scalar(select(func.count()).select_from(Item))  # 2
        await db.session.execute(select(Item.name))  # 3
        await db.session.commit()
        await respond(send)

    async with client(ScopeMiddleware(app, databases=[db])) as http:
        response = await http.get("/items")
    assert response.status_code == 200
    [(scope, figures)] = ended
    assert "GET /items" in repr(scope)
    assert (figures.statements, figures.commits, figures.rollbacks) == (3, 1, 0)
    assert figures.rows == 2  # the count, and the one name
    assert figures.statement_time > 0
    assert response.headers["server-timing"].startswith("db;dur=")
    assert 'desc="3 statements", db-pool;dur=' in response.headers["server-timing"]


async def test_figures_are_readable_during_the_scope(make_db: MakeDatabase) -> None:
    """db.figures() counts the scope's statements as they run and its rollback at the end."""
    db, ended = watched(make_db)
    async with db.scope():
        assert db.figures().statements == 0
        await db.session.execute(text("SELECT 1"))
        await db.session.execute(text("SELECT 1"))
        seen = db.figures()
        assert (seen.statements, seen.rows, seen.repeated) == (2, 2, {"SELECT 1": 2})
    assert ended[0][1] is seen
    assert (seen.commits, seen.rollbacks) == (0, 1)  # the manual policy's rollback at the end


async def test_a_lazy_load_loop_warns_once_naming_the_statement_its_count_and_the_route(
    make_db: MakeDatabase, shelves: None, caplog: pytest.LogCaptureFixture
) -> None:
    """Eight lazy loads of a relation in one request give exactly one warning, which names them."""
    db, _ = watched(make_db, repeat_limit=5)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        for shelf in (await db.session.scalars(select(Shelf).order_by(Shelf.id))).all():
            await shelf.awaitable_attrs.books  # one SELECT per shelf: the N+1
        await respond(send)

    with caplog.at_level(logging.WARNING, logger="alchemy_scope.insight"):
        async with client(ScopeMiddleware(app, databases=[db])) as http:
            await http.get("/shelves")
    [warning] = [record for record in caplog.records if record.name == "alchemy_scope.insight"]
    message = warning.getMessage()
    assert "GET /shelves" in message
    assert "ran 8 times" in message
    assert "FROM alchemy_scope_insight_books" in message
    assert "repeat_limit=5" in message


async def test_no_warning_at_the_repeat_limit(
    make_db: MakeDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    """A statement run exactly repeat_limit times is not reported."""
    db, _ = watched(make_db, repeat_limit=3)
    with caplog.at_level(logging.WARNING, logger="alchemy_scope.insight"):
        async with db.scope():
            for _ in range(3):
                await db.session.execute(text("SELECT 1"))
    assert not [record for record in caplog.records if record.name == "alchemy_scope.insight"]


async def test_a_request_waiting_for_the_only_connection_shows_its_pool_wait(
    make_db: MakeDatabase,
) -> None:
    """With a pool of one held by a slow request, the second request's figures show the wait."""
    db, ended = watched(make_db, engine_options={"pool_size": 1, "max_overflow": 0})
    holding = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await db.session.execute(text("SELECT 1"))
        if scope["path"] == "/slow":
            holding.set()
            await asyncio.sleep(0.3)  # holds the pool's only connection meanwhile
        await respond(send)

    async with client(ScopeMiddleware(app, databases=[db])) as http:
        slow = asyncio.ensure_future(http.get("/slow"))
        await holding.wait()
        await http.get("/fast")
        await slow
    waits = {repr(scope).split()[2]: figures.pool_wait for scope, figures in ended}
    assert waits["/fast"] >= 0.2
    assert waits["/slow"] < 0.2


async def test_a_streamed_exports_statements_are_counted(make_db: MakeDatabase) -> None:
    """Statements run while the body streams count in the scope's figures, not in its header."""
    db, ended = watched(make_db, server_timing=True)
    async with db.scope():
        db.session.add_all([Item(name=f"item {number}") for number in range(5)])
        await db.session.commit()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        total = await db.session.scalar(select(func.count()).select_from(Item))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        async for name in await db.session.stream_scalars(select(Item.name)):
            await send({"type": "http.response.body", "body": name.encode(), "more_body": True})
        await db.session.execute(text("SELECT 1"))
        await send({"type": "http.response.body", "body": f"{total}".encode()})

    async with client(ScopeMiddleware(app, databases=[db])) as http:
        response = await http.get("/export")
    assert response.text.endswith("5")
    assert 'desc="1 statement"' in response.headers["server-timing"]  # as of the start
    assert ended[-1][1].statements == 3


async def test_concurrent_requests_never_mix_their_figures(make_db: MakeDatabase) -> None:
    """Twelve interleaved requests each report exactly the statements they ran themselves."""
    db, ended = watched(make_db, server_timing=True)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        for _ in range(int(scope["path"].strip("/"))):
            await db.session.execute(text("SELECT 1"))
            await asyncio.sleep(0.001)
        await respond(send)

    async with client(ScopeMiddleware(app, databases=[db])) as http:
        responses = await asyncio.gather(*(http.get(f"/{count}") for count in range(1, 13)))
    for count, response in enumerate(responses, start=1):
        plural = "" if count == 1 else "s"
        assert f'desc="{count} statement{plural}"' in response.headers["server-timing"]
    assert sorted(figures.statements for _, figures in ended) == list(range(1, 13))
    for scope, figures in ended:
        assert repr(scope).split()[2] == f"/{figures.statements}"


async def test_server_timing_with_unknown_databases_shows_the_ones_used(
    make_db: MakeDatabase,
) -> None:
    """With databases=None, a response carries the header once a timed database was used."""
    db, _ = watched(make_db, server_timing=True)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/db":
            await db.session.execute(text("SELECT 1"))
        await respond(send)

    async with client(ScopeMiddleware(app)) as http:
        used, unused = await http.get("/db"), await http.get("/none")
    assert 'desc="1 statement"' in used.headers["server-timing"]
    assert "server-timing" not in unused.headers


async def test_server_timing_is_off_unless_asked_for(make_db: MakeDatabase) -> None:
    """Insight without server_timing adds no header, and neither does a database without it."""
    db, _ = watched(make_db)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await db.session.execute(text("SELECT 1"))
        await respond(send)

    for middleware in (ScopeMiddleware(app, databases=[db]), ScopeMiddleware(app)):
        async with client(middleware) as http:
            assert "server-timing" not in (await http.get("/")).headers


LISTENED = (
    "before_cursor_execute",
    "after_cursor_execute",
    "commit",
    "rollback",
    "release_savepoint",
    "rollback_savepoint",
)


async def test_off_means_no_listener_and_nothing_kept(make_db: MakeDatabase) -> None:
    """Without insight no listener is registered on the engine and a scope keeps no figures."""
    on, off = make_db(insight=True), make_db()
    watch = on._insight
    assert watch is not None
    for name, listener in watch.listeners():
        assert event.contains(on.engine.sync_engine, name, listener)
        assert not event.contains(off.engine.sync_engine, name, listener)
    for name in LISTENED:
        assert not getattr(off.engine.sync_engine.dispatch, name), name
    assert "raw_connection" not in vars(off.engine.sync_engine)
    async with off.scope() as scope:
        await off.session.execute(text("SELECT 1"))
    assert scope._figures is None
    with pytest.raises(InsightOffError, match=r"Database\(url, insight=True\)"):
        async with off.scope():
            off.figures()


async def test_misuse_is_refused_with_how_to_fix_it(make_db: MakeDatabase) -> None:
    """Bad options, figures outside a scope and a second watch on one engine say what to do."""
    with pytest.raises(ValueError, match="an int of 1 or more"):
        Insight(repeat_limit=0)

    async def late(scope: Scope, figures: ScopeFigures) -> None: ...

    with pytest.raises(TypeError, match="plain function"):
        Insight(on_scope_end=late)
    with pytest.raises(TypeError, match=r"insight=alchemy_scope.Insight\("):
        make_db(insight="yes")
    db = make_db(insight=True)
    with pytest.raises(NoScopeError):
        db.figures()
    with pytest.raises(AlchemyScopeError, match="one Database per engine"):
        Database(db.engine, insight=True)


async def test_a_failing_callback_is_logged_and_the_scope_still_ends(
    make_db: MakeDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    """An on_scope_end that raises is logged naming the scope; the scope's work is unaffected."""

    def broken(scope: Scope, figures: ScopeFigures) -> None:
        raise RuntimeError("metrics down")

    db = make_db(commit="autocommit", insight=Insight(on_scope_end=broken))
    with caplog.at_level(logging.ERROR, logger="alchemy_scope.insight"):
        async with db.scope():
            db.session.add(Item(name="kept"))
    assert "metrics down" in caplog.text
    async with db.scope():
        assert await db.session.scalar(select(Item.name)) == "kept"
        assert current_scope()._figures is not None


async def test_insight_costs_little_per_statement(make_db: MakeDatabase) -> None:
    """Insight's listeners cost well under 20 us per statement (real arguments, in a scope)."""
    db = make_db(insight=True)
    watch = db._insight
    assert watch is not None
    captured: list[tuple[Any, ...]] = []

    def capture(*args: Any) -> None:
        captured.append(args)

    event.listen(db.engine.sync_engine, "after_cursor_execute", capture)
    async with db.scope():
        await db.session.execute(text("SELECT 1"))
        event.remove(db.engine.sync_engine, "after_cursor_execute", capture)
        started = time.perf_counter()
        for _ in range(10_000):
            watch.before_statement(*captured[0])
            watch.after_statement(*captured[0])
        cost = (time.perf_counter() - started) / 10_000
        assert db.figures().statements == 10_001
    assert cost < 20e-6, f"{cost * 1e6:.1f} us per statement"


STRICT_CONFTEST = """
import pytest
from alchemy_scope import Database
from sqlalchemy.pool import NullPool

db = Database({url!r}, insight=True, engine_options={{"poolclass": NullPool}})


@pytest.fixture
def alchemy_database():
    return db
"""

STRICT_TESTS = """
from sqlalchemy import text
from conftest import db


async def test_repeats(alchemy_db):
    async with db.scope():
        for _ in range(7):
            await db.session.execute(text("SELECT 42"))

async def test_fine(alchemy_db):
    async with db.scope():
        await db.session.execute(text("SELECT 42"))
"""


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "lenient"])
def test_strict_mode_fails_a_test_with_an_n_plus_one_naming_the_statement(
    pytester: pytest.Pytester, leg_url: str, strict: bool
) -> None:
    """In strict N+1 mode the test that repeats a statement fails with it; otherwise it passes."""
    args = ["-o", f"alchemy_scope_strict_n_plus_one={str(strict).lower()}"]
    pytester.makeconftest(STRICT_CONFTEST.format(url=leg_url))
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makepyfile(test_strict=STRICT_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider", *args)
    if strict:
        result.assert_outcomes(passed=1, failed=1)
        result.stdout.fnmatch_lines(
            ["*alchemy_scope_strict_n_plus_one*ran 7 times*", "*SELECT 42*"]
        )
    else:
        result.assert_outcomes(passed=2)
