"""PgBouncer in transaction mode: the engine options asyncpg needs behind it.

Under transaction pooling each transaction of a client connection may run on another server
connection, and PgBouncer before 1.21 (Debian 12 ships 1.18) keeps no prepared statements
for its clients. asyncpg prepares every statement: with its caches on, a statement prepared
in one transaction is missing in the next ("prepared statement ... does not exist"), and two
clients that number their statements alike collide on one server connection ("prepared
statement "__asyncpg_stmt_1__" already exists"). SQLAlchemy documents the cure: both caches
off and a unique name for every statement.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from sqlalchemy.engine import URL, make_url

from ._errors import PgBouncerDriverError


def _unique_statement_name() -> str:
    """A prepared-statement name no other client of the server connection can be using."""
    return f"__asyncpg_{uuid.uuid4()}__"


def pgbouncer_engine_options(
    url: str | URL, engine_options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Engine options for asyncpg behind PgBouncer in transaction mode.

    ``Database(url, pgbouncer=True)`` applies them; call this for an engine you create
    yourself: ``create_async_engine(url, **pgbouncer_engine_options(url))``. They turn off
    asyncpg's statement cache (``statement_cache_size=0``) and SQLAlchemy's
    (``prepared_statement_cache_size=0``), and give every prepared statement a unique name
    (``prepared_statement_name_func``), so no statement outlives its transaction or meets
    another client's of the same name. The engine keeps its pool: it holds client
    connections to PgBouncer, which are cheap; PgBouncer's pool bounds the server ones.

    Args:
        url: The ``postgresql+asyncpg://`` URL of PgBouncer.
        engine_options: Your own options for ``create_async_engine``, returned with these
            added; ``connect_args`` are merged, and a key you give there wins.

    Returns:
        Keyword arguments for ``create_async_engine``.

    Raises:
        PgBouncerDriverError: The URL's driver is not asyncpg.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql" or parsed.get_driver_name() != "asyncpg":
        raise PgBouncerDriverError(parsed.drivername)
    options = dict(engine_options or {})
    options["connect_args"] = {
        "statement_cache_size": 0,
        "prepared_statement_cache_size": 0,
        "prepared_statement_name_func": _unique_statement_name,
        **options.get("connect_args", {}),
    }
    return options
