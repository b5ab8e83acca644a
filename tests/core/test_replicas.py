"""Read replicas on a real primary and streaming standby: where each statement ran, and why.

Each test asks the server itself where a statement ran (``pg_is_in_recovery()``,
``inet_server_port()``). The standby is made to lag for real (``pg_wal_replay_pause()``) and
stopped and restarted with ``pg_ctl``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import insert, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from alchemy_scope import (
    Database,
    Replicas,
    ScopeMiddleware,
    UnsupportedReplicasError,
    is_database_unavailable,
)
from tooling.servers import loopback_socket

from ..replicas import ReplicaCluster, replica_cluster

__all__ = ["replica_cluster"]  # the session fixture, used by name below

MakeRouted = Callable[..., Database]
WHERE = text("SELECT pg_is_in_recovery(), inet_server_port()")


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str]


@pytest.fixture
async def make_routed(replica_cluster: ReplicaCluster) -> AsyncIterator[MakeRouted]:
    """Databases on the primary with the standby as replica, checked once; an empty table."""
    cluster = replica_cluster
    await cluster.on_primary(
        "CREATE TABLE IF NOT EXISTS notes (id serial PRIMARY KEY, body text NOT NULL)",
        "TRUNCATE notes RESTART IDENTITY",
    )
    await cluster.caught_up()
    made: list[Database] = []

    def make(*, standbys: int = 1, commit: Any = "manual", **settings: Any) -> Database:
        replicas = Replicas([cluster.standby_url] * standbys, **settings)
        database = Database(cluster.primary_url, commit=commit, replicas=replicas)
        made.append(database)
        return database

    yield make
    for database in made:
        await database.dispose()
    if not (cluster.standby.data / "postmaster.pid").exists():
        cluster.start_standby()
    await cluster.resume_replay()


async def ready(db: Database) -> Database:
    """``db`` once a health check has found its replicas usable."""
    assert db.replicas is not None
    await db.replicas.check()
    assert all(replica.usable for replica in db.replicas.replicas), db.replicas.replicas
    return db


async def resume(db: Database, cluster: ReplicaCluster) -> None:
    """Let the standby replay again, wait until it has caught up, and check it."""
    await cluster.resume_replay()
    await cluster.caught_up()
    assert db.replicas is not None
    await db.replicas.check()


async def where(db: Database, cluster: ReplicaCluster) -> str:
    """Where the scope's next read runs, as the server answering it says."""
    in_recovery, port = (await db.session.execute(WHERE)).one()
    assert port == (cluster.standby.port if in_recovery else cluster.primary.port)
    return "replica" if in_recovery else "primary"


# --- no replicas, misuse -----------------------------------------------------------------


async def test_without_replicas_sessions_and_bind_are_unchanged(tmp_path: Any) -> None:
    """Without replicas there is no routing code on the path: SQLAlchemy's Session, the engine."""
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'plain.db'}")
    try:
        assert db.replicas is None
        assert "sync_session_class" not in db.sessionmaker.kw
        async with db.scope():
            assert type(db.session.sync_session) is Session
            assert db.session.sync_session.get_bind() is db.engine.sync_engine
            with db.use_primary():
                assert await db.session.scalar(text("SELECT 1")) == 1
            db.read_after("0/1")
            assert db.bookmark is None

        async def route() -> int:
            return 1

        assert db.use_primary()(route) is route  # nothing wrapped either
    finally:
        await db.dispose()


async def test_replicas_of_another_backend_raise_a_clear_error(tmp_path: Any) -> None:
    """Replicas for SQLite (or beside a non-PostgreSQL primary) raise UnsupportedReplicasError."""
    sqlite = f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"
    with pytest.raises(UnsupportedReplicasError, match="PostgreSQL only"):
        Database(sqlite, replicas=[sqlite])
    postgres = create_async_engine("postgresql+asyncpg://u@127.0.0.1:1/x")
    try:
        with pytest.raises(UnsupportedReplicasError, match="sqlite"):
            Database(postgres, replicas=[sqlite])
    finally:
        await postgres.dispose()


async def test_misconfigured_replicas_say_how_to_fix_them() -> None:
    """An empty list, a bad bound, a clashing session class, a bad bookmark: messages that help."""
    url = "postgresql+asyncpg://u@127.0.0.1:1/x"
    with pytest.raises(ValueError, match="at least one replica"):
        Replicas([])
    with pytest.raises(TypeError, match=r"replicas=\['postgresql"):
        Database(url, replicas=url)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_lag"):
        Replicas([url], max_lag=0)
    with pytest.raises(ValueError, match="check_timeout"):
        Replicas([url], check_timeout=-1)
    with pytest.raises(ValueError, match="round-robin"):
        Replicas([url], choice="nearest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot name a cookie"):
        Replicas([url], bookmark_cookie="a b;")
    with pytest.raises(TypeError, match="sync_session_class"):
        Database(url, replicas=[url], session_options={"sync_session_class": Session})
    db = Database(url, replicas=[url])
    try:
        async with db.scope():
            for junk in ("yesterday", "0/zz", "123456789/0"):
                with pytest.raises(ValueError, match="is not a bookmark"):
                    db.read_after(junk)
    finally:
        await db.dispose()


# --- routing ------------------------------------------------------------------------------


async def test_reads_go_to_the_replica(
    make_routed: MakeRouted, replica_cluster: ReplicaCluster
) -> None:
    """A scope that only reads runs every statement on the standby: text, ORM, get()."""
    db = await ready(make_routed())
    await replica_cluster.on_primary("INSERT INTO notes (body) VALUES ('seen')")
    await replica_cluster.caught_up()
    async with db.scope():
        assert await where(db, replica_cluster) == "replica"
        assert [n.body for n in await db.session.scalars(select(Note))] == ["seen"]
        assert (await db.session.get(Note, 1)) is not None
        assert await where(db, replica_cluster) == "replica"


async def test_the_primary_serves_until_the_first_check(
    make_routed: MakeRouted, replica_cluster: ReplicaCluster
) -> None:
    """Before any health check has answered, no replica is trusted: reads go to the primary."""
    db = make_routed()
    async with db.scope():
        assert await where(db, replica_cluster) == "primary"


async def _orm_flush(db: Database) -> None:
    db.session.add(Note(body="flushed"))
    await db.session.flush()


async def _core_insert(db: Database) -> None:
    await db.session.execute(insert(Note).values(body="inserted"))


async def _text_update(db: Database) -> None:
    await db.session.execute(text("INSERT INTO notes (body) VALUES ('text')"))


async def _for_update(db: Database) -> None:
    await db.session.execute(select(Note).with_for_update())


async def _connection(db: Database) -> None:
    await db.session.connection()  # what the app runs on it is unknown: it may write


async def _text_for_update(db: Database) -> None:
    await db.session.execute(text("SELECT * FROM notes FOR UPDATE"))


@pytest.mark.parametrize(
    "write", [_orm_flush, _core_insert, _text_update, _for_update, _text_for_update, _connection]
)
async def test_from_the_first_write_everything_goes_to_the_primary(
    make_routed: MakeRouted,
    replica_cluster: ReplicaCluster,
    write: Callable[[Database], Awaitable[None]],
) -> None:
    """A flush, DML, FOR UPDATE, or connection() goes to the primary; then the scope's reads too."""
    db = await ready(make_routed())
    async with db.scope():
        assert await where(db, replica_cluster) == "replica"
        await write(db)  # on the standby any of these would fail: read-only transaction
        assert await where(db, replica_cluster) == "primary"
        assert await db.session.scalar(text("SELECT count(*) FROM notes")) is not None
        assert await where(db, replica_cluster) == "primary"
        await db.session.commit()
        assert await where(db, replica_cluster) == "primary"  # sticky for the whole scope


WRITES = {
    "select for share": select(Note).with_for_update(read=True),
    "text FOR UPDATE": text("SELECT * FROM notes FOR UPDATE"),
    "text columns FOR SHARE": text("SELECT id FROM notes FOR SHARE").columns(Note.id),
    "from_statement UPDATE": select(Note).from_statement(
        text("UPDATE notes SET body = body RETURNING *")
    ),
    "WITH ... DELETE": text("WITH gone AS (DELETE FROM notes RETURNING id) SELECT 1"),
    "SELECT INTO": text("SELECT * INTO copy FROM notes"),
    "update()": update(Note).values(body="x"),
}
READS = {
    "select()": select(Note),
    "union": select(Note.id).union(select(Note.id)),
    "text SELECT": text("select * from notes"),
    "text columns": text("SELECT id FROM notes").columns(Note.id),
    "from_statement SELECT": select(Note).from_statement(text("SELECT * FROM notes")),
}


@pytest.mark.parametrize(
    ("statement", "writes"),
    [*((s, True) for s in WRITES.values()), *((s, False) for s in READS.values())],
    ids=[*WRITES, *READS],
)
async def test_statements_that_may_write_go_to_the_primary(
    make_routed: MakeRouted, statement: Any, writes: bool
) -> None:
    """Locking, DML and unknown text go to the primary (sticky); plain SELECTs to the replica."""
    db = await ready(make_routed())
    assert db.replicas is not None
    async with db.scope():
        bind = db.session.sync_session.get_bind(clause=statement)
        assert (bind is db.replicas.primary) is writes
        assert (db.session.sync_session.get_bind(clause=select(1)) is bind) is True


async def test_a_begin_block_that_writes_reads_its_writes(
    make_routed: MakeRouted, replica_cluster: ReplicaCluster
) -> None:
    """Inside an explicit begin(), the write and every read after it run on the primary."""
    db = await ready(make_routed())
    async with db.scope(), db.session.begin():
        db.session.add(Note(body="in a block"))
        bodies = await db.session.scalars(select(Note.body))  # autoflush: a write first
        assert list(bodies) == ["in a block"]
        assert await where(db, replica_cluster) == "primary"


async def test_use_primary_covers_a_block_and_a_route(
    make_routed: MakeRouted, replica_cluster: ReplicaCluster
) -> None:
    """Reads inside db.use_primary() (a block or a decorated route) run on the primary."""
    db = await ready(make_routed())

    @db.use_primary()
    async def route() -> str:
        return await where(db, replica_cluster)

    async with db.scope():
        assert await where(db, replica_cluster) == "replica"
        with db.use_primary():
            assert await where(db, replica_cluster) == "primary"
        async with db.use_primary():
            assert await where(db, replica_cluster) == "primary"
        assert await where(db, replica_cluster) == "replica"  # not sticky: nothing was written
    async with db.scope():
        assert await route() == "primary"
        assert await where(db, replica_cluster) == "replica"


async def _chosen(db: Database, scopes: int) -> list[int]:
    """Which replica (by index) each of ``scopes`` new scopes read from, checking it stays."""
    assert db.replicas is not None
    engines = [replica.sync_engine for replica in db.replicas.replicas]
    chosen = []
    for _ in range(scopes):
        async with db.scope():
            await db.session.execute(text("SELECT 1"))
            bind = db.session.sync_session.get_bind(clause=select(1))
            await db.session.execute(text("SELECT 2"))
            assert db.session.sync_session.get_bind(clause=select(1)) is bind
            chosen.append(engines.index(bind))  # type: ignore[arg-type]
    return chosen


async def test_each_scope_keeps_one_replica_chosen_round_robin(make_routed: MakeRouted) -> None:
    """Scopes take the replicas in turn; every read of one scope stays on its replica."""
    db = await ready(make_routed(standbys=2))
    assert await _chosen(db, 4) in ([0, 1, 0, 1], [1, 0, 1, 0])


async def test_random_choice_uses_every_replica_one_per_scope(make_routed: MakeRouted) -> None:
    """choice="random": each scope stays on one replica, and over 30 scopes both are used."""
    db = await ready(make_routed(standbys=2, choice="random"))
    assert set(await _chosen(db, 30)) == {0, 1}


async def test_a_server_that_is_not_a_standby_is_never_a_replica(
    replica_cluster: ReplicaCluster,
) -> None:
    """A primary (or a promoted standby) given as replica is skipped: not in recovery."""
    db = Database(replica_cluster.primary_url, replicas=[replica_cluster.primary_url])
    try:
        assert db.replicas is not None
        await db.replicas.check()
        (replica,) = db.replicas.replicas
        assert not replica.usable
        assert "not in recovery" in str(replica.error)
    finally:
        await db.dispose()


async def test_reads_go_on_from_the_replica_while_the_primary_is_unreachable(
    replica_cluster: ReplicaCluster,
) -> None:
    """The primary's position unknown (nothing listens there), a healthy standby still serves."""
    with loopback_socket() as probe:  # a port nothing listens on once closed
        port = probe.getsockname()[1]
    db = Database(
        f"postgresql+asyncpg://postgres@127.0.0.1:{port}/replicas",
        replicas=[replica_cluster.standby_url],
    )
    try:
        await ready(db)
        async with db.scope():
            assert await where(db, replica_cluster) == "replica"
    finally:
        await db.dispose()


async def test_a_failing_statement_leaves_the_replica_usable(
    make_routed: MakeRouted, replica_cluster: ReplicaCluster
) -> None:
    """A statement's own error on the replica (bad SQL) is the app's: the replica stays in use."""
    db = await ready(make_routed())
    async with db.scope():
        with pytest.raises(DBAPIError, match="no_such_table"):
            await db.session.execute(text("SELECT * FROM no_such_table"))
    assert db.replicas is not None
    assert db.replicas.replicas[0].usable
    async with db.scope():
        assert await where(db, replica_cluster) == "replica"


# --- health -------------------------------------------------------------------------------


async def test_a_replica_lagging_past_the_bound_is_skipped(
    make_routed: MakeRouted, replica_cluster: ReplicaCluster
) -> None:
    """With replay paused and the primary written to, the standby is skipped once past max_lag."""
    db = await ready(make_routed(max_lag=0.3))
    assert db.replicas is not None
    await replica_cluster.pause_replay()
    await replica_cluster.on_primary("INSERT INTO notes (body) VALUES ('new')")
    await asyncio.sleep(0.4)
    await db.replicas.check()
    (replica,) = db.replicas.replicas
    assert not replica.usable
    assert replica.lag is not None
    assert replica.lag > 0.3
    async with db.scope():
        assert await where(db, replica_cluster) == "primary"
        assert await db.session.scalar(text("SELECT count(*) FROM notes")) == 1
    await resume(db, replica_cluster)
    async with db.scope():
        assert await where(db, replica_cluster) == "replica"


async def test_a_stopped_replica_fails_its_request_then_is_routed_around(
    make_routed: MakeRouted, replica_cluster: ReplicaCluster
) -> None:
    """Stopped mid-request: that request errs, later ones use the primary; restarted: back."""
    interval = 0.5
    db = await ready(make_routed(check_interval=interval))
    async with db.scope():
        assert await where(db, replica_cluster) == "replica"
        replica_cluster.stop_standby()
        started = time.monotonic()
        with pytest.raises(DBAPIError) as lost:
            await asyncio.wait_for(db.session.execute(WHERE), 5)
        assert is_database_unavailable(lost.value)
        assert time.monotonic() - started < 2  # an error, not a hang
    stopped = time.monotonic()
    async with db.scope():  # no failure and no wait for the next check: marked down already
        assert await where(db, replica_cluster) == "primary"
    assert time.monotonic() - stopped < interval
    replica_cluster.start_standby()
    back = time.monotonic()
    while True:
        async with db.scope():
            if await where(db, replica_cluster) == "replica":
                break
        assert time.monotonic() - back < 3 * interval + 2, "the restarted standby was not used"
        await asyncio.sleep(0.05)


async def test_a_replica_down_before_any_request_costs_no_request_an_error(
    make_routed: MakeRouted, replica_cluster: ReplicaCluster
) -> None:
    """A standby stopped between requests is found down by the background check: no errors."""
    interval = 0.3
    db = await ready(make_routed(check_interval=interval))
    replica_cluster.stop_standby()
    await asyncio.sleep(interval * 2 + 0.2)  # the background check runs meanwhile
    started = time.monotonic()
    for _ in range(5):
        async with db.scope():
            assert await where(db, replica_cluster) == "primary"
    assert time.monotonic() - started < 1


# --- read-your-writes across requests ------------------------------------------------------


async def test_a_bookmark_reads_from_the_primary_until_the_replica_has_replayed_it(
    make_routed: MakeRouted, replica_cluster: ReplicaCluster
) -> None:
    """After a commit, its bookmark keeps a later scope off a paused replica, then lets it back."""
    db = await ready(make_routed(max_lag=60, read_your_writes=True))
    assert db.replicas is not None
    await replica_cluster.pause_replay()
    async with db.scope():
        async with db.session.begin_nested():  # a savepoint released is no commit yet
            db.session.add(Note(body="saved"))
        assert db.bookmark is None
        await db.session.commit()
        bookmark = db.bookmark
    assert bookmark is not None
    await db.replicas.check()
    async with db.scope():  # no bookmark: the stale replica, which has not seen the note
        assert await where(db, replica_cluster) == "replica"
        assert await db.session.scalar(text("SELECT count(*) FROM notes")) == 0
    async with db.scope():  # the bookmark: the primary, which has
        db.read_after(bookmark)
        assert await where(db, replica_cluster) == "primary"
        assert await db.session.scalar(text("SELECT count(*) FROM notes")) == 1
    await resume(db, replica_cluster)
    async with db.scope():
        db.read_after(bookmark)
        assert await where(db, replica_cluster) == "replica"
        assert await db.session.scalar(text("SELECT count(*) FROM notes")) == 1


async def test_bookmark_cookie_gives_a_client_its_own_writes(
    make_routed: MakeRouted, replica_cluster: ReplicaCluster
) -> None:
    """With bookmark_cookie, an autocommit POST's response sets it; the next GET reads its write."""
    db = await ready(make_routed(commit="autocommit", max_lag=60, bookmark_cookie="db_bookmark"))
    assert db.replicas is not None

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["method"] == "POST":
            db.session.add(Note(body="posted"))
            await db.session.flush()
        rows = await db.session.scalar(text("SELECT count(*) FROM notes"))
        body = f"{await where(db, replica_cluster)} {rows}".encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    asgi = ScopeMiddleware(app, databases=[db])
    await replica_cluster.pause_replay()
    transport = httpx.ASGITransport(app=asgi)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        posted = await client.post("/notes")
        assert posted.text == "primary 1"
        assert posted.headers["set-cookie"].startswith("db_bookmark=")
        assert "Max-Age=60" in posted.headers["set-cookie"]
        await db.replicas.check()
        assert (await client.get("/notes")).text == "primary 1"  # the standby has not replayed
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as stranger:
            assert (await stranger.get("/notes")).text == "replica 0"  # no cookie: stale is fine
            stranger.cookies.set("other", "1")
            stranger.cookies.set("db_bookmark", "not-a-position")
            assert (await stranger.get("/notes")).text == "replica 0"  # garbage is ignored
        await resume(db, replica_cluster)
        assert (await client.get("/notes")).text == "replica 1"
    async with db.scope():  # a scope without a request has no cookie to read
        assert await where(db, replica_cluster) == "replica"
