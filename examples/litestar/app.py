"""A Todo API on Litestar, with one SQLAlchemy session per request from alchemy-scope.

Run it with ``uvicorn app:app``. ``DATABASE_URL`` chooses the database (any async SQLAlchemy
URL); the default is the SQLite file ``todos.db`` in the working directory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
from litestar import Litestar, Request, Response, delete, get, patch, post, websocket_listener
from litestar.exceptions import (
    ClientException,
    HTTPException,
    NotFoundException,
    ValidationException,
)
from litestar.openapi.spec import OpenAPIType
from litestar.params import Body
from litestar.response import Stream
from litestar.status_codes import HTTP_409_CONFLICT
from sqlalchemy import String, select
from sqlalchemy.dialects import mysql
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import AsyncAdaptedQueuePool

from alchemy_scope import Database, Insight, Replicas, is_database_unavailable
from alchemy_scope_litestar import AlchemyScopePlugin

try:  # Litestar 2.25 wants each parameter's source declared
    from litestar.params import PathParameter, QueryParameter
except ImportError:  # older ones (this example runs on 2.19 and later) infer it
    from litestar.params import Parameter as PathParameter
    from litestar.params import Parameter as QueryParameter

DATABASE_URL = os.environ.get("DATABASE_URL", "sqlite+aiosqlite:///todos.db")
# autocommit: a request that answers below 400 is committed before its response is sent;
# anything else (a 409, a validation error, an exception) is rolled back.
# Optional pool settings: DATABASE_POOL_SIZE, DATABASE_MAX_OVERFLOW, DATABASE_POOL_TIMEOUT.
POOL = {
    option: int(os.environ[f"DATABASE_{option.upper()}"])
    for option in ("pool_size", "max_overflow", "pool_timeout")
    if f"DATABASE_{option.upper()}" in os.environ
}
if POOL and DATABASE_URL.startswith("sqlite"):  # SQLAlchemy < 2.0.38 gives SQLite no pool
    POOL["poolclass"] = AsyncAdaptedQueuePool
# DATABASE_PGBOUNCER=1: DATABASE_URL is a PgBouncer in transaction mode (asyncpg set up for it).
PGBOUNCER = os.environ.get("DATABASE_PGBOUNCER") == "1"
# DATABASE_INSIGHT=1: each request's database figures logged as it ends, N+1 warnings, and a
# Server-Timing header on every response (the docs' "Database insight" page).
INSIGHT = None
if os.environ.get("DATABASE_INSIGHT") == "1":
    insight_log = logging.getLogger("alchemy_scope.insight")
    insight_log.setLevel(logging.INFO)
    if not insight_log.handlers:
        insight_log.addHandler(logging.StreamHandler())
    INSIGHT = Insight(
        on_scope_end=lambda scope, figures: insight_log.info("%r: %r", scope, figures),
        server_timing=True,
    )
# DATABASE_REPLICA_URLS: PostgreSQL streaming replicas (space-separated URLs) that serve the
# reads; the db_bookmark cookie keeps each client's own writes visible to it (docs: Scaling out).
REPLICA_URLS = os.environ.get("DATABASE_REPLICA_URLS", "").split()
REPLICAS = Replicas(REPLICA_URLS, bookmark_cookie="db_bookmark") if REPLICA_URLS else None
db = Database(
    DATABASE_URL,
    commit="autocommit",
    engine_options={"pool_pre_ping": True, **POOL},
    pgbouncer=PGBOUNCER,
    insight=INSIGHT,
    replicas=REPLICAS,
)

MAX_TITLE = 200
MAX_BULK = 1000
MAX_LIMIT = 1000
MAX_INT = 2**31 - 1  # the largest id or offset the INTEGER column and every backend accept


class Base(DeclarativeBase):
    pass


class Todo(Base):
    __tablename__ = "todos"

    id: Mapped[int] = mapped_column(primary_key=True)
    # Case-sensitive uniqueness on MariaDB too (its default collation ignores case).
    title: Mapped[str] = mapped_column(
        String(MAX_TITLE).with_variant(
            mysql.VARCHAR(MAX_TITLE, collation="utf8mb4_bin"), "mysql", "mariadb"
        ),
        unique=True,
    )
    done: Mapped[bool] = mapped_column(default=False)


# --- the API's shapes: msgspec validates them, every bad input is a 4xx with a "detail" ----


def clean_title(value: str) -> str:
    """The stripped title; a ValueError (which msgspec reports as invalid input) if it is bad."""
    title = value.strip()
    if not 1 <= len(title) <= MAX_TITLE:
        raise ValueError(f"title must be 1 to {MAX_TITLE} characters long once stripped")
    if "\x00" in title:
        raise ValueError("title must not contain NUL characters")
    return title


class TodoIn(msgspec.Struct):
    title: str

    def __post_init__(self) -> None:
        self.title = clean_title(self.title)


class TodoPatch(msgspec.Struct):
    title: str | msgspec.UnsetType = msgspec.UNSET
    done: bool | msgspec.UnsetType = msgspec.UNSET

    def __post_init__(self) -> None:
        if self.title is not msgspec.UNSET:
            self.title = clean_title(self.title)


class TodoOut(msgspec.Struct):
    id: int
    title: str
    done: bool

    @classmethod
    def of(cls, todo: Todo) -> TodoOut:
        return cls(id=todo.id, title=todo.title, done=todo.done)


class TodoRequest(Request[Any, Any, Any]):
    """Litestar's request, whose JSON body nested too deeply is a 400 like other bad JSON."""

    async def json(self) -> Any:
        try:
            return await super().json()
        except RecursionError:  # msgspec raises it for deep nesting; Litestar lets it through
            raise ClientException("The body is nested too deeply.") from None


def decimal(raw: str, low: int, high: int) -> int | None:
    """``raw`` as an int if it is ASCII decimal digits only, from ``low`` to ``high``; else None.

    The API's integers are written in plain decimal digits (leading zeros are fine), as in the
    other examples. Litestar's own conversions are laxer: msgspec reads the query strings "1e3"
    and "1.0" as integers, and ``{id:int}`` path segments go through ``int()``, which takes
    "+5", " 5", "1_000" and non-ASCII digits (Arabic-Indic, fullwidth).
    """
    if not (raw.isascii() and raw.isdigit()):
        return None
    digits = raw.lstrip("0") or "0"
    if len(digits) > len(str(high)):  # and no int() of thousands of digits (a ValueError)
        return None
    number = int(digits)
    return number if low <= number <= high else None


def query_int(name: str, raw: str, low: int, high: int) -> int:
    """The query parameter ``name`` read by :func:`decimal`; a 400 if it is not one."""
    number = decimal(raw, low, high)
    if number is None:
        raise ValidationException(f"{name} must be an integer from {low} to {high}.")
    return number


def integer(low: int, high: int, default: int | None = None) -> dict[str, Any]:
    """The OpenAPI ``schema_extra`` of a str parameter read by :func:`decimal`: an integer."""
    schema: dict[str, Any] = {"type": OpenAPIType.INTEGER, "minimum": low, "maximum": high}
    return schema if default is None else {**schema, "default": default}


TodoId = Annotated[str, PathParameter(schema_extra=integer(1, MAX_INT))]


async def todo_or_404(todo_id: str) -> Todo:
    number = decimal(todo_id, 1, MAX_INT)
    todo = await db.session.get(Todo, number) if number is not None else None
    if todo is None:
        raise NotFoundException(f"Todo {todo_id} does not exist.")
    return todo


async def flush_or_409() -> None:
    try:
        await db.session.flush()
    except IntegrityError:
        raise HTTPException(
            "A todo with this title exists.", status_code=HTTP_409_CONFLICT
        ) from None


def validation_error(_request: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
    """Litestar's 400 body, its detail completed with what was wrong, in one sentence."""
    problems = [describe(problem) for problem in exc.extra or [] if isinstance(problem, dict)]
    detail = f"{exc.detail}: {'; '.join(problems)}" if problems else exc.detail
    body = {"status_code": exc.status_code, "detail": detail, "extra": exc.extra}
    return Response(body, status_code=exc.status_code)


def server_error(_request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """Unhandled errors: 503 when the database is busy or down (retrying helps), else a 500."""
    if is_database_unavailable(exc):
        return Response(
            {
                "status_code": 503,
                "detail": "The database is busy or unavailable; try again shortly.",
            },
            status_code=503,
        )
    return Response({"status_code": 500, "detail": "Internal Server Error"}, status_code=500)


def describe(problem: dict[str, Any]) -> str:
    key, message = problem.get("key"), str(problem.get("message"))
    if message == repr(key):  # how Litestar reports a missing value
        return "the body is empty" if key == "data" else f"{key} is missing"
    return message if key in (None, "data") else f"{key}: {message}"


# --- routes --------------------------------------------------------------------------------


@get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@get("/todos")
async def list_todos(
    # Strings read by query_int: as int parameters, Litestar would take "1e3" for 1000.
    limit: Annotated[str, QueryParameter(schema_extra=integer(1, MAX_LIMIT, 100))] = "100",
    offset: Annotated[str, QueryParameter(schema_extra=integer(0, MAX_INT, 0))] = "0",
) -> list[TodoOut]:
    page = (
        select(Todo)
        .order_by(Todo.id)
        .limit(query_int("limit", limit, 1, MAX_LIMIT))
        .offset(query_int("offset", offset, 0, MAX_INT))
    )
    return [TodoOut.of(todo) for todo in await db.session.scalars(page)]


@post("/todos")
async def create_todo(data: Annotated[TodoIn, Body()]) -> TodoOut:
    todo = Todo(title=data.title, done=False)
    db.session.add(todo)
    await flush_or_409()
    return TodoOut.of(todo)


@post("/todos/bulk")
async def create_todos(
    data: Annotated[list[TodoIn], Body(min_items=1, max_items=MAX_BULK)],
) -> list[TodoOut]:
    titles = [todo_in.title for todo_in in data]
    if len(set(titles)) != len(titles):
        raise HTTPException("The batch repeats a title.", status_code=HTTP_409_CONFLICT)
    todos = [Todo(title=title, done=False) for title in titles]
    db.session.add_all(todos)
    await flush_or_409()
    return [TodoOut.of(todo) for todo in todos]


@get("/todos/export")
async def export_todos() -> Stream:
    async def lines() -> AsyncIterator[bytes]:
        # Read while the body is sent: a server-side cursor, not the whole table in memory.
        todos = await db.session.stream_scalars(
            select(Todo).order_by(Todo.id).execution_options(yield_per=100)
        )
        async for todo in todos:
            yield msgspec.json.encode(TodoOut.of(todo)) + b"\n"

    return Stream(lines(), media_type="application/x-ndjson")


@get("/todos/{todo_id:str}")
async def get_todo(todo_id: TodoId) -> TodoOut:
    return TodoOut.of(await todo_or_404(todo_id))


@patch("/todos/{todo_id:str}")
async def update_todo(todo_id: TodoId, data: Annotated[TodoPatch, Body()]) -> TodoOut:
    todo = await todo_or_404(todo_id)
    if data.title is not msgspec.UNSET:
        todo.title = data.title
    if data.done is not msgspec.UNSET:
        todo.done = data.done
    await flush_or_409()
    return TodoOut.of(todo)


@delete("/todos/{todo_id:str}")
async def delete_todo(todo_id: TodoId) -> None:
    await db.session.delete(await todo_or_404(todo_id))


@websocket_listener("/todos/ws")
async def todos_socket(data: str) -> TodoOut | dict[str, str]:
    # One scope for the whole connection: every message shares its session.
    try:
        title = msgspec.json.decode(data, type=TodoIn).title
    except msgspec.ValidationError as error:
        return {"detail": str(error)}
    except (msgspec.DecodeError, RecursionError):  # not JSON, or nested too deep
        return {"detail": "Send a JSON object with a title."}
    todo = Todo(title=title, done=False)
    db.session.add(todo)
    try:
        await flush_or_409()
    except HTTPException as error:
        await db.session.rollback()
        return {"detail": error.detail}
    await db.session.commit()  # acknowledged below: commit before the reply
    return TodoOut.of(todo)


async def create_tables() -> None:
    async with db.engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)


app = Litestar(
    route_handlers=[
        health,
        list_todos,
        create_todo,
        create_todos,
        export_todos,
        get_todo,
        update_todo,
        delete_todo,
        todos_socket,
    ],
    on_startup=[create_tables],
    exception_handlers={ValidationException: validation_error, 500: server_error},
    plugins=[AlchemyScopePlugin(db)],
    request_class=TodoRequest,
)
