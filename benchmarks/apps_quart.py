"""Quart variants: bare and alchemy-scope."""

from __future__ import annotations

from typing import Any

from quart import Quart, request
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from alchemy_scope import Database
from alchemy_scope_quart import AlchemyScope
from benchmarks.models import SESSION_OPTIONS, insert_item, read_item


def with_ping() -> Quart:
    """A Quart app with the route that never touches the database."""
    app = Quart(__name__)

    @app.get("/ping")
    async def ping() -> str:
        return "pong"

    return app


def bare(engine: AsyncEngine) -> Quart:
    """Quart alone: each view opens its own `async with sessionmaker() as session`."""
    sessionmaker = async_sessionmaker(engine, **SESSION_OPTIONS)
    app = with_ping()

    @app.get("/items/<int:item_id>")
    async def read(item_id: int) -> dict[str, Any]:
        async with sessionmaker() as session:
            return await read_item(session, item_id)

    @app.post("/items")
    async def create() -> tuple[dict[str, Any], int]:
        payload = await request.get_json()
        async with sessionmaker() as session:
            return await insert_item(session, payload["name"]), 201

    return app


def alchemy_scope(engine: AsyncEngine) -> Quart:
    """`AlchemyScope(app, db)`; views use `db.session`."""
    db = Database(engine)
    app = with_ping()

    @app.get("/items/<int:item_id>")
    async def read(item_id: int) -> dict[str, Any]:
        return await read_item(db.session, item_id)

    @app.post("/items")
    async def create() -> tuple[dict[str, Any], int]:
        payload = await request.get_json()
        return await insert_item(db.session, payload["name"]), 201

    AlchemyScope(app, db)
    return app
