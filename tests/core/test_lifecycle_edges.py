"""Edges of the lifecycle that mutation testing found untested (tests/MUTANTS.md).

Each test kills one group of surviving mutants: the scope's repr, the end of a streamed body,
the flags a response's outcome sets, ``Database``'s options and the policy's boundaries.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import bindparam, event, insert, select, text
from sqlalchemy.exc import IntegrityError, ResourceClosedError
from sqlalchemy.ext.asyncio import AsyncSession

import alchemy_scope
from alchemy_scope import (
    ConcurrentSessionUseError,
    Database,
    ScopedSession,
    ScopeMiddleware,
    current_scope,
    dispose_all,
    fail_current_scope,
)

from ..conftest import MakeDatabase
from ..faults import Case, FaultInjector
from ..models import Base, Item
from ..support import add_write_that_fails_at_commit, backend, count_items, item_names, registry

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[MutableMapping[str, Any], Any, Send], Awaitable[None]]


async def receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def serve(
    app: App, request: MutableMapping[str, Any] | None = None, *, on_send: Send | None = None
) -> list[Message]:
    """Run ``app`` once through raw ASGI; return the messages the client got."""
    sent: list[Message] = []

    async def send(message: Message) -> None:
        if on_send is not None:
            await on_send(message)
        sent.append(message)

    scope = request or {"type": "http", "method": "GET", "path": "/items", "headers": []}
    await app(scope, receive, send)
    return sent


START: Message = {"type": "http.response.start", "status": 200, "headers": []}


# -- Scope.__repr__ ----------------------------------------------------------------------------


async def test_the_repr_of_a_scope_opened_by_hand(db: Database) -> None:
    """A scope opened by hand shows its id, open or closed, and its session count."""
    async with db.scope() as scope:
        assert repr(scope) == f"<Scope {id(scope):#x} open, 0 session(s)>"
        await db.session.execute(text("SELECT 1"))
        assert repr(scope) == f"<Scope {id(scope):#x} open, 1 session(s)>"
    assert repr(scope) == f"<Scope {id(scope):#x} closed, 0 session(s)>"


@pytest.mark.parametrize(
    ("request_scope", "shown"),
    [
        ({"type": "http", "method": "GET", "path": "/items"}, "GET /items"),
        ({"type": "http"}, "? ?"),
        ({"type": "websocket", "path": "/ws"}, "websocket /ws"),
        ({"type": "websocket"}, "websocket ?"),
    ],
)
async def test_the_repr_of_a_request_scope(request_scope: dict[str, Any], shown: str) -> None:
    """A request's scope shows its method and path, a websocket's its type and path."""
    seen: list[str] = []

    async def app(_scope: object, _receive: object, _send: object) -> None:
        seen.append(repr(current_scope()))

    await serve(ScopeMiddleware(app), request_scope)
    assert seen == [f"<Scope {shown} open, 0 session(s)>"]


# -- The end of the body -------------------------------------------------------------------


async def test_writes_made_while_the_body_streams_are_committed_before_its_last_chunk(
    autocommit_db: Database,
) -> None:
    """Under autocommit a more_body=True chunk commits nothing; the last chunk commits first."""
    db = autocommit_db
    committed_at: list[tuple[bool, int]] = []

    async def app(_scope: object, _receive: object, send: Send) -> None:
        await send(START)
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        db.session.add(Item(name="written while streaming"))
        await db.session.flush()
        await send({"type": "http.response.body", "body": b"b", "more_body": True})
        await send({"type": "http.response.body", "body": b"c"})  # more_body left out: last

    async def on_send(message: Message) -> None:
        if message["type"] == "http.response.body":
            committed_at.append((message.get("more_body", False), await count_items(db)))

    await serve(ScopeMiddleware(app, databases=[db]), on_send=on_send)
    assert committed_at == [(True, 0), (True, 0), (False, 1)]


async def test_a_pathsend_commits_before_it_is_forwarded(autocommit_db: Database) -> None:
    """Under autocommit, http.response.pathsend ends the body: what it wrote is committed first."""
    db = autocommit_db
    committed_at: list[int] = []

    async def app(_scope: object, _receive: object, send: Send) -> None:
        await send(START)
        db.session.add(Item(name="written before pathsend"))
        await db.session.flush()
        await send({"type": "http.response.pathsend", "path": "/dev/null"})

    async def on_send(message: Message) -> None:
        if message["type"] == "http.response.pathsend":
            committed_at.append(await count_items(db))

    await serve(ScopeMiddleware(app, databases=[db]), on_send=on_send)
    assert committed_at == [1]


# -- The flags the outcome sets ------------------------------------------------------------


async def test_an_http_app_that_returns_without_a_response_commits_nothing(
    autocommit_db: Database,
) -> None:
    """Under autocommit, an HTTP app that returns without a response start is rolled back."""
    db = autocommit_db

    async def app(_scope: object, _receive: object, _send: object) -> None:
        db.session.add(Item(name="no response"))
        await db.session.flush()

    assert await serve(ScopeMiddleware(app, databases=[db])) == []
    assert await count_items(db) == 0


async def test_a_websocket_that_returns_commits_its_work(autocommit_db: Database) -> None:
    """Under autocommit, a websocket connection has no response status: its work commits."""
    db = autocommit_db

    async def app(_scope: object, _receive: object, _send: object) -> None:
        db.session.add(Item(name="websocket work"))
        await db.session.flush()

    await serve(ScopeMiddleware(app, databases=[db]), {"type": "websocket", "path": "/ws"})
    assert await item_names(db) == ["websocket work"]


async def test_a_failed_commit_at_the_last_chunk_fails_the_scope_for_every_database(
    autocommit_db: Database, tmp_path: Path
) -> None:
    """A COMMIT failing at the last body chunk marks the scope failed: no other database commits."""
    failing = autocommit_db
    invalidated = count_invalidations(failing)
    other = Database(f"sqlite+aiosqlite:///{tmp_path / 'other.db'}", commit="autocommit")
    async with other.engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    failures: list[BaseException] = []

    async def app(_scope: object, _receive: object, send: Send) -> None:
        await send(START)
        add_write_that_fails_at_commit(failing.session)
        await failing.session.flush()
        other.session.add(Item(name="never committed either"))
        await other.session.flush()
        try:
            await send({"type": "http.response.body", "body": b"done"})
        except IntegrityError as exc:  # a framework that swallows it: the scope still failed
            failures.append(exc)
            assert current_scope().failed

    try:
        await serve(ScopeMiddleware(app, databases=[failing, other]))
        assert len(failures) == 1
        assert len(invalidated) == 1  # the failed COMMIT's connection is never reused
        assert await count_items(other) == 0
    finally:
        await other.dispose()


async def test_a_scope_captured_during_a_request_is_closed_after_it(db: Database) -> None:
    """After the request, its scope says closed, and its session refuses use."""
    captured: list[Any] = []

    async def app(_scope: object, _receive: object, send: Send) -> None:
        await db.session.execute(text("SELECT 1"))
        captured.append((current_scope(), db.session))
        await send(START)
        await send({"type": "http.response.body", "body": b""})

    await serve(ScopeMiddleware(app))
    scope, session = captured[0]
    assert scope.closed
    with pytest.raises(Exception, match="scope") as raised:
        await session.execute(text("SELECT 1"))
    assert type(raised.value).__name__ == "ScopeClosedError"


# -- The policy's boundaries ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "commit_on_redirect", "committed"),
    [
        (299, False, 1),
        (300, False, 0),
        (303, None, 1),
        (303, False, 0),
        (399, True, 1),
        (400, True, 0),
    ],
)
async def test_which_statuses_commit(
    make_db: MakeDatabase, status: int, commit_on_redirect: bool | None, committed: int
) -> None:
    """Below 300 commits; 3xx only with commit_on_redirect, which is on by default; 400 never."""
    options: dict[str, Any] = {"commit": "autocommit"}
    if commit_on_redirect is not None:
        options["commit_on_redirect"] = commit_on_redirect
    db = make_db(**options)

    async def app(_scope: object, _receive: object, send: Send) -> None:
        db.session.add(Item(name=f"status {status}"))
        await db.session.flush()
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    await serve(ScopeMiddleware(app, databases=[db]))
    assert await count_items(db) == committed


async def test_a_failed_statement_the_app_caught_is_not_committed(autocommit_db: Database) -> None:
    """Under autocommit, a transaction a failed statement left inactive is rolled back, no 500."""
    db = autocommit_db

    async def app(_scope: object, _receive: object, send: Send) -> None:
        db.session.add_all([Item(name="twice"), Item(name="twice")])
        with pytest.raises(IntegrityError):
            await db.session.flush()
        await send(START)
        await send({"type": "http.response.body", "body": b"ok"})

    sent = await serve(ScopeMiddleware(app, databases=[db]))
    assert sent[0]["status"] == 200
    assert await count_items(db) == 0


async def test_a_savepoint_left_open_is_rolled_back_not_committed(
    autocommit_db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """Under autocommit, a begin_nested() the app never ended is rolled back with a warning."""
    db = autocommit_db
    with caplog.at_level(logging.WARNING, logger="alchemy_scope"):
        async with db.scope() as scope:
            db.session.add(Item(name="outer"))
            await db.session.flush()
            await db.session.begin_nested()
            db.session.add(Item(name="inner"))
            await db.session.flush()
    assert await count_items(db) == 0
    [record] = [r for r in caplog.records if r.name == "alchemy_scope"]
    assert record.getMessage() == (
        f"{scope!r} ended inside a transaction the app began (begin() or begin_nested()) "
        "and never ended: rolled back"
    )


# -- Database's options --------------------------------------------------------------------


async def test_a_database_made_from_an_engine_uses_that_engine(db: Database) -> None:
    """Database(engine) keeps the engine it was given and its sessions use it."""
    other = Database(db.engine, commit="autocommit")
    assert other.engine is db.engine
    assert other.commit_policy == "autocommit"
    assert repr(other).endswith("commit='autocommit')")
    assert other.scoped_session.session_factory is other.sessionmaker


def test_a_session_class_that_is_not_a_scoped_session_is_refused(db: Database) -> None:
    """session_options={'class_': AsyncSession} raises TypeError: the guard would be lost."""
    with pytest.raises(TypeError, match=r"subclass of alchemy_scope\.ScopedSession"):
        Database(db.engine, session_options={"class_": AsyncSession})


async def test_a_scoped_session_subclass_is_used(db: Database) -> None:
    """session_options={'class_': a ScopedSession subclass} gives sessions of that class."""

    class MySession(ScopedSession):
        pass

    other = Database(db.engine, session_options={"class_": MySession})
    async with other.scope():
        assert type(other.session) is MySession
        await other.session.execute(text("SELECT 1"))


async def test_objects_stay_readable_after_a_commit(db: Database) -> None:
    """Sessions default to expire_on_commit=False: attributes read after commit need no I/O."""
    async with db.scope():
        item = Item(name="kept")
        db.session.add(item)
        await db.session.commit()
        assert item.name == "kept"


def test_unknown_commit_policies_are_refused() -> None:
    """An unknown commit policy raises ValueError naming the two valid ones."""
    with pytest.raises(ValueError, match=r"commit='manual'.*commit='autocommit'"):
        Database("sqlite+aiosqlite://", commit="sometimes")  # type: ignore[arg-type]


def test_engine_options_with_an_engine_are_refused(db: Database) -> None:
    """engine_options with an AsyncEngine raises TypeError: they only apply to a URL."""
    with pytest.raises(TypeError, match="only apply when Database creates the engine"):
        Database(db.engine, engine_options={"echo": True})


# -- serialize -----------------------------------------------------------------------------


async def two_reads_at_once(db: Database) -> None:
    await asyncio.gather(db.session.execute(text("SELECT 1")), db.session.execute(text("SELECT 2")))


async def test_by_default_two_tasks_of_one_scope_may_not_share_its_session(db: Database) -> None:
    """Without serialize, scope(), db.scope() and ScopeMiddleware refuse concurrent operations."""
    refusal = (
        r"AsyncSession\.execute\(\) was called while AsyncSession\.execute\(\) was still running"
    )
    for opened in (alchemy_scope.scope(), db.scope()):
        async with opened:
            with pytest.raises(ConcurrentSessionUseError, match=refusal):
                await two_reads_at_once(db)
    errors: list[BaseException] = []

    async def app(_scope: object, _receive: object, _send: object) -> None:
        try:
            await two_reads_at_once(db)
        except ConcurrentSessionUseError as exc:
            errors.append(exc)

    await serve(ScopeMiddleware(app, databases=[db]))
    assert len(errors) == 1


async def test_a_serialized_middleware_lets_tasks_take_turns(db: Database) -> None:
    """ScopeMiddleware(serialize=True): two tasks of one request share its session in turn."""
    done: list[bool] = []

    async def app(_scope: object, _receive: object, _send: object) -> None:
        await two_reads_at_once(db)
        done.append(True)

    await serve(ScopeMiddleware(app, databases=[db], serialize=True))
    assert done == [True]


@pytest.mark.parametrize("serialize", [False, True])
async def test_the_policy_commit_waits_for_another_tasks_read(
    autocommit_db: Database, serialize: bool
) -> None:
    """The commit before the response waits for a concurrent read; neither side raises."""
    db = autocommit_db
    committed_at: list[int] = []

    async def app(_scope: object, _receive: object, send: Send) -> None:
        db.session.add(Item(name="committed in turn"))
        await db.session.flush()
        read = asyncio.ensure_future(db.session.scalar(select(Item.name)))
        await asyncio.sleep(0)  # the read is in flight on the session
        await send(START)
        assert await read == "committed in turn"
        await send({"type": "http.response.body", "body": b""})

    async def on_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            committed_at.append(await count_items(db))

    await serve(ScopeMiddleware(app, databases=[db], serialize=serialize), on_send=on_send)
    assert committed_at == [1]


@pytest.mark.parametrize("serialize", [False, True])
async def test_a_read_waits_for_the_policy_commit(autocommit_db: Database, serialize: bool) -> None:
    """A read started while the policy's commit holds the session runs after the COMMIT."""
    db = autocommit_db
    order: list[str] = []
    engine = db.engine.sync_engine
    event.listen(engine, "commit", lambda _conn: order.append("COMMIT"))
    event.listen(engine, "before_cursor_execute", lambda *args: order.append(args[2].split()[0]))

    async def app(_scope: object, _receive: object, send: Send) -> None:
        db.session.add(Item(name="commit first"))
        await db.session.flush()
        sending = asyncio.ensure_future(send(START))
        await asyncio.sleep(0)  # the commit now holds the session
        assert await db.session.scalar(select(Item.name)) == "commit first"
        await sending
        await send({"type": "http.response.body", "body": b""})

    await serve(ScopeMiddleware(app, databases=[db], serialize=serialize))
    assert order[order.index("INSERT") :][:3] == ["INSERT", "COMMIT", "SELECT"]
    assert await count_items(db) == 1


@pytest.mark.parametrize("serialize", [False, True])
async def test_a_synchronous_change_during_the_policy_commit_is_refused(
    autocommit_db: Database, serialize: bool
) -> None:
    """add() from another task while the policy commits raises, naming commit() as running."""
    db = autocommit_db
    refused: list[str] = []

    async def app(_scope: object, _receive: object, send: Send) -> None:
        db.session.add(Item(name="committed"))
        await db.session.flush()
        sending = asyncio.ensure_future(send(START))
        await asyncio.sleep(0)  # the commit now holds the session
        try:
            db.session.add(Item(name="refused"))
        except ConcurrentSessionUseError as exc:
            refused.append(str(exc))
        await sending
        await send({"type": "http.response.body", "body": b""})

    await serve(ScopeMiddleware(app, databases=[db], serialize=serialize))
    [message] = refused
    assert message.startswith(
        "AsyncSession.add() was called while AsyncSession.commit() was still running"
    )
    assert await item_names(db) == ["committed"]


async def test_a_stream_scalars_result_left_open_is_closed_at_scope_end(db: Database) -> None:
    """A stream_scalars() result still unread when its scope ends is closed with it."""
    async with db.engine.begin() as conn:
        await conn.execute(insert(Item), [{"name": f"row {n}"} for n in range(3)])
    async with db.scope():
        result = await db.session.stream_scalars(select(Item.name))
    with pytest.raises(ResourceClosedError):
        await result.all()


# -- The guarded methods -------------------------------------------------------------------


async def test_guarded_methods_pass_keyword_arguments_on(db: Database) -> None:
    """execute(), scalar() and stream_scalars() of db.session get their keyword arguments."""
    async with db.engine.begin() as conn:
        await conn.execute(insert(Item).values(name="by keyword"))
    query = select(Item.name).where(Item.name == bindparam("name"))
    params = {"name": "by keyword"}
    async with db.scope():
        assert (await db.session.execute(query, params=params)).scalar() == "by keyword"
        assert await db.session.scalar(query, params=params) == "by keyword"
        streamed = await db.session.stream_scalars(query, params=params)
        assert await streamed.all() == ["by keyword"]


async def test_a_synchronous_method_names_itself_in_the_error(db: Database) -> None:
    """add() during another task's operation raises the synchronous ConcurrentSessionUseError."""
    async with db.scope():
        reading = asyncio.ensure_future(db.session.execute(text("SELECT 1")))
        await asyncio.sleep(0)
        with pytest.raises(
            ConcurrentSessionUseError,
            match=r"AsyncSession\.add\(\) was called while AsyncSession\.execute\(\).*synchronous",
        ):
            db.session.add(Item(name="refused"))
        await reading


def test_guarded_methods_keep_sqlalchemys_docstrings() -> None:
    """ScopedSession's guarded methods carry AsyncSession's names and docstrings."""
    for name in ("execute", "stream_scalars", "commit", "add", "expunge_all"):
        method = getattr(ScopedSession, name)
        assert method.__name__ == name
        assert method.__doc__ == getattr(AsyncSession, name).__doc__


# -- Cancellation --------------------------------------------------------------------------


def count_invalidations(db: Database) -> list[object]:
    """A list that grows by one each time a connection of ``db``'s pool is invalidated."""
    invalidated: list[object] = []
    event.listen(db.engine.sync_engine.pool, "invalidate", lambda *args: invalidated.append(args))
    return invalidated


async def test_a_scope_cancelled_between_operations_discards_its_connection(db: Database) -> None:
    """A scope cancelled while its transaction is open discards the connection, no ROLLBACK."""
    invalidated = count_invalidations(db)
    injector = FaultInjector(db.engine)  # records the DBAPI operations, faults none
    started = asyncio.Event()

    async def work() -> None:
        async with db.scope() as scope:
            db.session.add(Item(name="cancelled"))
            await db.session.flush()
            started.set()
            await asyncio.sleep(10)
        raise AssertionError(scope)  # pragma: no cover - cancelled above

    try:
        task = asyncio.ensure_future(work())
        await started.wait()
        injector.arm(None)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        injector.remove()
    assert len(invalidated) == 1
    assert not [op for op in injector.operations if "rollback" in op], injector.operations
    assert await count_items(db) == 0


async def test_an_operation_cancelled_half_way_gets_its_connection_discarded(
    db: Database,
) -> None:
    """An operation whose task was cancelled mid-statement leaves its connection discarded."""
    invalidated = count_invalidations(db)
    injector = FaultInjector(db.engine)
    try:
        async with db.scope():
            await db.session.execute(text("SELECT 1"))
            injector.arm(Case(0, "execute SELECT", "cancel"))
            reading = asyncio.ensure_future(db.session.execute(text("SELECT 2")))
            with pytest.raises(asyncio.CancelledError):
                await reading
            assert injector.fired is not None, injector.operations
            injector.arm(None)
    finally:
        injector.remove()
    assert len(invalidated) == 1


async def test_an_ending_cut_short_by_a_cancellation_discards_the_connection(
    autocommit_db: Database,
) -> None:
    """A scope whose COMMIT at its end is cancelled has its connection discarded, not reused."""
    db = autocommit_db
    invalidated = count_invalidations(db)
    injector = FaultInjector(db.engine)

    async def work() -> None:
        async with db.scope():
            db.session.add(Item(name="cut short"))
            await db.session.flush()
            injector.arm(Case(0, "commit", "cancel"))

    try:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.ensure_future(work())
        assert injector.fired is not None, injector.operations
    finally:
        injector.remove()
    assert len(invalidated) == 1
    assert registry(db) == {}


# -- Small predicates and the shared connection ---------------------------------------------


def refuse_commit(session: AsyncSession) -> None:
    """Make the session's next COMMIT fail, the way a constraint checked at COMMIT would."""

    def refuse(_session: object) -> None:
        raise IntegrityError("COMMIT", {}, Exception("constraint violated at COMMIT"))

    event.listen(session.sync_session, "before_commit", refuse, once=True)


async def test_a_failed_commit_never_invalidates_a_shared_connection(db: Database) -> None:
    """Inside bound_to(), a COMMIT that fails leaves the shared connection valid."""
    async with db.engine.connect() as connection:
        transaction = await connection.begin()
        with db.bound_to(connection):
            async with db.scope():
                db.session.add(Item(name="refused"))
                refuse_commit(db.session)
                with pytest.raises(IntegrityError):
                    await db.session.commit()
        assert not connection.invalidated
        await transaction.rollback()


async def test_a_session_removed_from_the_registry_by_hand_still_ends(db: Database) -> None:
    """A scope whose session the app removed (scoped_session.remove()) ends without error."""
    async with db.scope():
        await db.session.execute(text("SELECT 1"))
        await db.scoped_session.remove()
    assert registry(db) == {}


async def test_a_scope_ends_after_another_tasks_operation_returns(db: Database) -> None:
    """A scope ending while another task's operation runs waits for it before closing."""
    async with db.scope():
        pending = asyncio.ensure_future(db.session.scalar(text("SELECT 7")))
        await asyncio.sleep(0)  # the read is in flight
    assert pending.done()
    assert pending.result() == 7


@pytest.mark.parametrize("streams", ["read to the end", "left open", "first left open"])
async def test_a_stream_still_being_read_defers_the_commit(
    autocommit_db: Database, streams: str
) -> None:
    """Under autocommit a stream read to its end lets the start commit; an open one defers it."""
    db = autocommit_db
    if streams == "first left open" and backend(db) == "mysql":
        pytest.skip("MariaDB's drivers read one unbuffered stream at a time per connection")
    committed_at: list[int] = []

    async def app(_scope: object, _receive: object, send: Send) -> None:
        db.session.add(Item(name="streamed"))
        await db.session.flush()
        streamed = await db.session.stream_scalars(select(Item.name))
        if streams == "first left open":
            streamed = await db.session.stream_scalars(select(Item.name))
        if streams != "left open":
            assert await streamed.all() == ["streamed"]
        await send(START)
        await send({"type": "http.response.body", "body": b""})

    async def on_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            committed_at.append(await count_items(db))

    await serve(ScopeMiddleware(app, databases=[db]), on_send=on_send)
    assert committed_at == [1 if streams == "read to the end" else 0]
    assert await count_items(db) == 1


async def test_a_commit_that_waited_for_a_stream_to_open_is_deferred(
    autocommit_db: Database,
) -> None:
    """The policy's commit, having waited for another task's stream() call, leaves it open."""
    db = autocommit_db
    committed_at: list[int] = []

    async def app(_scope: object, _receive: object, send: Send) -> None:
        db.session.add(Item(name="streamed meanwhile"))
        await db.session.flush()
        opening = asyncio.ensure_future(db.session.stream_scalars(select(Item.name)))
        await asyncio.sleep(0)  # the stream() call is in flight when the commit comes
        await send(START)
        assert await (await opening).all() == ["streamed meanwhile"]
        await send({"type": "http.response.body", "body": b""})

    async def on_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            committed_at.append(await count_items(db))

    await serve(ScopeMiddleware(app, databases=[db]), on_send=on_send)
    assert committed_at == [0]
    assert await count_items(db) == 1


# -- What only the adapters called ---------------------------------------------------------


async def test_fail_current_scope_stops_the_policy_from_committing(
    autocommit_db: Database,
) -> None:
    """fail_current_scope() marks the open scope failed: autocommit commits nothing of it."""
    db = autocommit_db
    fail_current_scope()  # no scope open: nothing to do
    async with db.scope() as scope:
        db.session.add(Item(name="answered error"))
        await db.session.flush()
        fail_current_scope()
        assert scope.failed
    assert await count_items(db) == 0


async def test_dispose_all_disposes_every_database(make_db: MakeDatabase) -> None:
    """dispose_all() closes the pooled connections of each database it is given."""
    first, second = make_db(), make_db()
    for database in (first, second):
        async with database.scope():
            await database.session.execute(text("SELECT 1"))
        assert database.engine.pool.checkedin() == 1  # type: ignore[attr-defined]
    await dispose_all([first, second])
    assert [d.engine.pool.checkedin() for d in (first, second)] == [0, 0]  # type: ignore[attr-defined]
