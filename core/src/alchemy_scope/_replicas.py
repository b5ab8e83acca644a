"""Read replicas: where each statement of a scope runs, and which replicas may serve reads.

A ``Database`` given replicas makes its sessions' synchronous half a :class:`RoutingSession`
(SQLAlchemy's documented hook for partitioning: ``get_bind()``). Per statement, in order:

1. a connection the session is bound to (``db.bound_to()``, the pytest fixtures) takes all;
2. once the scope has written, everything goes to the primary (read-your-writes);
3. a write (a flush with changes, DML, ``SELECT ... FOR UPDATE``, DDL, a text statement that
   is not a plain ``SELECT``, ``session.connection()``) goes to the primary and makes the
   scope stick to it;
4. inside ``db.use_primary()`` reads go to the primary;
5. otherwise the read goes to the scope's replica, chosen at its first read (round-robin or
   random) among the usable ones, and kept for the scope: one consistent snapshot. With a
   bookmark (read-your-writes across requests) only a replica that has replayed past it is
   usable. With none usable, the primary.

A replica is usable when the last health check, which runs in the background every
``check_interval`` seconds, found it up, in recovery and lagging at most ``max_lag`` seconds.
A connection error on a replica marks it down at once, so later scopes route around it
without waiting for the next check. The check's answer is cached: no request waits for it.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import itertools
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from contextvars import ContextVar, Token
from types import TracebackType
from typing import Any, ClassVar, Literal, TypeVar

from sqlalchemy import event, text
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ClauseElement, TextClause

from ._errors import UnsupportedReplicasError, _driver_says_unavailable
from ._scope import SessionOwner, _current_scope

logger = logging.getLogger("alchemy_scope")

Choice = Literal["round-robin", "random"]
ReplicaSpec = str | URL | AsyncEngine

# The replica's state in one round trip: in recovery, replayed up to (bytes), behind by (s).
_PROBE = text(
    "SELECT pg_is_in_recovery(), "
    "pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0')::bigint, "
    "EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp())::float8"
)
# What the primary has flushed: a replica that has replayed this much lags by nothing.
_PRIMARY_FLUSHED = text("SELECT pg_wal_lsn_diff(pg_current_wal_flush_lsn(), '0/0')::bigint")
# Run on the primary's connection right after COMMIT: past the commit record, for bookmarks.
_AFTER_COMMIT = "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint"
_UNKNOWN_POSITION = 2**64 - 1  # a commit whose position could not be read: no replica is past it
_COOKIE_NAME = re.compile(r"[A-Za-z0-9_-]+")

# Text statements that only read: a plain SELECT (or SHOW, VALUES, TABLE) without a locking
# clause and without INTO. Anything else (WITH, which may hide a write, EXPLAIN ANALYZE, ...)
# goes to the primary.
_READ_ONLY_TEXT = re.compile(r"\s*(?:select|show|values|table)\b", re.IGNORECASE)
_WRITING_TEXT = re.compile(r"\bfor\s+(?:update|no\s+key|share|key\s+share)\b|\binto\b", re.I)


@functools.lru_cache(maxsize=512)
def _text_reads_only(sql: str) -> bool:
    return _READ_ONLY_TEXT.match(sql) is not None and _WRITING_TEXT.search(sql) is None


def _reads_only(clause: ClauseElement) -> bool:
    """Whether ``clause`` is a statement a replica can run: a SELECT that locks nothing."""
    if isinstance(clause, TextClause):
        return _text_reads_only(clause.text)
    element = getattr(clause, "element", None)  # text().columns(), select().from_statement()
    if isinstance(element, ClauseElement) and (
        getattr(clause, "is_select", False) or type(clause).__name__ == "FromStatement"
    ):
        return _reads_only(element)
    return bool(getattr(clause, "is_select", False)) and (
        getattr(clause, "_for_update_arg", None) is None
    )


def format_position(position: int) -> str:
    """A WAL position as PostgreSQL writes it (``16/B374D848``): the bookmark's text."""
    return f"{position >> 32:X}/{position & 0xFFFFFFFF:X}"


def parse_position(bookmark: str) -> int | None:
    """The WAL position a bookmark names, or ``None`` if it is not one."""
    high, slash, low = bookmark.partition("/")
    if not slash or not 1 <= len(high) <= 8 or not 1 <= len(low) <= 8:
        return None
    try:
        return (int(high, 16) << 32) | int(low, 16)
    except ValueError:
        return None


class Replicas:
    """The read replicas of a ``Database`` and how reads are routed to them (PostgreSQL only).

    Pass it as ``Database(url, replicas=Replicas([...], max_lag=2.0))``; a plain list,
    ``Database(url, replicas=[...])``, takes the defaults.

    Args:
        replicas: Each replica as an async URL or an ``AsyncEngine``. A URL gets the
            ``Database``'s ``engine_options``.
        max_lag: Skip a replica that is more than this many seconds behind the primary.
        check_interval: Seconds between two health checks of every replica (in the
            background; requests never wait for one).
        check_timeout: How long a health check waits for a replica before it counts as
            down; defaults to ``check_interval``.
        choice: How each scope picks its replica among the usable ones: ``"round-robin"``
            or ``"random"``.
        read_your_writes: Record where in the WAL each commit of a scope that wrote ended
            (one query on the primary after such a commit), as the bookmark
            ``db.bookmark`` returns and ``db.read_after()`` takes back.
        bookmark_cookie: The name of a cookie that carries the bookmark (implies
            ``read_your_writes``): the response to a request that committed a write sets
            it, and a request that brings it back reads from a replica only once that
            replica has replayed past it. ``ScopeMiddleware`` (so every integration) handles
            it for the databases it is given.
        bookmark_max_age: How long the client keeps the cookie, in seconds: past the
            replicas' usual lag.

    Raises:
        TypeError: One URL or engine was given instead of a list of them.
        ValueError: No replica was given, or a number or ``choice`` is out of range.
    """

    def __init__(
        self,
        replicas: Iterable[ReplicaSpec],
        *,
        max_lag: float = 5.0,
        check_interval: float = 1.0,
        check_timeout: float | None = None,
        choice: Choice = "round-robin",
        read_your_writes: bool = False,
        bookmark_cookie: str | None = None,
        bookmark_max_age: int = 60,
    ) -> None:
        if isinstance(replicas, (str, URL, AsyncEngine)):
            raise TypeError(
                "replicas takes a list of URLs or engines, not one: write "
                f"replicas=[{replicas!r}] (or Replicas([...]))."
            )
        self.replicas = tuple(replicas)
        if not self.replicas:
            raise ValueError(
                "Replicas() needs at least one replica URL or engine; for a Database without "
                "replicas, leave out replicas=."
            )
        if choice not in ("round-robin", "random"):
            raise ValueError(f"Unknown choice {choice!r}: use 'round-robin' or 'random'.")
        for name, value in (("max_lag", max_lag), ("check_interval", check_interval)):
            if not value > 0:
                raise ValueError(f"{name} must be a number of seconds above 0, not {value!r}.")
        if check_timeout is not None and not check_timeout > 0:
            raise ValueError(f"check_timeout must be above 0 seconds, not {check_timeout!r}.")
        self.max_lag = max_lag
        self.check_interval = check_interval
        self.check_timeout = check_interval if check_timeout is None else check_timeout
        if bookmark_cookie is not None and not _COOKIE_NAME.fullmatch(bookmark_cookie):
            raise ValueError(
                f"{bookmark_cookie!r} cannot name a cookie: use letters, digits, '_' and '-'."
            )
        self.choice: Choice = choice
        self.read_your_writes = read_your_writes or bookmark_cookie is not None
        self.bookmark_cookie = bookmark_cookie
        self.bookmark_max_age = bookmark_max_age


class Replica:
    """One replica and what its last health check found.

    Attributes:
        engine: Its ``AsyncEngine``.
        usable: Whether scopes may read from it now.
        replayed: How far it has replayed the WAL (bytes), at the last check.
        lag: Seconds behind the primary at the last check (0 when caught up).
        error: Why it is down, if it is.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.sync_engine = engine.sync_engine
        self.usable = False  # unknown until the first check: the primary serves meanwhile
        self.replayed = -1
        self.lag: float | None = None
        self.error: BaseException | None = None
        self._was_down = False
        self._caught_up_at: float | None = None

    def __repr__(self) -> str:
        url = self.engine.url.render_as_string(hide_password=True)
        state = "usable" if self.usable else f"skipped ({self.error or f'lag {self.lag}'})"
        return f"<Replica {url} {state}>"


class RoutingSession(Session):
    """The synchronous session behind a ``ScopedSession`` of a ``Database`` with replicas.

    One class per ``Database``: ``_router`` names its :class:`ReplicaSet`.
    """

    _router: ClassVar[ReplicaSet]
    _replica: Engine | None = None  # the scope's replica, chosen at its first read
    _on_primary = False  # the scope has written: everything goes to the primary
    _read_after: int | None = None  # db.read_after(): a WAL position replicas must be past
    _committed: int | None = None  # where its last commit on the primary ended in the WAL

    def get_bind(
        self,
        mapper: Any = None,
        *,
        clause: ClauseElement | None = None,
        bind: Engine | Connection | None = None,
        **kw: Any,
    ) -> Engine | Connection:
        """The primary or the scope's replica, for ``clause`` (see the module's rules)."""
        if bind is not None:
            return bind
        own = self.bind
        router = self._router
        if self._on_primary or own is not router.primary:  # wrote, or bound_to() a connection
            assert own is not None
            return own
        if clause is None or self._flushing:
            self._on_primary = True
            return own
        # The common case first, in two attribute reads: a select() that locks nothing.
        plain_select = getattr(clause, "is_select", False) and (
            getattr(clause, "_for_update_arg", True) is None
        )
        if not plain_select and not _reads_only(clause):
            self._on_primary = True
            return own
        if router.forced.get():
            return own
        replica = self._replica
        if replica is None:
            replica = self._replica = router.choose(self._read_after)
        return replica


_F = TypeVar("_F", bound=Callable[..., Awaitable[Any]])


class PrimaryBlock:
    """What ``db.use_primary()`` returns: a block, or a decorator of an async route.

    ``with db.use_primary():`` (or ``async with``) sends the reads in the block to the primary;
    ``@db.use_primary()`` does the same for every call of an async function. Without replicas
    it does nothing.
    """

    __slots__ = ("_token", "_var")

    def __init__(self, var: ContextVar[bool] | None) -> None:
        self._var = var
        self._token: Token[bool] | None = None

    def __enter__(self) -> None:
        if self._var is not None:
            self._token = self._var.set(True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._var is not None and self._token is not None:
            self._var.reset(self._token)
            self._token = None

    async def __aenter__(self) -> None:
        self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    def __call__(self, function: _F) -> _F:
        """Decorate an async function (a route): its calls read from the primary."""
        var = self._var
        if var is None:
            return function

        @functools.wraps(function)
        async def on_primary(*args: Any, **kwargs: Any) -> Any:
            token = var.set(True)
            try:
                return await function(*args, **kwargs)
            finally:
                var.reset(token)

        return on_primary  # type: ignore[return-value]


class ReplicaSet:
    """The replicas of one ``Database`` at run time: ``db.replicas``.

    Attributes:
        settings: The :class:`Replicas` it was made from.
        replicas: One :class:`Replica` per replica, in the order given.
        primary: The primary's synchronous ``Engine``.
    """

    def __init__(
        self,
        primary: AsyncEngine,
        replicas: Replicas | Sequence[ReplicaSpec],
        session_options: MutableMapping[str, Any],
        engine_options: dict[str, Any],
    ) -> None:
        settings = replicas if isinstance(replicas, Replicas) else Replicas(replicas)
        for name in ("sync_session_class", "binds"):
            if name in session_options:
                raise TypeError(
                    f"session_options[{name!r}] cannot be combined with replicas=: the "
                    "replicas route each statement through a session class of their own. "
                    "Leave it out, or route yourself with a Database without replicas."
                )
        engines = [
            spec if isinstance(spec, AsyncEngine) else create_async_engine(spec, **engine_options)
            for spec in settings.replicas
        ]
        for engine in (primary, *engines):
            if engine.dialect.name != "postgresql":
                raise UnsupportedReplicasError(engine.url.render_as_string(hide_password=True))
        self.settings = settings
        self.primary: Engine = primary.sync_engine
        self._primary_async = primary
        self.replicas = tuple(Replica(engine) for engine in engines)
        self._usable: tuple[Replica, ...] = ()
        self._turn = itertools.count()
        self.forced: ContextVar[bool] = ContextVar("alchemy_scope.use_primary", default=False)
        cookie = settings.bookmark_cookie
        self._cookie_prefix = None if cookie is None else cookie.encode() + b"="
        self._watcher: asyncio.Task[None] | None = None
        self.session_class: type[RoutingSession] = type(
            "RoutingSession", (RoutingSession,), {"_router": self}
        )
        if settings.read_your_writes:
            event.listen(self.session_class, "after_commit", self._after_commit)
        for replica in self.replicas:
            event.listen(replica.sync_engine, "handle_error", functools.partial(_lost, self))
        session_options["sync_session_class"] = self.session_class

    # -- routing (in the session's greenlet, once per scope) --------------------------------

    def choose(self, read_after: int | None) -> Engine:
        """The replica a new scope reads from, or the primary when none is usable."""
        self._watch()
        usable = self._usable
        if self._cookie_prefix is not None:
            brought = self._brought()
            if brought is not None:
                read_after = max(read_after or 0, brought)
        if read_after is not None:
            usable = tuple(replica for replica in usable if replica.replayed >= read_after)
        if not usable:
            return self.primary
        if len(usable) == 1:
            return usable[0].sync_engine
        if self.settings.choice == "random":
            return random.choice(usable).sync_engine
        return usable[next(self._turn) % len(usable)].sync_engine

    def _brought(self) -> int | None:
        """The bookmark the current scope's request brought in its cookie, if any."""
        current = _current_scope.get()
        request = None if current is None else current._request
        prefix = self._cookie_prefix
        if request is None or prefix is None:
            return None
        for key, value in request.get("headers", ()):
            if key == b"cookie":
                for part in value.split(b";"):
                    pair = part.strip()
                    if pair.startswith(prefix):  # a client's garbage is no bookmark: ignored
                        return parse_position(pair[len(prefix) :].decode("latin-1"))
        return None

    def set_cookie(self, session: Any) -> bytes | None:
        """The ``Set-Cookie`` value for a response whose scope committed ``session``'s writes."""
        committed = getattr(getattr(session, "sync_session", None), "_committed", None)
        if committed is None or self._cookie_prefix is None:
            return None
        return (
            self._cookie_prefix
            + format_position(committed).encode()
            + f"; Max-Age={self.settings.bookmark_max_age}; Path=/; HttpOnly; SameSite=Lax".encode()
        )

    def _refresh(self) -> None:
        self._usable = tuple(replica for replica in self.replicas if replica.usable)

    def _mark_down(self, replica: Replica, error: BaseException) -> None:
        if replica.usable:
            logger.warning("Replica %s is down, reads go elsewhere: %s", replica, error)
        replica.usable = False
        replica.error = error
        replica._was_down = True
        self._refresh()

    # -- health ----------------------------------------------------------------------------

    def _watch(self) -> None:
        """Start the background health check in the running event loop, unless it runs."""
        watcher = self._watcher
        loop = asyncio.get_running_loop()
        if watcher is None or watcher.done() or watcher.get_loop() is not loop:
            # In a context of its own: not the request's that happened to start it (its scope).
            self._watcher = contextvars.Context().run(
                loop.create_task, self._check_forever(), name="alchemy_scope replicas"
            )

    async def _check_forever(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self.settings.check_interval)

    async def check(self) -> None:
        """Check every replica now and update which are usable; start the background check."""
        self._watch()
        flushed = await self._guarded(self._primary_async, _PRIMARY_FLUSHED)
        primary_flushed = None if isinstance(flushed, BaseException) else int(flushed[0])
        await asyncio.gather(*(self._check(replica, primary_flushed) for replica in self.replicas))
        self._refresh()

    async def _check(self, replica: Replica, primary_flushed: int | None) -> None:
        row = await self._guarded(replica.engine, _PROBE)
        if isinstance(row, BaseException):
            self._mark_down(replica, row)
            return
        in_recovery, replayed, behind = row
        if not in_recovery:
            self._mark_down(replica, RuntimeError("not in recovery: promoted to a primary"))
            return
        replica.replayed = -1 if replayed is None else int(replayed)
        if primary_flushed is None:  # the primary did not answer in time: lag as it was
            replica.lag = 0.0 if replica.lag is None else replica.lag
        elif replica.replayed >= primary_flushed:
            replica.lag = 0.0
            replica._caught_up_at = time.monotonic()
        else:
            # Behind: at most since the last transaction it replayed was committed, and at
            # most since a check last found it caught up (an idle primary's housekeeping
            # records would otherwise make the first of these look like hours).
            since_replayed = float("inf") if behind is None else max(float(behind), 0.0)
            caught_up_at = replica._caught_up_at
            since_caught_up = (
                float("inf") if caught_up_at is None else time.monotonic() - caught_up_at
            )
            replica.lag = min(since_replayed, since_caught_up)
        if replica.lag > self.settings.max_lag:
            if replica.usable:
                logger.warning("Replica %s lags %.1f s: skipped", replica, replica.lag)
            replica.usable = False
            replica.error = None
            return
        if replica._was_down:  # its pooled connections died with it
            await replica.engine.dispose()
            replica._was_down = False
        replica.error = None
        replica.usable = True

    async def _guarded(self, engine: AsyncEngine, query: Any) -> Any:
        """Run ``query`` on ``engine`` within the check's timeout: its row, or the error."""

        async def probe() -> Any:
            async with engine.connect() as connection:
                return (await connection.execute(query)).one()

        try:
            return await asyncio.wait_for(probe(), self.settings.check_timeout)
        except Exception as error:  # down, refusing, too slow: that is the answer
            return error

    async def dispose(self) -> None:
        """Stop the health check and dispose the replicas' engines."""
        watcher, self._watcher = self._watcher, None
        if watcher is not None and not watcher.done():
            watcher.cancel()
            # A probe cancelled in the middle of connecting can take a while to unwind (asyncpg
            # under load) and must close its connection first; but a shutdown never hangs on
            # it: past the bound, it finishes alone.
            await asyncio.wait({watcher}, timeout=max(10.0, 2 * self.settings.check_timeout))
            if watcher.done() and not watcher.cancelled():
                watcher.exception()  # retrieved: a failed check is no news at shutdown
        for replica in self.replicas:
            await replica.engine.dispose()
            replica.usable = False
        self._refresh()

    # -- bookmarks -------------------------------------------------------------------------

    def _after_commit(self, session: Session) -> None:
        """A scope that wrote committed: record where in the WAL its commit ended."""
        transaction = session.get_transaction()  # the root one
        if (
            not isinstance(session, RoutingSession)
            or transaction is None
            or session.get_nested_transaction() is not None  # a savepoint released
        ):
            return
        entry = transaction._connections.get(self.primary)
        if not session._on_primary or entry is None:
            return
        try:
            position = int(entry[0].exec_driver_sql(_AFTER_COMMIT).scalar_one())
        except Exception:  # committed all the same: only no replica can be trusted with it
            logger.warning("The WAL position after a commit could not be read", exc_info=True)
            position = _UNKNOWN_POSITION
        session._committed = max(session._committed or 0, position)


def bookmark_cookies(databases: Iterable[SessionOwner] | None) -> list[ReplicaSet] | None:
    """The replica sets among ``databases`` whose bookmarks travel in a cookie, or ``None``."""
    found = [
        replicas
        for replicas in (getattr(db, "replicas", None) for db in databases or ())
        if isinstance(replicas, ReplicaSet) and replicas.settings.bookmark_cookie is not None
    ]
    return found or None


def with_bookmark_cookies(scope: Any, message: Any, sets: list[ReplicaSet]) -> Any:
    """``message`` (a response start) plus a cookie per database whose scope committed a write."""
    cookies = [
        (b"set-cookie", value)
        for owner, session in scope._opened
        if (replicas := getattr(owner, "replicas", None)) in sets
        and (value := replicas.set_cookie(session)) is not None
    ]
    if not cookies:
        return message
    return {**message, "headers": [*message.get("headers", ()), *cookies]}


def _lost(router: ReplicaSet, context: Any) -> None:
    """A replica's connection failed: if it is lost or refused, skip the replica from now on."""
    error = context.original_exception
    if context.is_disconnect or _driver_says_unavailable(error):
        for replica in router.replicas:
            if replica.sync_engine is context.engine:
                router._mark_down(replica, error)
