"""The Litestar app of every variant (see benchmarks.variants.build)."""

from collections.abc import Callable
from typing import Any

from litestar import Litestar, MediaType, get, post

from alchemy_scope import Database
from alchemy_scope_litestar import AlchemyScopePlugin
from benchmarks.variants import Handlers


def app(handlers: Handlers, db: Database | None, wrap: Callable[[Any], Any]) -> Any:
    @get("/ping", media_type=MediaType.TEXT)
    async def ping() -> str:
        return "pong"

    @get("/items/{item_id:int}")
    async def read(item_id: int) -> dict[str, Any]:
        return await handlers.read(item_id)

    @post("/items")
    async def create(data: dict[str, Any]) -> dict[str, Any]:
        return await handlers.insert(data["name"])

    plugins = [] if db is None else [AlchemyScopePlugin(db)]
    return wrap(Litestar([ping, read, create], plugins=plugins))
