"""A Todo API on Starlette, with one SQLAlchemy session per request from alchemy-scope.

Run it with ``uvicorn app:app``. ``DATABASE_URL`` chooses the database (any async SQLAlchemy
URL); the default is the SQLite file ``todos.db`` in the working directory.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import String, select
from sqlalchemy.dialects import mysql
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import AsyncAdaptedQueuePool
from starlette.applications import Starlette
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from alchemy_scope import Database, Insight, Replicas, is_database_unavailable
from alchemy_scope_starlette import install

logger = logging.getLogger(__name__)
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


# --- input validation: every bad input is a 4xx with a JSON "detail", never a 500 ----------


def invalid(detail: str) -> HTTPException:
    return HTTPException(status_code=422, detail=detail)


async def json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested too deep
        raise HTTPException(status_code=400, detail="The body must be a JSON document.") from None


def parse_title(value: Any) -> str:
    if not isinstance(value, str):
        raise invalid("title must be a string.")
    title = value.strip()
    if not 1 <= len(title) <= MAX_TITLE:
        raise invalid(f"title must be 1 to {MAX_TITLE} characters long once stripped.")
    if "\x00" in title or not _encodable(title):
        raise invalid("title must be valid text without NUL characters.")
    return title


def _encodable(title: str) -> bool:
    try:
        title.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, as JSON "\ud800" gives
        return False
    return True


def parse_new_todo(value: Any) -> str:
    if not isinstance(value, dict) or "title" not in value:
        raise invalid('Send an object with a "title" string.')
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


def query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    number = decimal(raw, low, high)
    if number is None:
        raise invalid(f"{name} must be an integer from {low} to {high}.")
    return number


class IdConvertor(Convertor[int]):
    """``{todo_id:id}``: a todo id in ASCII decimal digits (leading zeros allowed), else a 404.

    Starlette's ``int`` convertor let ``/todos/5%0A`` reach todo 5 (a route's regex ends in
    ``$``, which also matches before a final newline: hence the lookahead) and was a 500 for an
    id of thousands of digits (``int()`` refuses them). Over 10 digits after the zeros, which no
    id has, don't match.
    """

    regex = r"0*[0-9]{1,10}(?!\n)"

    def convert(self, value: str) -> int:
        return int(value.lstrip("0") or "0")

    def to_string(self, value: int) -> str:
        return str(value)


register_url_convertor("id", IdConvertor())


async def todo_or_404(request: Request) -> Todo:
    todo_id = request.path_params["todo_id"]
    todo = await db.session.get(Todo, todo_id) if 1 <= todo_id <= MAX_INT else None
    if todo is None:
        raise HTTPException(status_code=404, detail=f"Todo {todo_id} does not exist.")
    return todo


async def flush_or_409() -> None:
    try:
        await db.session.flush()
    except IntegrityError:
        raise HTTPException(status_code=409, detail="A todo with this title exists.") from None


# --- routes --------------------------------------------------------------------------------


async def health(_request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def list_todos(request: Request) -> Response:
    limit = query_int(request, "limit", 100, 1, 1000)
    offset = query_int(request, "offset", 0, 0, MAX_INT)
    todos = await db.session.scalars(select(Todo).order_by(Todo.id).limit(limit).offset(offset))
    return JSONResponse([todo.to_dict() for todo in todos])


async def create_todo(request: Request) -> Response:
    todo = Todo(title=parse_new_todo(await json_body(request)), done=False)
    db.session.add(todo)
    await flush_or_409()
    return JSONResponse(todo.to_dict(), status_code=201)


async def create_todos(request: Request) -> Response:
    body = await json_body(request)
    if not isinstance(body, list) or not 1 <= len(body) <= MAX_BULK:
        raise invalid(f"Send a list of 1 to {MAX_BULK} todos.")
    titles = [parse_new_todo(item) for item in body]
    if len(set(titles)) != len(titles):
        raise HTTPException(status_code=409, detail="The batch repeats a title.")
    todos = [Todo(title=title, done=False) for title in titles]
    db.session.add_all(todos)
    await flush_or_409()
    return JSONResponse([todo.to_dict() for todo in todos], status_code=201)


async def get_todo(request: Request) -> Response:
    return JSONResponse((await todo_or_404(request)).to_dict())


async def update_todo(request: Request) -> Response:
    body = await json_body(request)
    if not isinstance(body, dict):
        raise invalid('Send an object with "title" and/or "done".')
    if "done" in body and not isinstance(body["done"], bool):
        raise invalid("done must be true or false.")
    title = parse_title(body["title"]) if "title" in body else None
    todo = await todo_or_404(request)
    if title is not None:
        todo.title = title
    if "done" in body:
        todo.done = body["done"]
    await flush_or_409()
    return JSONResponse(todo.to_dict())


async def delete_todo(request: Request) -> Response:
    await db.session.delete(await todo_or_404(request))
    return Response(status_code=204)


async def export_todos(_request: Request) -> Response:
    async def lines() -> AsyncIterator[bytes]:
        # Read while the body is sent: a server-side cursor, not the whole table in memory.
        todos = await db.session.stream_scalars(
            select(Todo).order_by(Todo.id).execution_options(yield_per=100)
        )
        async for todo in todos:
            yield json.dumps(todo.to_dict()).encode() + b"\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


async def todos_socket(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            message = await websocket.receive_text()
            try:
                try:
                    body = json.loads(message)
                except (ValueError, RecursionError):
                    raise invalid("Send a JSON object with a title.") from None
                todo = Todo(title=parse_new_todo(body), done=False)
                db.session.add(todo)
                await flush_or_409()
                await db.session.commit()  # acknowledged below: commit before the reply
            except HTTPException as error:
                await db.session.rollback()
                await websocket.send_json({"detail": error.detail})
            else:
                await websocket.send_json(todo.to_dict())
    except WebSocketDisconnect:
        pass


async def http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 204:
        return Response(status_code=204)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def server_error(_request: Request, exc: Exception) -> Response:
    """503 when the database is busy or down (retrying helps), else a logged JSON 500."""
    if is_database_unavailable(exc):
        detail = "The database is busy or unavailable; try again shortly."
        return JSONResponse({"detail": detail}, status_code=503)
    logger.error("Unexpected database error", exc_info=exc)
    return JSONResponse({"detail": "Internal Server Error"}, status_code=500)


@asynccontextmanager
async def lifespan(_app: Starlette) -> AsyncIterator[None]:
    async with db.engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    yield


app = Starlette(
    routes=[
        Route("/health", health),
        Route("/todos", list_todos, methods=["GET"]),
        Route("/todos", create_todo, methods=["POST"]),
        Route("/todos/bulk", create_todos, methods=["POST"]),
        Route("/todos/export", export_todos, methods=["GET"]),
        Route("/todos/{todo_id:id}", get_todo, methods=["GET"]),
        Route("/todos/{todo_id:id}", update_todo, methods=["PATCH"]),
        Route("/todos/{todo_id:id}", delete_todo, methods=["DELETE"]),
        WebSocketRoute("/todos/ws", todos_socket),
    ],
    exception_handlers={
        HTTPException: http_error,
        SQLAlchemyError: server_error,
        OSError: server_error,  # asyncpg cannot connect: refused, reset, unreachable
    },
    lifespan=lifespan,
)
install(app, db)
