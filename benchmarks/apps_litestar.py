"""Litestar variants: bare, alchemy-scope (injected or `db.session`), advanced-alchemy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from advanced_alchemy.extensions.litestar import (
    AsyncSessionConfig,
    SQLAlchemyAsyncConfig,
    SQLAlchemyPlugin,
)
from litestar import Litestar, MediaType, get, post
from litestar.di import NamedDependency
from litestar.handlers import HTTPRouteHandler
from litestar.plugins import PluginProtocol
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from alchemy_scope import Database
from alchemy_scope_litestar import AlchemyScopePlugin
from benchmarks.models import SESSION_OPTIONS, insert_item, read_item


@get("/ping", media_type=MediaType.TEXT)
async def ping() -> str:
    """The route that never touches the database."""
    return "pong"


def app_with(
    read: Callable[..., Any], create: Callable[..., Any], plugins: list[PluginProtocol]
) -> Litestar:
    """A Litestar app with the bench routes, a variant's two database handlers and plugins."""
    handlers: list[HTTPRouteHandler] = [
        ping,
        get("/items/{item_id:int}")(read),
        post("/items")(create),
    ]
    return Litestar(handlers, plugins=plugins)


def bare(engine: AsyncEngine) -> Litestar:
    """Litestar alone: each handler opens its own `async with sessionmaker() as session`."""
    sessionmaker = async_sessionmaker(engine, **SESSION_OPTIONS)

    async def read(item_id: int) -> dict[str, Any]:
        async with sessionmaker() as session:
            return await read_item(session, item_id)

    async def create(data: dict[str, Any]) -> dict[str, Any]:
        async with sessionmaker() as session:
            return await insert_item(session, data["name"])

    return app_with(read, create, [])


def with_injected_session(plugin: PluginProtocol) -> Litestar:
    """An app whose handlers receive the session that ``plugin`` injects as `db_session`."""

    async def read(item_id: int, db_session: NamedDependency[AsyncSession]) -> dict[str, Any]:
        return await read_item(db_session, item_id)

    async def create(
        data: dict[str, Any], db_session: NamedDependency[AsyncSession]
    ) -> dict[str, Any]:
        return await insert_item(db_session, data["name"])

    return app_with(read, create, [plugin])


def alchemy_scope(engine: AsyncEngine) -> Litestar:
    """`AlchemyScopePlugin(db)`; handlers receive the injected `db_session`."""
    return with_injected_session(AlchemyScopePlugin(Database(engine)))


def alchemy_scope_global(engine: AsyncEngine) -> Litestar:
    """`AlchemyScopePlugin(db)`; handlers use `db.session`, nothing is injected."""
    db = Database(engine)

    async def read(item_id: int) -> dict[str, Any]:
        return await read_item(db.session, item_id)

    async def create(data: dict[str, Any]) -> dict[str, Any]:
        return await insert_item(db.session, data["name"])

    return app_with(read, create, [AlchemyScopePlugin(db)])


def advanced_alchemy(engine: AsyncEngine) -> Litestar:
    """advanced-alchemy's `SQLAlchemyPlugin`; handlers receive its injected `db_session`."""
    config = SQLAlchemyAsyncConfig(
        engine_instance=engine, session_config=AsyncSessionConfig(**SESSION_OPTIONS)
    )
    return with_injected_session(SQLAlchemyPlugin(config=config))
