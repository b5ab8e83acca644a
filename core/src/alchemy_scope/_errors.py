"""The exceptions alchemy-scope raises when it is used the wrong way."""

from __future__ import annotations

from typing import Any, ClassVar

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url

DOCS_URL = "https://alchemy-scope.github.io/alchemy-scope/"
"""The documentation site; every exception's message ends with a link to its section."""


def _see(exception: str) -> str:
    """The sentence that ends each message: where the documentation explains ``exception``."""
    return f" See {DOCS_URL}errors/#{exception.lower()}"


class AlchemyScopeError(Exception):
    """Base class of every exception alchemy-scope raises."""

    @classmethod
    def documentation(cls) -> str:
        """The link to this exception's section of the documentation's errors page.

        Integrations end the messages of their own exceptions with it, as the core does.
        """
        return f"{DOCS_URL}errors/#{cls.__name__.lower()}"


class NoScopeError(AlchemyScopeError, LookupError):
    """``db.session`` was used where no scope is open."""

    # What each imported framework integration adds: how scopes are opened there.
    integration_hints: ClassVar[dict[str, str]] = {}

    def __init__(self) -> None:
        hints = "".join(f" {hint}" for hint in self.integration_hints.values())
        super().__init__(
            "db.session was used outside of a scope, so there is no session to give. "
            "In a web app, install the alchemy-scope integration for your framework so "
            "that every request opens a scope (or add `alchemy_scope.ScopeMiddleware` to "
            "any ASGI app); in scripts, jobs and tests, wrap the work in "
            f"`async with db.scope(): ...`.{hints}" + _see("NoScopeError")
        )

    @classmethod
    def add_integration_hint(cls, integration: str, hint: str) -> None:
        """Add to every later message how ``integration`` opens scopes (integrations call it).

        Args:
            integration: The integration's distribution name; adding it again replaces its
                hint.
            hint: One or two sentences, ending with a full stop.
        """
        cls.integration_hints[integration] = hint


class ScopeClosedError(AlchemyScopeError):
    """A session was used after the scope that owned it had ended."""

    def __init__(self) -> None:
        super().__init__(
            "The session was used after its scope had ended: this code runs in a task that "
            "outlived the request (or the `async with db.scope()` block) that started it, "
            "and that scope's session is already closed. Give the late work a scope of its "
            "own: `async with db.scope(): ...` inside the task." + _see("ScopeClosedError")
        )


class ConcurrentSessionUseError(AlchemyScopeError):
    """Two tasks used one scope's session at the same time."""

    def __init__(self, attempted: str, running: str, *, synchronous: bool = False) -> None:
        if synchronous:
            advice = (
                f"{attempted}() is synchronous, so it cannot wait for its turn, even with "
                "serialize=True: call it before starting the other task's operation or after "
                "awaiting it, or give each concurrent branch its own session by wrapping it "
                "in `async with db.scope(): ...`."
            )
        else:
            advice = (
                "A session runs one operation at a time: await the calls one after another, "
                "pass serialize=True to the integration (or db.scope()) to make tasks take "
                "turns, or give each concurrent branch its own session by wrapping it in "
                "`async with db.scope(): ...`."
            )
        super().__init__(
            f"AsyncSession.{attempted}() was called while AsyncSession.{running}() was still "
            f"running on the same session, from another task of the same scope. {advice}"
            + _see("ConcurrentSessionUseError")
        )


class SharedConnectionBusyError(AlchemyScopeError):
    """A session waited too long for its turn on a connection its Database shares (tests)."""

    def __init__(self, timeout: float, holder: object) -> None:
        super().__init__(
            f"A session waited {timeout:g} s for its turn on the connection its Database is "
            f"bound to (db.bound_to(), as in the alchemy-scope pytest fixtures), which a "
            f"session of {holder!r} still holds in an open transaction. Sessions sharing one "
            "connection take turns by transaction: commit or roll back that session (often "
            "`await db.session.commit()` in the test body) before another scope needs the "
            "database, and send requests through an in-process client (httpx.ASGITransport) "
            "started inside the test, so their scopes nest inside the test's."
            + _see("SharedConnectionBusyError")
        )


class AlreadyInstalledError(AlchemyScopeError, RuntimeError):
    """An integration was installed twice in one app, which would nest scopes."""

    def __init__(self, how_to_install_once: str) -> None:
        super().__init__(
            "alchemy-scope is already installed in this app; a second installation would nest "
            f"scopes and dispose engines twice. Install it once, with every database: "
            f"{how_to_install_once}." + _see("AlreadyInstalledError")
        )


class UnwatchedDatabaseError(AlchemyScopeError):
    """An autocommit database was used in a request whose middleware was not told of it."""

    def __init__(self, database: str) -> None:
        super().__init__(
            f"{database} commits by policy, but this request's ScopeMiddleware was given its "
            "app's databases without it, so it does not watch the response and could not "
            "commit before the client hears of success. Pass every database the app uses to "
            "the integration (for example `install(app, db, other_db)`), or to "
            "`ScopeMiddleware(app, databases=[db, other_db])`." + _see("UnwatchedDatabaseError")
        )


class InsightOffError(AlchemyScopeError):
    """``db.figures()`` was called on a ``Database`` created without ``insight``."""

    def __init__(self, database: str) -> None:
        super().__init__(
            f"{database} keeps no figures: its insight is off, so nothing is counted. Create "
            "it with `Database(url, insight=True)` (or `insight=Insight(...)`) to read "
            "`db.figures()` in its scopes." + _see("InsightOffError")
        )


class UnsupportedReplicasError(AlchemyScopeError, ValueError):
    """Replicas were given to a ``Database`` that is not PostgreSQL: routing is PostgreSQL-only."""

    def __init__(self, url: str) -> None:
        super().__init__(
            f"Read replicas are routed for PostgreSQL only (for now), and {url} is not "
            "PostgreSQL: the health checks and bookmarks read PostgreSQL's WAL positions. Give "
            "replicas= only to a postgresql+asyncpg:// (or +psycopg) primary with PostgreSQL "
            "streaming replicas; for another backend, leave replicas out and make a separate "
            "Database(replica_url) for the reads you choose to send there."
            + _see("UnsupportedReplicasError")
        )


class MissingAsyncDriverError(AlchemyScopeError, ValueError):
    """A database URL names no async driver, or one that is not installed."""

    def __init__(self, drivername: str, problem: str) -> None:
        backend = drivername.partition("+")[0]
        suggestion = _ASYNC_DRIVERS.get(backend, f"an async driver for {backend}")
        super().__init__(
            f"The database URL {drivername}://... {problem}. alchemy-scope uses SQLAlchemy's "
            f"asyncio extension, which needs an async driver named in the URL: {suggestion}."
            + _see("MissingAsyncDriverError")
        )


class PgBouncerDriverError(AlchemyScopeError, ValueError):
    """``pgbouncer=True`` was given a URL whose driver is not asyncpg."""

    def __init__(self, drivername: str) -> None:
        super().__init__(
            f"pgbouncer=True configures the asyncpg driver for PgBouncer's transaction pooling "
            f"(statement caches off, unique prepared-statement names), but the URL "
            f"{drivername}://... uses another driver. Point a postgresql+asyncpg://... URL at "
            "PgBouncer (pip install asyncpg), or leave pgbouncer out for a direct connection."
            + _see("PgBouncerDriverError")
        )


# The async drivers to suggest per backend, with what installs them.
_ASYNC_DRIVERS = {
    "postgresql": "postgresql+asyncpg://... (pip install asyncpg) or postgresql+psycopg://... "
    "(pip install 'psycopg[binary]')",
    "mysql": "mysql+asyncmy://... (pip install asyncmy) or mysql+aiomysql://... "
    "(pip install aiomysql)",
    "mariadb": "mariadb+asyncmy://... (pip install asyncmy) or mariadb+aiomysql://... "
    "(pip install aiomysql)",
    "sqlite": "sqlite+aiosqlite:///... (pip install aiosqlite)",
}


def _check_async_driver(url: str | URL) -> None:
    """Raise ``MissingAsyncDriverError`` unless ``url`` names an async driver that imports.

    ``create_async_engine("postgresql://...")`` fails with ``No module named 'psycopg'`` (or
    "the loaded 'pysqlite' is not async") and no hint of what to write instead. An unknown
    dialect is left to SQLAlchemy's own error.

    Args:
        url: The URL given to ``Database``.

    Raises:
        MissingAsyncDriverError: The URL's driver is synchronous or not installed.
    """
    url = make_url(url)
    try:
        dialect: Any = url.get_dialect(_is_async=True)
    except sa_exc.NoSuchModuleError:
        return
    if not getattr(dialect, "is_async", False):
        raise MissingAsyncDriverError(
            url.drivername, f"uses {dialect.driver}, a synchronous driver"
        )
    try:
        dialect.import_dbapi()
    except ImportError as error:
        module = error.name or dialect.driver
        raise MissingAsyncDriverError(
            url.drivername, f"uses the {dialect.driver} driver, but {module!r} is not installed"
        ) from error


# SQLSTATE classes that mean "not now" rather than "wrong": connection exception,
# insufficient resources (too many connections), operator intervention (shutting down,
# starting up).
_UNAVAILABLE_SQLSTATES = ("08", "53", "57P")
# SQLSTATEs too general to decide by (MySQL's HY000 covers "server gone away" and bad SQL).
_GENERAL_SQLSTATES = ("HY000", "00000", "")
# MySQL/MariaDB error codes that mean "not now": too many connections (1040), server shutting
# down (1053), lock wait timeout (1205), cannot connect (2002, 2003), unknown host (2005),
# server gone away (2006), lost connection (2013, 2055). Any other code is the request's,
# the configuration's (access denied 1045, unknown database 1049) or the app's fault.
_MYSQL_UNAVAILABLE = frozenset((1040, 1053, 1205, 2002, 2003, 2005, 2006, 2013, 2055))
# The MySQL drivers whose exceptions carry the server's error code as their first argument.
_MYSQL_DRIVERS = ("asyncmy", "aiomysql", "pymysql", "MySQLdb")
# SQLite result codes that mean "busy": the database file is locked by another connection.
_SQLITE_UNAVAILABLE = ("SQLITE_BUSY", "SQLITE_LOCKED")


def _driver_says_unavailable(error: BaseException) -> bool | None:
    """What a driver's own exception says: unavailable, not, or ``None`` (nothing known)."""
    if isinstance(error, OSError):  # refused, reset, unreachable, timed out
        return True
    sqlstate = getattr(error, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate not in _GENERAL_SQLSTATES:
        return sqlstate.startswith(_UNAVAILABLE_SQLSTATES)
    sqlite_name = getattr(error, "sqlite_errorname", None)  # sqlite3, Python 3.11+
    if isinstance(sqlite_name, str):
        return sqlite_name.startswith(_SQLITE_UNAVAILABLE)
    if type(error).__module__.startswith("sqlite3"):  # Python 3.10: only the message
        return "locked" in str(error)
    args = getattr(error, "args", ())
    if args and type(args[0]) is int and type(error).__module__.startswith(_MYSQL_DRIVERS):
        return args[0] in _MYSQL_UNAVAILABLE
    return None


def is_database_unavailable(error: BaseException) -> bool:
    """Whether ``error`` means the database cannot serve the request right now.

    True when no pooled connection came free within the pool's timeout, when the server
    refuses, drops or resets the connection, is starting up or shutting down, or has no
    connection slot left: cases where an app should answer 503 (try again later). False for
    a constraint violation, a bad query, and a configuration error that retrying cannot
    fix: a wrong user or password ("access denied"), a database that does not exist. Those
    deserve a 500 and a log line. Exception handlers use it to tell the two apart.

    Args:
        error: An exception raised while using the database.

    Returns:
        Whether retrying later could succeed without any change to the request.
    """
    if isinstance(error, sa_exc.TimeoutError):  # no pooled connection free in time
        return True
    if isinstance(error, sa_exc.DBAPIError):
        if error.connection_invalidated:
            return True
        says = None if error.orig is None else _driver_says_unavailable(error.orig)
        if says is not None:
            return says
        # A driver that says nothing more: its operational and interface errors are the
        # connection's (this is how SQLAlchemy classifies them).
        return isinstance(error, (sa_exc.OperationalError, sa_exc.InterfaceError))
    return bool(_driver_says_unavailable(error))  # drivers' own errors raised while connecting
