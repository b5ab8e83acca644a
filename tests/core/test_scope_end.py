"""How a scope ends when something is left open or fails: streams, ROLLBACK, the app's blocks.

Each test reproduces a defect found by scenarios from other projects' suites: an abandoned
streamed result that kept SQLite locked, a ROLLBACK that raised and leaked its connection, a
cleanup error that replaced the handler's exception, the autocommit policy committing a
transaction the app held open, and ``add()`` racing another task's operation.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import warnings
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import event, insert, select, text
from sqlalchemy.exc import ResourceClosedError

from alchemy_scope import ConcurrentSessionUseError, Database, ScopeClosedError, ScopeMiddleware

from ..conftest import MakeDatabase
from ..faults import Case, FaultInjector
from ..models import Item
from ..support import (
    assert_no_leaks,
    assert_writable,
    backend,
    checked_out_connections,
    count_items,
    item_names,
    registry,
)
from .test_middleware import asgi_app, client

ROWS = 3000


async def fill(db: Database, rows: int = ROWS) -> None:
    """Commit ``rows`` items, enough that a streamed read stays open after its first row."""
    async with db.engine.begin() as conn:
        await conn.execute(insert(Item), [{"name": f"row {n:04}"} for n in range(rows)])


def quick_lock_db(make_db: MakeDatabase, **options: Any) -> Database:
    """A Database whose SQLite connections give up on a lock after 0.3 s instead of 5 s."""
    probe = make_db()
    if backend(probe) == "sqlite":
        return make_db(engine_options={"connect_args": {"timeout": 0.3}}, **options)
    return make_db(**options)


async def test_an_abandoned_stream_is_closed_before_its_connection_returns(
    make_db: MakeDatabase,
) -> None:
    """A streamed result left half-read is closed when its scope ends: nothing stays locked."""
    db = quick_lock_db(make_db)
    await fill(db)
    kept: list[object] = []
    async with db.scope():
        result = await db.session.stream_scalars(
            select(Item).order_by(Item.id).execution_options(yield_per=100)
        )
        kept.append(result)  # referenced: the garbage collector cannot close it for us
        assert (await anext(aiter(result))).name == "row 0000"
    await assert_no_leaks(db)
    await assert_writable(db)


async def test_a_body_generator_never_closed_leaves_nothing_open(make_db: MakeDatabase) -> None:
    """A streamed body whose generator the framework never closes still ends its stream."""
    db = quick_lock_db(make_db)
    await fill(db)

    async def body() -> AsyncIterator[str]:
        async for row in await db.session.stream(
            select(Item.name).order_by(Item.id).execution_options(yield_per=100)
        ):
            yield row.name

    generators: list[AsyncIterator[str]] = []
    async with db.scope():
        generator = body()
        generators.append(generator)
        assert await anext(generator) == "row 0000"
    await assert_no_leaks(db)
    await assert_writable(db)
    with pytest.raises(ResourceClosedError):  # resumed late, it finds its result closed
        await anext(generators[0])


async def test_every_stream_of_a_scope_is_closed(make_db: MakeDatabase) -> None:
    """Several streams, on several databases, all half-read: every one is closed at the end."""
    first, second = quick_lock_db(make_db), quick_lock_db(make_db)
    await fill(first)
    kept: list[object] = []
    # MySQL reads one unbuffered result at a time per connection; the others read two.
    per_session = 1 if backend(first) == "mysql" else 2
    async with first.scope():
        for database in (first, second):
            for _ in range(per_session):
                query = text(f"SELECT id FROM {Item.__tablename__}")
                result = await database.session.stream(query)
                kept.append(result)
                await anext(aiter(result))
    await assert_no_leaks(first, second)
    await assert_writable(first)


async def _rollback_raising_once(db: Database) -> list[str]:
    calls: list[str] = []

    def fail_once(_conn: object) -> None:
        if not calls:
            calls.append("raised")
            raise RuntimeError("ROLLBACK failed (injected)")

    event.listen(db.engine.sync_engine, "rollback", fail_once)
    return calls


async def test_a_rollback_that_raises_still_returns_the_connection(db: Database) -> None:
    """When the ROLLBACK that ends a scope raises, its connection is discarded, not leaked."""
    calls = await _rollback_raising_once(db)
    with pytest.raises(RuntimeError, match="ROLLBACK failed"):
        async with db.scope():
            await db.session.execute(select(Item))
    assert calls == ["raised"]
    assert registry(db) == {}
    assert checked_out_connections(db) == 0
    await assert_no_leaks(db)
    await assert_writable(db)


async def test_a_rollback_that_raises_after_a_write_leaves_no_lock(db: Database) -> None:
    """A failed ROLLBACK after an INSERT: the connection is discarded and the row never lands."""
    await _rollback_raising_once(db)
    with pytest.raises(RuntimeError, match="ROLLBACK failed"):
        async with db.scope():
            db.session.add(Item(name="rolled back"))
            await db.session.flush()
    await assert_no_leaks(db)
    await assert_writable(db)
    assert "rolled back" not in await item_names(db)


async def test_the_bodys_exception_survives_a_failing_scope_end(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """When the body raised and ending the scope fails too, the body's exception propagates."""
    await _rollback_raising_once(db)
    with caplog.at_level(logging.ERROR, "alchemy_scope"), pytest.raises(LookupError) as raised:
        async with db.scope() as current:
            await db.session.execute(select(Item))
            raise LookupError("the handler's own error")
    assert str(raised.value) == "the handler's own error"
    logged = [record for record in caplog.records if record.exc_info]
    assert len(logged) == 1
    assert repr(current) in logged[0].getMessage()
    # A record logged with exc_info=True has it; the annotation allows None.
    assert "ROLLBACK failed" in str(logged[0].exc_info[1])  # type: ignore[index]
    await assert_no_leaks(db)


async def test_the_apps_exception_survives_a_failing_scope_end_in_the_middleware(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """Through the middleware the route's exception reaches the server; the cleanup's is logged."""
    await _rollback_raising_once(db)

    async def handler(_scope: dict[str, Any]) -> tuple[int, bytes]:
        await db.session.execute(select(Item))
        raise LookupError("the route's own error")

    app = ScopeMiddleware(asgi_app(handler))
    transport_app_errors: list[BaseException] = []

    async def server(scope: Any, receive: Any, send: Any) -> None:
        try:
            await app(scope, receive, send)
        except BaseException as exc:
            transport_app_errors.append(exc)
            raise

    with caplog.at_level(logging.ERROR, "alchemy_scope"):
        async with client(server) as http:
            with pytest.raises(LookupError):
                await http.get("/")
    assert [type(exc) for exc in transport_app_errors] == [LookupError]
    assert any("ROLLBACK failed" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)
    await assert_no_leaks(db)


async def test_a_cleanup_error_with_no_other_error_still_raises(db: Database) -> None:
    """A scope whose body succeeded but whose ROLLBACK fails raises that error: never silent."""
    await _rollback_raising_once(db)
    with pytest.raises(RuntimeError, match="ROLLBACK failed"):
        async with db.scope():
            await db.session.execute(select(Item))


async def test_autocommit_leaves_an_open_begin_block_to_the_app(autocommit_db: Database) -> None:
    """A response that starts inside the app's begin() block does not commit it from under it."""
    db = autocommit_db
    order: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        async with db.session.begin():
            db.session.add(Item(name="in the block"))
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            order.append(f"sent, committed: {await count_items(db)}")
            db.session.add(Item(name="after the response"))
        order.append(f"block ended, committed: {await count_items(db)}")
        db.session.add(Item(name="after the block"))

    async with client(ScopeMiddleware(app)) as http:
        response = await http.get("/")
    assert response.status_code == 200
    assert order == ["sent, committed: 0", "block ended, committed: 2"]
    assert sorted(await item_names(db)) == ["after the block", "after the response", "in the block"]


async def test_autocommit_leaves_an_open_nested_block_to_the_app(autocommit_db: Database) -> None:
    """A begin_nested() block open at response start is the app's; the policy commits at the end."""
    db = autocommit_db

    async def app(scope: Any, receive: Any, send: Any) -> None:
        db.session.add(Item(name="before the savepoint"))
        async with db.session.begin_nested():
            db.session.add(Item(name="in the savepoint"))
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
        db.session.add(Item(name="after the savepoint"))

    async with client(ScopeMiddleware(app)) as http:
        assert (await http.get("/")).status_code == 200
    assert sorted(await item_names(db)) == [
        "after the savepoint",
        "before the savepoint",
        "in the savepoint",
    ]


@pytest.mark.parametrize("commit", ["manual", "autocommit"])
async def test_a_begin_block_left_open_at_scope_end_is_rolled_back_and_logged(
    make_db: MakeDatabase, commit: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A transaction the app began and never ended is rolled back at scope end, with a warning."""
    db = make_db(commit=commit)
    with caplog.at_level(logging.WARNING, "alchemy_scope"):
        async with db.scope() as current:
            await db.session.begin()
            db.session.add(Item(name="never ended"))
            await db.session.flush()
    assert await count_items(db) == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "begin()" in warnings[0].getMessage()
    assert repr(current) in warnings[0].getMessage()


async def _flush_in_flight(db: Database) -> tuple[asyncio.Event, asyncio.Event]:
    """Make the next INSERT of ``db`` pause in its statement until ``release`` is set."""
    started, release = asyncio.Event(), asyncio.Event()

    def pause(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT"):
            from sqlalchemy.util import await_only

            started.set()
            await_only(release.wait())

    event.listen(db.engine.sync_engine, "before_cursor_execute", pause)
    return started, release


@pytest.mark.parametrize("serialize", [False, True])
@pytest.mark.parametrize("method", ["add", "add_all", "expunge_all", "expire_all"])
async def test_a_sync_method_during_another_tasks_operation_raises(
    db: Database, serialize: bool, method: str
) -> None:
    """add() and friends while another task's flush runs raise, even with serialize=True."""
    started, release = await _flush_in_flight(db)
    async with db.scope(serialize=serialize):
        db.session.add(Item(name="flushed"))
        flushing = asyncio.create_task(db.session.flush())
        await started.wait()
        call = {
            "add": lambda: db.session.add(Item(name="racing")),
            "add_all": lambda: db.session.add_all([Item(name="racing")]),
            "expunge_all": db.session.expunge_all,
            "expire_all": db.session.expire_all,
        }[method]
        with pytest.raises(ConcurrentSessionUseError, match=rf"{method}\(\).*flush\(\)"):
            call()
        release.set()
        await flushing
        call()  # once the flush has returned, the same call is fine
        await db.session.rollback()


async def test_sync_methods_after_the_scope_ended_raise(db: Database) -> None:
    """add() on a session kept past its scope raises instead of queueing a write nobody makes."""
    async with db.scope():
        session = db.session
    with pytest.raises(ScopeClosedError):
        session.add(Item(name="too late"))


async def _read_stream_cancelled_at_a_fetch(db: Database, fetch: int) -> None:
    """In a scope: a child task reads a stream and is cancelled at its ``fetch``-th fetch.

    As a framework does when the client of a streamed body goes away: the body's task is
    cancelled while it awaits the driver, and the cancellation stays in that task.
    """
    injector = FaultInjector(db.engine)
    try:
        async with db.scope():
            result = await db.session.stream(
                select(Item.name).order_by(Item.id).execution_options(yield_per=100)
            )

            async def read() -> None:
                async for _ in result:
                    pass

            injector.arm(Case(fetch, "fetch", "cancel"))
            reading = asyncio.create_task(read())
            with pytest.raises(asyncio.CancelledError):
                await reading
            assert injector.fired is not None, injector.operations
            injector.arm(None)
    except Exception:  # the scope's end may fail on the connection SQLAlchemy gave up
        pass
    finally:
        injector.remove()


@pytest.mark.parametrize("fetch", [0, 1])
async def test_a_stream_cancelled_in_a_fetch_leaves_nothing_locked(
    make_db: MakeDatabase, fetch: int
) -> None:
    """A streamed read cancelled while it awaits a fetch leaves no lock without gc's help."""
    db = quick_lock_db(make_db)
    await fill(db)
    gc.collect()
    gc.disable()  # the scope's end must free the cursor, not the garbage collector
    try:
        await _read_stream_cancelled_at_a_fetch(db, fetch)
        await assert_no_leaks(db)
        await assert_writable(db)
    finally:
        gc.enable()
        gc.collect()


async def test_a_connection_cancelled_while_it_opens_is_closed(make_db: MakeDatabase) -> None:
    """A checkout cancelled while the driver opens its connection closes it (3.13 warns if not)."""
    db = make_db()
    await db.dispose()  # an empty pool: the next statement opens a connection
    async with db.scope():
        opening = asyncio.create_task(db.session.execute(select(Item)))
        await asyncio.sleep(0)  # the task now awaits the driver's connect
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening
    await asyncio.sleep(0.2)  # the driver finishes opening in its thread meanwhile
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    assert [str(w.message) for w in caught] == []
    await assert_no_leaks(db)
    await assert_writable(db)
