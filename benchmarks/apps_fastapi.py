"""FastAPI variants: bare, alchemy-scope, a `yield` dependency, fastapi-async-sqlalchemy.

alchemy-scope twice: handlers using `db.session`, and handlers receiving `SessionDep`. No
`from __future__ import annotations`: FastAPI reads the handlers' annotations, some of which
name local aliases.
"""

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI
from fastapi.responses import PlainTextResponse
from fastapi_async_sqlalchemy import create_middleware_and_session_proxy
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from alchemy_scope import Database
from alchemy_scope_fastapi import SessionDep, install
from benchmarks.models import SESSION_OPTIONS, insert_item, read_item


class NewItem(BaseModel):
    """The body of `POST /items`."""

    name: str


def with_ping() -> FastAPI:
    """A FastAPI app with the route that never touches the database."""
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> PlainTextResponse:
        return PlainTextResponse("pong")

    return app


def bare(engine: AsyncEngine) -> FastAPI:
    """FastAPI alone: each handler opens its own `async with sessionmaker() as session`."""
    sessionmaker = async_sessionmaker(engine, **SESSION_OPTIONS)
    app = with_ping()

    @app.get("/items/{item_id}")
    async def read(item_id: int) -> dict[str, Any]:
        async with sessionmaker() as session:
            return await read_item(session, item_id)

    @app.post("/items", status_code=201)
    async def create(new: NewItem) -> dict[str, Any]:
        async with sessionmaker() as session:
            return await insert_item(session, new.name)

    return app


def with_global_session(db: Any) -> FastAPI:
    """An app whose handlers use ``db.session``: alchemy-scope's or fastapi-async-sqlalchemy's."""
    app = with_ping()

    @app.get("/items/{item_id}")
    async def read(item_id: int) -> dict[str, Any]:
        return await read_item(db.session, item_id)

    @app.post("/items", status_code=201)
    async def create(new: NewItem) -> dict[str, Any]:
        return await insert_item(db.session, new.name)

    return app


def alchemy_scope(engine: AsyncEngine) -> FastAPI:
    """`alchemy_scope_fastapi.install(app, db)`; handlers use `db.session`."""
    db = Database(engine)
    app = with_global_session(db)
    install(app, db)
    return app


def alchemy_scope_dependency(engine: AsyncEngine) -> FastAPI:
    """`alchemy_scope_fastapi.install(app, db)`; handlers receive `SessionDep`."""
    app = with_ping()

    @app.get("/items/{item_id}")
    async def read(item_id: int, session: SessionDep) -> dict[str, Any]:
        return await read_item(session, item_id)

    @app.post("/items", status_code=201)
    async def create(new: NewItem, session: SessionDep) -> dict[str, Any]:
        return await insert_item(session, new.name)

    install(app, Database(engine))
    return app


def yield_dependency(engine: AsyncEngine) -> FastAPI:
    """The FastAPI tutorial's pattern: a `yield` dependency opens and closes the session."""
    sessionmaker = async_sessionmaker(engine, **SESSION_OPTIONS)

    async def get_session() -> AsyncIterator[AsyncSession]:
        async with sessionmaker() as session:
            yield session

    Session = Annotated[AsyncSession, Depends(get_session)]  # noqa: N806 - a type alias
    app = with_ping()

    @app.get("/items/{item_id}")
    async def read(item_id: int, session: Session) -> dict[str, Any]:
        return await read_item(session, item_id)

    @app.post("/items", status_code=201)
    async def create(new: NewItem, session: Session) -> dict[str, Any]:
        return await insert_item(session, new.name)

    return app


def fastapi_async_sqlalchemy(engine: AsyncEngine) -> FastAPI:
    """fastapi-async-sqlalchemy's `SQLAlchemyMiddleware`; handlers use its `db.session`."""
    middleware, db = create_middleware_and_session_proxy()  # one proxy per engine
    app = with_global_session(db)
    app.add_middleware(middleware, custom_engine=engine, session_args=SESSION_OPTIONS)
    return app
