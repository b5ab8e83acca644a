"""A Todo API on Quart, with one SQLAlchemy session per request from alchemy-scope.

Run it with ``hypercorn app:app``. ``DATABASE_URL`` chooses the database (any async SQLAlchemy
URL); the default is the SQLite file ``todos.db`` in the working directory.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from quart import Quart, Response, request, websocket
from sqlalchemy import String, select
from sqlalchemy.dialects import mysql
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import AsyncAdaptedQueuePool
from werkzeug.exceptions import BadRequest, Conflict, HTTPException, NotFound, UnprocessableEntity
from werkzeug.routing import BaseConverter

from alchemy_scope import Database, Insight, Replicas, is_database_unavailable
from alchemy_scope_quart import AlchemyScope

DATABASE_URL = os.environ.get("DATABASE_URL", "sqlite+aiosqlite:///todos.db")
# autocommit: a request that answers below 400 is committed before its response is sent;
# anything else (a 409, a 422, an exception) is rolled back.
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

app = Quart(__name__)
alchemy = AlchemyScope(app, db)  # a scope per request and websocket; disposes db at shutdown

MAX_TITLE = 200
MAX_BULK = 1000
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

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "done": self.done}


@app.before_serving
async def create_tables() -> None:
    async with db.engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)


@app.errorhandler(HTTPException)
async def http_error(error: HTTPException) -> tuple[dict[str, Any], int]:
    """Every error (aborts, unknown routes, Quart's own 400s and 500s) as a JSON detail."""
    return {"detail": error.description or error.name}, error.code or 500


@app.errorhandler(Exception)
async def server_error(error: Exception) -> tuple[dict[str, Any], int]:
    """503 when the database is busy or down (retrying helps), else a plain JSON 500."""
    if isinstance(error, HTTPException):  # Quart's own errors keep their status
        return await http_error(error)
    if is_database_unavailable(error):
        return {"detail": "The database is busy or unavailable; try again shortly."}, 503
    return {"detail": "Internal Server Error"}, 500


# --- input validation: every bad input is a 4xx with a JSON "detail", never a 500 ----------


async def json_body() -> Any:
    """The request body as JSON, whatever its content type (curl -d sends a form type)."""
    try:
        return await request.get_json(force=True)
    # Quart answers malformed JSON with a BadRequest; a body that is not UTF-8 or is nested
    # too deep raises out of get_json instead.
    except (BadRequest, ValueError, RecursionError):
        raise BadRequest("The body must be a JSON document.") from None


def parse_title(value: Any) -> str:
    if not isinstance(value, str):
        raise UnprocessableEntity("title must be a string.")
    title = value.strip()
    if not 1 <= len(title) <= MAX_TITLE:
        raise UnprocessableEntity(f"title must be 1 to {MAX_TITLE} characters long once stripped.")
    if "\x00" in title or not _encodable(title):
        raise UnprocessableEntity("title must be valid text without NUL characters.")
    return title


def _encodable(title: str) -> bool:
    try:
        title.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, as JSON "\ud800" gives
        return False
    return True


def parse_new_todo(value: Any) -> str:
    if not isinstance(value, dict) or "title" not in value:
        raise UnprocessableEntity('Send an object with a "title" string.')
    return parse_title(value["title"])


def decimal(raw: str, low: int, high: int) -> int | None:
    """``raw`` as an int if it is ASCII decimal digits only, from ``low`` to ``high``; else None."""
    if not (raw.isascii() and raw.isdigit()):  # isdigit() alone takes "٣" and other scripts' digits
        return None
    digits = raw.lstrip("0") or "0"  # leading zeros are fine, however many
    if len(digits) > len(str(high)):  # and no int() of thousands of digits (a ValueError)
        return None
    number = int(digits)
    return number if low <= number <= high else None


def query_int(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    number = decimal(raw, low, high)
    if number is None:
        raise UnprocessableEntity(f"{name} must be an integer from {low} to {high}.")
    return number


class IdConverter(BaseConverter):
    r"""``<id:todo_id>``: a todo id in ASCII decimal digits (leading zeros allowed), else a 404.

    Werkzeug's ``int`` converter matches ``\d+``, which takes any Unicode digit: it let
    ``/todos/٣`` (an Arabic-Indic 3) reach todo 3, and fullwidth digits likewise. The regex also
    refuses over 10 digits after the zeros, which no id has, so int() never sees thousands of
    them (a ValueError); to_python raising ValidationError instead makes PATCH and DELETE a 405.
    """

    regex = "0*[0-9]{1,10}"

    def to_python(self, value: str) -> int:
        return int(value.lstrip("0") or "0")

    def to_url(self, value: int) -> str:
        return str(value)


app.url_map.converters["id"] = IdConverter


async def todo_or_404(todo_id: int) -> Todo:
    todo = await db.session.get(Todo, todo_id) if 1 <= todo_id <= MAX_INT else None
    if todo is None:
        raise NotFound(f"Todo {todo_id} does not exist.")
    return todo


async def flush_or_409() -> None:
    try:
        await db.session.flush()
    except IntegrityError:
        raise Conflict("A todo with this title exists.") from None


# --- routes --------------------------------------------------------------------------------


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/todos")
async def list_todos() -> list[dict[str, Any]]:
    limit = query_int("limit", 100, 1, 1000)
    offset = query_int("offset", 0, 0, MAX_INT)
    todos = await db.session.scalars(select(Todo).order_by(Todo.id).limit(limit).offset(offset))
    return [todo.to_dict() for todo in todos]


@app.post("/todos")
async def create_todo() -> tuple[dict[str, Any], int]:
    todo = Todo(title=parse_new_todo(await json_body()), done=False)
    db.session.add(todo)
    await flush_or_409()
    return todo.to_dict(), 201


@app.post("/todos/bulk")
async def create_todos() -> tuple[list[dict[str, Any]], int]:
    body = await json_body()
    if not isinstance(body, list) or not 1 <= len(body) <= MAX_BULK:
        raise UnprocessableEntity(f"Send a list of 1 to {MAX_BULK} todos.")
    titles = [parse_new_todo(item) for item in body]
    if len(set(titles)) != len(titles):
        raise Conflict("The batch repeats a title.")
    todos = [Todo(title=title, done=False) for title in titles]
    db.session.add_all(todos)
    await flush_or_409()
    return [todo.to_dict() for todo in todos], 201


@app.get("/todos/export")
async def export_todos() -> Response:
    async def lines() -> AsyncIterator[bytes]:
        # Read while the body is sent: a server-side cursor, not the whole table in memory.
        todos = await db.session.stream_scalars(
            select(Todo).order_by(Todo.id).execution_options(yield_per=100)
        )
        async for todo in todos:
            yield json.dumps(todo.to_dict()).encode() + b"\n"

    return Response(lines(), mimetype="application/x-ndjson")


@app.get("/todos/<id:todo_id>")
async def get_todo(todo_id: int) -> dict[str, Any]:
    return (await todo_or_404(todo_id)).to_dict()


@app.patch("/todos/<id:todo_id>")
async def update_todo(todo_id: int) -> dict[str, Any]:
    body = await json_body()
    if not isinstance(body, dict):
        raise UnprocessableEntity('Send an object with "title" and/or "done".')
    if "done" in body and not isinstance(body["done"], bool):
        raise UnprocessableEntity("done must be true or false.")
    title = parse_title(body["title"]) if "title" in body else None
    todo = await todo_or_404(todo_id)
    if title is not None:
        todo.title = title
    if "done" in body:
        todo.done = body["done"]
    await flush_or_409()
    return todo.to_dict()


@app.delete("/todos/<id:todo_id>")
async def delete_todo(todo_id: int) -> tuple[str, int]:
    await db.session.delete(await todo_or_404(todo_id))
    return "", 204


@app.websocket("/todos/ws")
async def todos_socket() -> None:
    # One scope for the whole connection; Quart ends this loop when the client goes away.
    while True:
        try:
            try:
                body = await websocket.receive_json()
            except (ValueError, RecursionError):
                raise BadRequest("Send a JSON object with a title.") from None
            todo = Todo(title=parse_new_todo(body), done=False)
            db.session.add(todo)
            await flush_or_409()
            await db.session.commit()  # acknowledged below: commit before the reply
        except HTTPException as error:
            await db.session.rollback()
            await websocket.send_json({"detail": error.description})
        else:
            await websocket.send_json(todo.to_dict())
