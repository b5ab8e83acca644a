"""What the database cost each scope: opt-in figures, N+1 warnings and the Server-Timing value.

Off by default, and off means off: a ``Database`` without ``insight`` registers no listener
and allocates nothing per scope or per statement. With it on, listeners on the engine add
each statement, its time, the rows it returned, each wait for a pool connection and each
COMMIT or ROLLBACK to the figures of the scope it ran in (the ``ContextVar`` of ``_scope``),
one ``ScopeFigures`` per engine per scope, created at the first of them.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from ._errors import AlchemyScopeError
from ._scope import Scope, _current_scope

logger = logging.getLogger("alchemy_scope.insight")

_clock = time.perf_counter


@dataclass(frozen=True)
class Insight:
    """Options of ``Database(url, insight=Insight(...))``; ``insight=True`` takes the defaults.

    Args:
        repeat_limit: A statement (its compiled SQL, parameters aside) that runs more than
            this many times in one scope is taken for an N+1 query: one warning per scope on
            the ``alchemy_scope.insight`` logger names it, its count and the scope's route.
        on_scope_end: Called with the scope and its ``ScopeFigures`` when a scope that used
            the database ends (after its COMMIT or ROLLBACK), for logs and metrics. A plain
            function: it runs synchronously inside the ending; an exception it raises is
            logged, never propagated.
        server_timing: Add a ``Server-Timing`` header to every HTTP response of an app whose
            ``ScopeMiddleware`` knows this database: its statements' time and count, and the
            pool wait, as they stand when the response starts.

    Raises:
        ValueError: ``repeat_limit`` is below 1.
        TypeError: ``on_scope_end`` is not a plain function.
    """

    repeat_limit: int = 5
    on_scope_end: Callable[[Scope, ScopeFigures], object] | None = None
    server_timing: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.repeat_limit, int) or self.repeat_limit < 1:
            raise ValueError(
                f"Insight(repeat_limit={self.repeat_limit!r}): give the number of times one "
                "statement may run in a scope before it is reported, an int of 1 or more "
                "(the default is 5)."
            )
        callback = self.on_scope_end
        if callback is not None and (
            not callable(callback)
            or inspect.iscoroutinefunction(callback)
            or inspect.iscoroutinefunction(getattr(callback, "__call__", None))  # noqa: B004
        ):
            raise TypeError(
                f"Insight(on_scope_end={callback!r}): pass a plain function taking (scope, "
                "figures); it runs synchronously as the scope ends. For async work, have it "
                "hand the figures on (to a queue, or asyncio.get_running_loop().create_task)."
            )


class ScopeFigures:
    """What one database cost one scope so far: read it with ``db.figures()``.

    Attributes:
        statements: Statements executed (an ``executemany`` counts once).
        statement_time: Seconds spent executing them (a streamed result's later fetches
            aside).
        pool_wait: Seconds spent getting a connection from the pool: waiting for a free
            one, opening a new one, and the ``pool_pre_ping`` ping included.
        rows: Rows the statements returned; a streamed (server-side cursor) result's rows are
            not counted.
        commits: COMMITs and RELEASE SAVEPOINTs sent.
        rollbacks: ROLLBACKs and ROLLBACK TO SAVEPOINTs sent.
        counts: How many times each statement ran, by its SQL text.
    """

    __slots__ = (
        "commits",
        "counts",
        "pool_wait",
        "rollbacks",
        "rows",
        "statement_time",
        "statements",
    )

    def __init__(self) -> None:
        self.statements = 0
        self.statement_time = 0.0
        self.pool_wait = 0.0
        self.rows = 0
        self.commits = 0
        self.rollbacks = 0
        self.counts: dict[str, int] = {}

    @property
    def repeated(self) -> dict[str, int]:
        """The statements that ran more than once, with their counts, most repeated first."""
        repeats = [(sql, count) for sql, count in self.counts.items() if count > 1]
        return dict(sorted(repeats, key=lambda repeat: -repeat[1]))

    def __repr__(self) -> str:
        return (
            f"<ScopeFigures {self.statements} statement(s) in {self.statement_time * 1000:.1f} ms, "
            f"pool wait {self.pool_wait * 1000:.1f} ms, {self.rows} row(s), "
            f"{self.commits} commit(s), {self.rollbacks} rollback(s)>"
        )


class RepeatedStatement:
    """An N+1 suspect: ``sql`` ran ``count`` times in ``scope``, more than ``limit``."""

    __slots__ = ("count", "limit", "scope", "sql")

    def __init__(self, scope: Scope, sql: str, count: int, limit: int) -> None:
        self.scope = scope
        self.sql = sql
        self.count = count
        self.limit = limit

    def __str__(self) -> str:
        return (
            f"N+1 query suspected in {self.scope!r}: this statement ran {self.count} times "
            f"(more than repeat_limit={self.limit}); load the relation with the first query "
            f"(selectinload(), joinedload()) or batch the lookups:\n    {self.sql}"
        )


# Who else hears of each N+1 suspect besides the log: the pytest plugin's strict mode.
repeat_listeners: list[Callable[[RepeatedStatement], object]] = []


class EngineWatch:
    """The listeners that keep the figures of one engine, and its figures in each scope."""

    def __init__(self, engine: AsyncEngine, insight: object) -> None:
        if not isinstance(insight, Insight):
            raise TypeError(
                f"Database(insight={insight!r}): pass insight=True, or "
                "insight=alchemy_scope.Insight(repeat_limit=..., on_scope_end=..., "
                "server_timing=...)."
            )
        self.engine = engine.sync_engine
        self.insight = insight
        self.server_timing = insight.server_timing
        sync_engine = self.engine
        if "raw_connection" in vars(sync_engine):
            raise AlchemyScopeError(
                "This engine already keeps figures for another Database: turn insight on "
                "for one Database per engine (Database(url, insight=...) creates its own)."
            )
        for name, listener in self.listeners():
            event.listen(sync_engine, name, listener)
        original = sync_engine.raw_connection

        def raw_connection() -> Any:
            started = _clock()
            try:
                return original()
            finally:
                current = _current_scope.get()
                if current is not None:
                    self.figures_of(current).pool_wait += _clock() - started

        sync_engine.raw_connection = raw_connection  # type: ignore[method-assign]

    def listeners(self) -> Iterable[tuple[str, Callable[..., None]]]:
        """The engine events this watch listens to, with its listener of each."""
        return (
            ("before_cursor_execute", self.before_statement),
            ("after_cursor_execute", self.after_statement),
            ("commit", self.committed),
            ("release_savepoint", self.committed),
            ("rollback", self.rolled_back),
            ("rollback_savepoint", self.rolled_back),
        )

    def figures_of(self, scope: Scope) -> ScopeFigures:
        """The figures of ``scope`` for this engine, created at the first use."""
        figures = scope._figures
        if figures is None:
            figures = scope._figures = {}
        found: ScopeFigures | None = figures.get(self)
        if found is None:
            found = figures[self] = ScopeFigures()
        return found

    def before_statement(
        self, _conn: Any, _cursor: Any, _sql: Any, _params: Any, context: Any, _many: Any
    ) -> None:
        if _current_scope.get() is not None and context is not None:
            context._alchemy_scope_started = _clock()

    def after_statement(
        self, _conn: Any, cursor: Any, sql: str, _params: Any, context: Any, _many: Any
    ) -> None:
        current = _current_scope.get()
        if current is None:
            return
        figures = self.figures_of(current)
        figures.statements += 1
        started = getattr(context, "_alchemy_scope_started", None)
        if started is not None:
            figures.statement_time += _clock() - started
        rows = getattr(cursor, "_rows", None)  # the async drivers' buffered result
        if rows is not None:
            figures.rows += len(rows)
        counts = figures.counts
        counts[sql] = counts.get(sql, 0) + 1

    def committed(self, *_: Any) -> None:
        current = _current_scope.get()
        if current is not None:
            self.figures_of(current).commits += 1

    def rolled_back(self, *_: Any) -> None:
        current = _current_scope.get()
        if current is not None:
            self.figures_of(current).rollbacks += 1

    def scope_ended(self, scope: Scope) -> None:
        """Report the figures of ``scope``: the N+1 warning, then ``on_scope_end``."""
        figures = self.figures_of(scope)
        limit = self.insight.repeat_limit
        suspects = [(count, sql) for sql, count in figures.counts.items() if count > limit]
        if suspects:
            count, sql = max(suspects)
            suspect = RepeatedStatement(scope, sql, count, limit)
            others = len(suspects) - 1
            logger.warning(
                "%s%s", suspect, f"\n({others} other statement(s) repeated too)" * bool(others)
            )
            for listener in list(repeat_listeners):
                listener(suspect)
        callback = self.insight.on_scope_end
        if callback is not None:
            try:
                callback(scope, figures)
            except Exception:
                logger.exception("Insight(on_scope_end=%r) raised for %r", callback, scope)


def server_timing(scope: Scope, watches: Iterable[EngineWatch] | None) -> bytes | None:
    """The ``Server-Timing`` value of ``scope``: its databases' figures, summed.

    ``watches``: the engines whose figures it shows; ``None``: those of ``scope`` that ask
    for it. ``None`` is returned when there is nothing to show.
    """
    kept = scope._figures or {}
    if watches is None:
        watches = [watch for watch in kept if watch.server_timing]
        if not watches:
            return None
    statements = 0
    spent = waited = 0.0
    for watch in watches:
        figures = kept.get(watch)
        if figures is not None:
            statements += figures.statements
            spent += figures.statement_time
            waited += figures.pool_wait
    return (
        f'db;dur={spent * 1000:.1f};desc="{statements} statement{"" if statements == 1 else "s"}", '
        f'db-pool;dur={waited * 1000:.1f};desc="pool wait"'
    ).encode()
