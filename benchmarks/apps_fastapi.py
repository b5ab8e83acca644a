"""The FastAPI app of every variant (see benchmarks.variants.build)."""

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from alchemy_scope import Database
from alchemy_scope_fastapi import install
from benchmarks.variants import Handlers


class NewItem(BaseModel):
    name: str


def app(handlers: Handlers, db: Database | None, wrap: Callable[[Any], Any]) -> Any:
    fastapi = FastAPI()

    @fastapi.get("/ping")
    async def ping() -> PlainTextResponse:
        return PlainTextResponse("pong")

    @fastapi.get("/items/{item_id}")
    async def read(item_id: int) -> dict[str, Any]:
        return await handlers.read(item_id)

    @fastapi.post("/items", status_code=201)
    async def create(new: NewItem) -> dict[str, Any]:
        return await handlers.insert(new.name)

    if db is not None:
        install(fastapi, db)
    return wrap(fastapi)
