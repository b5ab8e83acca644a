"""The Quart app of every variant (see benchmarks.variants.build)."""

from collections.abc import Callable
from typing import Any

from quart import Quart, request

from alchemy_scope import Database
from alchemy_scope_quart import AlchemyScope
from benchmarks.variants import Handlers


def app(handlers: Handlers, db: Database | None, wrap: Callable[[Any], Any]) -> Any:
    quart = Quart(__name__)

    @quart.get("/ping")
    async def ping() -> str:
        return "pong"

    @quart.get("/items/<int:item_id>")
    async def read(item_id: int) -> dict[str, Any]:
        return await handlers.read(item_id)

    @quart.post("/items")
    async def create() -> tuple[dict[str, Any], int]:
        payload = await request.get_json()
        return await handlers.insert(payload["name"]), 201

    if db is not None:
        AlchemyScope(quart, db)
    quart.asgi_app = wrap(quart.asgi_app)  # type: ignore[method-assign]
    return quart
