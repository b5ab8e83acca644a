"""A Todo API on FastAPI, with one SQLAlchemy session per request from alchemy-scope.

Run it with ``uvicorn app:app``. ``DATABASE_URL`` chooses the database (any async SQLAlchemy
URL); the default is the SQLite file ``todos.db`` in the working directory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Body, FastAPI, HTTPException, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    StrictBool,
    StrictStr,
    ValidationError,
)
from sqlalchemy import String, select
from sqlalchemy.dialects import mysql
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import AsyncAdaptedQueuePool

from alchemy_scope import Database, Insight, Replicas, is_database_unavailable
from alchemy_scope_fastapi import SessionDep, install

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


# --- the API's shapes: every bad input is a 4xx with a JSON "detail", never a 500 ----------


def clean_title(value: str) -> str:
    title = value.strip()
    if not 1 <= len(title) <= MAX_TITLE:
        raise ValueError(f"title must be 1 to {MAX_TITLE} characters long once stripped")
    if "\x00" in title:
        raise ValueError("title must not contain NUL characters")
    try:
        title.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, as JSON "\ud800" gives
        raise ValueError("title must be valid text") from None
    return title


Title = Annotated[StrictStr, AfterValidator(clean_title)]


class TodoIn(BaseModel):
    title: Title


class TodoPatch(BaseModel):
    model_config = ConfigDict(extra="ignore")

    title: Title | None = None
    done: StrictBool | None = None


class TodoOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    title: str
    done: bool


def decimal_digits(value: str | int) -> str | int:
    r"""The query or path string, if it is ASCII decimal digits only; pydantic makes it an int.

    Pydantic's lax int parsing, which FastAPI uses for query and path parameters, also reads
    "1.0", "+5", " 5", "5\n", "1_000" and "-0" as integers; the other examples refuse them.
    Older FastAPI (0.115) also validates a parameter's default, an int: that one passes.
    """
    if isinstance(value, int):
        return value
    if not (value.isascii() and value.isdigit()):
        raise ValueError("must be an integer in decimal digits")
    return value


# An int parameter written in decimal digits (a BeforeValidator leaves the OpenAPI schema as is).
Digits = BeforeValidator(decimal_digits)
TodoId = Annotated[int, Digits]


async def todo_or_404(todo_id: int) -> Todo:
    todo = await db.session.get(Todo, todo_id) if 1 <= todo_id <= MAX_INT else None
    if todo is None:
        raise HTTPException(status_code=404, detail=f"Todo {todo_id} does not exist.")
    return todo


async def flush_or_409() -> None:
    try:
        await db.session.flush()
    except IntegrityError:
        raise HTTPException(status_code=409, detail="A todo with this title exists.") from None


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    async with db.engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    yield


app = FastAPI(title="Todos", lifespan=lifespan)
install(app, db)


@app.exception_handler(RequestValidationError)
async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """Answer 422 with one readable sentence, like every other error of this API."""
    problems = [
        f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}" for error in exc.errors()
    ]
    return JSONResponse({"detail": "; ".join(problems) or "Invalid request."}, status_code=422)


@app.exception_handler(SQLAlchemyError)
@app.exception_handler(OSError)  # asyncpg cannot connect: refused, reset, unreachable
async def server_error(_request: Request, exc: Exception) -> JSONResponse:
    """503 when the database is busy or down (retrying helps), else a logged JSON 500."""
    if is_database_unavailable(exc):
        detail = "The database is busy or unavailable; try again shortly."
        return JSONResponse({"detail": detail}, status_code=503)
    logger.error("Unexpected database error", exc_info=exc)
    return JSONResponse({"detail": "Internal Server Error"}, status_code=500)


# --- routes --------------------------------------------------------------------------------


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/todos")
async def list_todos(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000), Digits] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_INT), Digits] = 0,
) -> list[TodoOut]:
    todos = await session.scalars(select(Todo).order_by(Todo.id).limit(limit).offset(offset))
    return [TodoOut.model_validate(todo) for todo in todos]


@app.post("/todos", status_code=201)
async def create_todo(todo_in: TodoIn, session: SessionDep) -> TodoOut:
    todo = Todo(title=todo_in.title, done=False)
    session.add(todo)
    await flush_or_409()
    return TodoOut.model_validate(todo)


@app.post("/todos/bulk", status_code=201)
async def create_todos(
    todos_in: Annotated[list[TodoIn], Body(min_length=1, max_length=1000)],
    session: SessionDep,
) -> list[TodoOut]:
    titles = [todo_in.title for todo_in in todos_in]
    if len(set(titles)) != len(titles):
        raise HTTPException(status_code=409, detail="The batch repeats a title.")
    todos = [Todo(title=title, done=False) for title in titles]
    session.add_all(todos)
    await flush_or_409()
    return [TodoOut.model_validate(todo) for todo in todos]


@app.get("/todos/export")
async def export_todos() -> StreamingResponse:
    async def lines() -> AsyncIterator[bytes]:
        # Read while the body is sent: a server-side cursor, not the whole table in memory.
        todos = await db.session.stream_scalars(
            select(Todo).order_by(Todo.id).execution_options(yield_per=100)
        )
        async for todo in todos:
            yield TodoOut.model_validate(todo).model_dump_json().encode() + b"\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@app.get("/todos/{todo_id}")
async def get_todo(todo_id: TodoId) -> TodoOut:
    return TodoOut.model_validate(await todo_or_404(todo_id))


@app.patch("/todos/{todo_id}")
async def update_todo(todo_id: TodoId, patch: TodoPatch) -> TodoOut:
    if "done" in patch.model_fields_set and patch.done is None:
        raise HTTPException(status_code=422, detail="done must be true or false.")
    if "title" in patch.model_fields_set and patch.title is None:
        raise HTTPException(status_code=422, detail="title must be a string.")
    todo = await todo_or_404(todo_id)
    if patch.title is not None:
        todo.title = patch.title
    if patch.done is not None:
        todo.done = patch.done
    await flush_or_409()
    return TodoOut.model_validate(todo)


@app.delete("/todos/{todo_id}", status_code=204, response_class=Response)
async def delete_todo(todo_id: TodoId, session: SessionDep) -> Response:
    await session.delete(await todo_or_404(todo_id))
    return Response(status_code=204)


@app.websocket("/todos/ws")
async def todos_socket(websocket: WebSocket, session: SessionDep) -> None:
    await websocket.accept()
    try:
        while True:
            message = await websocket.receive_text()
            try:
                todo = Todo(title=TodoIn.model_validate_json(message).title, done=False)
                session.add(todo)
                await flush_or_409()
                await session.commit()  # acknowledged below: commit before the reply
            except ValidationError as error:
                await session.rollback()
                await websocket.send_json({"detail": _first_problem(error)})
            except HTTPException as error:
                await session.rollback()
                await websocket.send_json({"detail": error.detail})
            else:
                await websocket.send_text(TodoOut.model_validate(todo).model_dump_json())
    except WebSocketDisconnect:
        pass


def _first_problem(error: ValidationError) -> str:
    problem = error.errors()[0]
    return f"{'.'.join(str(part) for part in problem['loc']) or 'message'}: {problem['msg']}"
