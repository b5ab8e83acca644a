"""The scope and the session registry: laziness, identity, ending, errors, nesting."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import pytest
from sqlalchemy import event, select, text

from alchemy_scope import (
    ConcurrentSessionUseError,
    Database,
    NoScopeError,
    Scope,
    ScopeClosedError,
    current_scope,
    scope,
)

from ..conftest import MakeDatabase
from ..models import Item
from ..support import (
    assert_writable,
    checked_out_connections,
    count_items,
    idle_connections,
    item_names,
    leaks,
    registry,
)


async def test_scope_is_an_object_with_identity_closed_flag_and_sessions(db: Database) -> None:
    """A scope is one object with an identity, a closed flag and the sessions opened in it."""
    async with db.scope() as current:
        assert isinstance(current, Scope)
        assert current_scope() is current
        assert not current.closed
        assert not current.sessions
        session = db.session
        assert current.sessions == (session,)
        assert registry(db) == {current: session}
    ended = current  # a new name: mypy would keep current.closed narrowed to False
    assert ended.closed
    assert ended.sessions == ()


async def test_opening_a_scope_creates_no_session_and_checks_out_nothing(db: Database) -> None:
    """Opening a scope is lazy: no session, no registry entry, no connection until first use."""
    async with db.scope() as current:
        assert registry(db) == {}
        assert checked_out_connections(db) == 0
        assert current.sessions == ()
    assert registry(db) == {}


async def test_first_use_creates_the_session_and_every_access_returns_it(db: Database) -> None:
    """Within one scope, every access to db.session returns the same session object."""
    async with db.scope():
        first = db.session
        assert checked_out_connections(db) == 0
        await first.execute(text("SELECT 1"))
        assert checked_out_connections(db) == 1
        assert db.session is first
        assert db.scoped_session() is first


async def test_child_tasks_of_a_scope_see_its_session(db: Database) -> None:
    """Tasks started inside a scope (as frameworks run handlers) share its session."""
    async with db.scope():
        outer = db.session

        async def inner() -> object:
            return db.session

        assert await asyncio.create_task(inner()) is outer


async def test_concurrent_scopes_never_share_a_session(db: Database) -> None:
    """Many scopes open at once each get their own session, even across awaits."""
    seen: list[int] = []

    async def unit_of_work() -> None:
        async with db.scope():
            session = db.session
            await session.execute(text("SELECT 1"))
            await asyncio.sleep(0)
            assert db.session is session
            seen.append(id(session))
            await asyncio.sleep(0.001)

    # Kept below the default pool size (5 + 10 overflow), so no scope waits on the pool.
    await asyncio.gather(*(unit_of_work() for _ in range(12)))
    assert len(set(seen)) == 12
    assert registry(db) == {}


async def test_scopes_in_sequence_get_fresh_sessions(db: Database) -> None:
    """A session is never reused by a later scope."""
    async with db.scope():
        first = db.session
    async with db.scope():
        assert db.session is not first


async def test_one_scope_covers_several_databases(make_db: MakeDatabase) -> None:
    """One scope gives one session per Database and ends them all."""
    first, second = make_db(), make_db()
    async with scope():
        a, b = first.session, second.session
        assert a is not b
        await a.execute(text("SELECT 1"))
        await b.execute(text("SELECT 1"))
        assert current_scope().sessions == (a, b)
    assert registry(first) == {}
    assert registry(second) == {}
    assert checked_out_connections(first) == 0
    assert checked_out_connections(second) == 0


async def test_outside_a_scope_session_raises_no_scope_error(db: Database) -> None:
    """db.session outside any scope raises NoScopeError saying how to open one."""
    with pytest.raises(NoScopeError, match=r"async with db\.scope\(\)"):
        db.session  # noqa: B018
    with pytest.raises(NoScopeError):
        current_scope()
    assert registry(db) == {}


async def test_manual_policy_rolls_back_what_was_not_committed(db: Database) -> None:
    """With the manual policy, uncommitted work is rolled back when the scope ends."""
    async with db.scope():
        db.session.add(Item(name="kept"))
        await db.session.commit()
        db.session.add(Item(name="dropped"))
        await db.session.flush()
    assert await item_names(db) == ["kept"]


async def test_autocommit_policy_commits_a_successful_scope(autocommit_db: Database) -> None:
    """With autocommit, a scope that ends without an exception is committed."""
    async with autocommit_db.scope():
        autocommit_db.session.add(Item(name="committed"))
    assert await item_names(autocommit_db) == ["committed"]


async def test_autocommit_policy_rolls_back_a_scope_that_raised(autocommit_db: Database) -> None:
    """With autocommit, a scope whose body raised is rolled back and the error propagates."""
    with pytest.raises(RuntimeError, match="boom"):
        async with autocommit_db.scope():
            autocommit_db.session.add(Item(name="lost"))
            await autocommit_db.session.flush()
            raise RuntimeError("boom")
    assert await count_items(autocommit_db) == 0


async def test_manual_policy_rolls_back_a_scope_that_raised(db: Database) -> None:
    """A body that raises after a flush leaves nothing behind and no connection checked out."""
    with pytest.raises(ZeroDivisionError):
        async with db.scope():
            db.session.add(Item(name="lost"))
            await db.session.flush()
            1 / 0  # noqa: B018
    assert await count_items(db) == 0


async def test_a_commit_that_fails_at_scope_end_raises_and_ends_the_session(
    autocommit_db: Database,
) -> None:
    """An autocommit that fails at the end raises to the caller; the session is still ended."""
    from sqlalchemy.exc import IntegrityError

    async with autocommit_db.scope():
        autocommit_db.session.add(Item(name="twin"))
    with pytest.raises(IntegrityError):
        async with autocommit_db.scope():
            autocommit_db.session.add(Item(name="twin"))
    assert await item_names(autocommit_db) == ["twin"]


async def test_a_cancelled_scope_is_rolled_back_and_ended(db: Database) -> None:
    """Cancelling the task inside a scope rolls back and returns the connection."""
    started = asyncio.Event()

    async def work() -> None:
        async with db.scope():
            db.session.add(Item(name="cancelled"))
            await db.session.flush()
            started.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(work())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert registry(db) == {}
    assert checked_out_connections(db) == 0
    assert await count_items(db) == 0


async def test_anyio_cancellation_ends_the_scope(db: Database) -> None:
    """An anyio cancel scope (as Starlette uses on disconnect) still ends the session."""
    with anyio.move_on_after(0.05) as cancel_scope:
        async with db.scope():
            db.session.add(Item(name="timed out"))
            await db.session.flush()
            await anyio.sleep(60)
    assert cancel_scope.cancelled_caught
    assert registry(db) == {}
    assert checked_out_connections(db) == 0
    assert await count_items(db) == 0


async def test_ending_survives_repeated_cancellation(autocommit_db: Database) -> None:
    """Cancelling the task again and again while its scope ends still ends every session."""
    body_done = asyncio.Event()

    async def work() -> None:
        async with autocommit_db.scope():
            autocommit_db.session.add(Item(name="committed anyway"))
            await autocommit_db.session.flush()
            body_done.set()

    task = asyncio.create_task(work())
    await body_done.wait()
    while not task.done():  # hammer it the way anyio delivers cancellation
        task.cancel()
        await asyncio.sleep(0)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert registry(autocommit_db) == {}
    assert checked_out_connections(autocommit_db) == 0
    # The body had succeeded before the cancellation: its commit ran to completion.
    assert await item_names(autocommit_db) == ["committed anyway"]


async def test_ending_a_scope_starts_no_task(db: Database) -> None:
    """Uncancelled, a scope ends its sessions in the caller's task, transaction or not."""
    loop = asyncio.get_running_loop()
    started: list[str] = []
    default_factory = loop.get_task_factory()

    def counting_factory(loop: asyncio.AbstractEventLoop, coro: Any, **options: Any) -> Any:
        started.append(coro.__qualname__)
        if default_factory is not None:
            return default_factory(loop, coro, **options)
        return asyncio.Task(coro, loop=loop, **options)

    ends: dict[str, list[str]] = {}
    for case in ("committed", "read, transaction open"):
        async with db.scope():
            if case == "committed":
                db.session.add(Item(name="committed"))
                await db.session.commit()
            else:
                await db.session.scalar(select(Item.id).limit(1))
            loop.set_task_factory(counting_factory)
        loop.set_task_factory(default_factory)
        ends[case], started[:] = started[:], []
    assert ends == {"committed": [], "read, transaction open": []}
    assert registry(db) == {}
    assert checked_out_connections(db) == 0


async def test_a_close_that_raises_still_removes_the_session(db: Database) -> None:
    """When close() itself raises, the error propagates and nothing is left behind."""

    def fail_on_close(*_args: object) -> None:
        raise RuntimeError("close failed")

    with pytest.raises(RuntimeError, match="close failed"):
        async with db.scope():
            await db.session.execute(select(Item))
            event.listen(db.session.sync_session, "after_transaction_end", fail_on_close)
    assert registry(db) == {}
    assert checked_out_connections(db) == 0


async def test_a_task_that_outlives_its_scope_gets_scope_closed_error(db: Database) -> None:
    """A task spawned in a scope that uses db.session after the scope ended gets an error."""
    release = asyncio.Event()

    async def late_work() -> None:
        await release.wait()
        await db.session.execute(text("SELECT 1"))

    async with db.scope():
        task = asyncio.create_task(late_work())
    release.set()
    with pytest.raises(ScopeClosedError, match=r"async with db\.scope\(\)"):
        await task
    assert registry(db) == {}


async def test_a_session_kept_after_its_scope_refuses_to_run(db: Database) -> None:
    """A session reference kept past its scope raises instead of silently reconnecting."""
    async with db.scope():
        kept = db.session
        await kept.execute(text("SELECT 1"))
    with pytest.raises(ScopeClosedError):
        await kept.execute(text("SELECT 1"))
    await kept.close()  # ending calls stay harmless
    assert checked_out_connections(db) == 0


async def test_the_recipe_for_late_work_is_a_scope_of_its_own(db: Database) -> None:
    """Late work wrapped in its own scope runs with a fresh session and is ended."""
    release = asyncio.Event()

    async def late_work() -> None:
        await release.wait()
        async with db.scope():
            db.session.add(Item(name="late"))
            await db.session.commit()

    async with db.scope():
        request_session = db.session
        task = asyncio.create_task(late_work())
    release.set()
    await task
    assert await item_names(db) == ["late"]
    assert request_session not in registry(db).values()


async def test_nested_scope_has_an_independent_session_and_restores_the_outer(
    db: Database,
) -> None:
    """A nested scope commits on its own, and the outer session is back after it."""
    async with db.scope() as outer:
        outer_session = db.session
        outer_session.add(Item(name="outer, rolled back"))
        async with db.scope() as inner:
            assert current_scope() is inner
            assert db.session is not outer_session
            db.session.add(Item(name="inner, committed"))
            await db.session.commit()
        assert inner.closed
        assert current_scope() is outer
        assert db.session is outer_session
        await outer_session.flush()  # after the inner commit: SQLite allows one writer at a time
    assert await item_names(db) == ["inner, committed"]


async def test_gather_over_one_session_fails_with_a_clear_error(db: Database) -> None:
    """Two tasks using one scope's session at once raise ConcurrentSessionUseError."""
    async with db.scope():
        await db.session.execute(text("SELECT 1"))  # warm: the connection is already there
        results = await asyncio.gather(
            db.session.execute(select(Item)),
            db.session.execute(select(Item)),
            return_exceptions=True,
        )
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 1
    assert isinstance(errors[0], ConcurrentSessionUseError)
    assert "async with db.scope()" in str(errors[0])


async def test_gather_with_a_scope_per_branch_runs_queries_in_parallel(db: Database) -> None:
    """The documented recipe: each concurrent branch opens its own scope."""

    async def count(name: str) -> int:
        async with db.scope():
            return len((await db.session.scalars(select(Item).where(Item.name == name))).all())

    async with db.scope():
        db.session.add_all([Item(name="a"), Item(name="b")])
        await db.session.commit()
        assert list(await asyncio.gather(count("a"), count("b"), count("c"))) == [1, 1, 0]


async def test_serialize_lets_tasks_take_turns_on_one_session(db: Database) -> None:
    """With serialize=True, concurrent use of one session waits instead of raising."""
    async with db.scope(serialize=True):
        db.session.add(Item(name="x"))
        await db.session.flush()
        results = await asyncio.gather(*(db.session.scalar(select(Item.name)) for _ in range(5)))
    assert results == ["x"] * 5


async def test_scope_end_waits_for_an_operation_still_running(db: Database) -> None:
    """A scope that ends while a child task still queries waits for it before closing."""
    async with db.scope():
        await db.session.execute(text("SELECT 1"))
        task = asyncio.create_task(db.session.execute(select(Item)))
        await asyncio.sleep(0)  # the query is now in flight
    await task
    assert registry(db) == {}


def test_database_rejects_an_unknown_commit_policy() -> None:
    """A misspelt commit policy raises ValueError naming the valid ones."""
    with pytest.raises(ValueError, match="commit='manual'"):
        Database("sqlite+aiosqlite://", commit="always")  # type: ignore[arg-type]  # the misuse


def test_password_never_appears_in_repr() -> None:
    """The repr of a Database hides the URL's password."""
    db = Database("postgresql+asyncpg://app:s3cr3t-pw@127.0.0.1:5432/app")
    assert "s3cr3t-pw" not in repr(db)
    assert "***" in repr(db)


async def test_dispose_closes_the_pool(db: Database) -> None:
    """dispose() closes every pooled connection of the engine."""
    async with db.scope():
        await db.session.execute(text("SELECT 1"))
    assert idle_connections(db) == 1
    await db.dispose()
    assert idle_connections(db) == 0


async def test_a_failed_commit_never_returns_its_transaction_to_the_pool(db: Database) -> None:
    """After a COMMIT fails, the next user of the pool sees none of its writes and no lock."""
    from sqlalchemy.exc import IntegrityError

    from ..support import add_write_that_fails_at_commit

    async with db.scope():
        add_write_that_fails_at_commit(db.session)
        with pytest.raises(IntegrityError):
            await db.session.commit()
    assert await count_items(db) == 0  # on the pooled connection: no open transaction
    async with db.scope():
        db.session.add(Item(name="next request"))
        await db.session.commit()
    assert await item_names(db) == ["next request"]


async def test_is_database_unavailable_tells_busy_and_down_from_wrong(
    make_db: MakeDatabase, database_url: str
) -> None:
    """A pool timeout and an unreachable server are 'unavailable'; a constraint is not."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import IntegrityError

    from alchemy_scope import is_database_unavailable

    db = make_db(engine_options={"pool_size": 1, "max_overflow": 0, "pool_timeout": 0.1})
    async with db.engine.connect():  # the only connection is taken
        with pytest.raises(Exception) as busy:  # noqa: PT011 - classified below
            async with db.scope():
                await db.session.execute(text("SELECT 1"))
    assert is_database_unavailable(busy.value)

    async with db.scope():
        db.session.add(Item(name="twin"))
        await db.session.commit()
    with pytest.raises(IntegrityError) as wrong:
        async with db.scope():
            db.session.add(Item(name="twin"))
            await db.session.commit()
    assert not is_database_unavailable(wrong.value)

    if database_url != "sqlite":  # a server that is not there: a port nothing listens on
        unreachable = Database(make_url(database_url).set(port=1).render_as_string(False))
        with pytest.raises(Exception) as refused:  # noqa: PT011 - classified below
            async with unreachable.scope():
                await unreachable.session.execute(text("SELECT 1"))
        await unreachable.dispose()
        assert is_database_unavailable(refused.value)


@pytest.mark.parametrize("step", ["commit", "rollback"])
async def test_an_ending_that_an_anyio_cancel_scope_cuts_short_still_ends_everything(
    make_db: MakeDatabase, step: str
) -> None:
    """Cancelled in its COMMIT or ROLLBACK, and again at every await after, a scope still ends."""
    db = make_db(commit="autocommit" if step == "commit" else "manual")
    started: list[str] = []
    loop = asyncio.get_running_loop()
    default_factory = loop.get_task_factory()

    def counting_factory(loop: asyncio.AbstractEventLoop, coro: Any, **options: Any) -> Any:
        started.append(getattr(coro, "__qualname__", "?"))
        if default_factory is not None:
            return default_factory(loop, coro, **options)
        return asyncio.Task(coro, loop=loop, **options)

    with anyio.CancelScope() as cancel_scope:

        def cancel_now(*_args: Any) -> None:
            cancel_scope.cancel()  # delivered at the statement's await, then at every await

        event.listen(db.engine.sync_engine, step, cancel_now, once=True)
        loop.set_task_factory(counting_factory)
        try:
            async with db.scope():
                db.session.add(Item(name="cut short"))
                await db.session.flush()
        finally:
            loop.set_task_factory(default_factory)
    assert cancel_scope.cancelled_caught
    assert "_end_sessions" in started  # what the cancellation left ended in a task of its own
    assert await leaks(db) == []
    await assert_writable(db)
