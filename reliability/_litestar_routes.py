"""The harness routes as Litestar route handlers (Litestar reads their annotations at runtime)."""

# No `from __future__ import annotations`: Litestar resolves these annotations itself.
from collections.abc import Awaitable, Callable
from typing import Any

from litestar import Response, get, post
from litestar.handlers import HTTPRouteHandler

Handler = Callable[..., Awaitable[tuple[int, Any]]]


def route_handlers(deferred: Handler, tenant: Handler, slow: Handler) -> list[HTTPRouteHandler]:
    """Litestar handlers calling the framework-neutral ones."""

    @post("/__deferred/{name:str}", include_in_schema=False)
    async def deferred_route(name: str, valid: str = "1") -> Response[Any]:
        status, body = await deferred(name=name, valid=valid)
        return Response(body, status_code=status)

    @get("/__tenant/{tenant_name:str}", include_in_schema=False)
    async def tenant_route(tenant_name: str) -> Response[Any]:
        status, body = await tenant(tenant=tenant_name)
        return Response(body, status_code=status)

    @get("/__slow", include_in_schema=False)
    async def slow_route(seconds: str = "5") -> Response[Any]:
        status, body = await slow(seconds=seconds)
        return Response(body, status_code=status)

    return [deferred_route, tenant_route, slow_route]
