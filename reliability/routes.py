"""The harness's extra routes, mounted on an example app in that framework's own way.

Each route runs like the example's own routes, inside the scope alchemy-scope gives every
request, and uses the example's ``db.session`` (commit policy ``autocommit``):

- ``POST /__deferred/{name}?valid=1``: insert a child row whose parent exists (``valid=1``)
  or not (``valid=0``); the foreign key is checked only at COMMIT, so the failure comes from
  the commit alchemy-scope runs before the response starts. Answers 201.
- ``GET /__tenant/{tenant}``: load the tenant's rows, sleep, load them again, and answer the
  tenants of every object in the session's identity map.
- ``GET /__slow?seconds=5``: hold a pooled connection for that long (``pg_sleep``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

from sqlalchemy import ForeignKey, String, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from alchemy_scope import Database, ScopeMiddleware

TENANTS = 30
ROWS_PER_TENANT = 3
PARENT_ID = 1
MISSING_PARENT_ID = 999_999

Result = tuple[int, Any]


class Base(DeclarativeBase):
    """The harness's tables, kept apart from the example's."""


class Parent(Base):
    """The one parent row children may point at."""

    __tablename__ = "reliability_parents"

    id: Mapped[int] = mapped_column(primary_key=True)


class Child(Base):
    """A row whose parent is checked only at COMMIT (a deferred foreign key)."""

    __tablename__ = "reliability_children"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    parent_id: Mapped[int] = mapped_column(
        ForeignKey(Parent.id, deferrable=True, initially="DEFERRED")
    )


class TenantRow(Base):
    """A row that belongs to one tenant."""

    __tablename__ = "reliability_tenant_rows"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant: Mapped[str] = mapped_column(String(20), index=True)


def tenant_name(index: int) -> str:
    """The name of the ``index``-th seeded tenant."""
    return f"t{index:02d}"


async def create_tables(db: Database) -> None:
    """Create the harness's tables and seed the parent and the tenants' rows."""
    async with db.engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
        if not await connection.scalar(select(Parent.id).limit(1)):
            await connection.execute(Parent.__table__.insert(), [{"id": PARENT_ID}])
            rows = [
                {"tenant": tenant_name(index)}
                for index in range(TENANTS)
                for _ in range(ROWS_PER_TENANT)
            ]
            await connection.execute(TenantRow.__table__.insert(), rows)


class Handlers:
    """The routes' logic, framework-neutral: each returns ``(status, JSON body)``."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def deferred(self, name: str, valid: str = "1") -> Result:
        """Insert a child that violates the deferred foreign key unless ``valid`` is 1."""
        parent_id = PARENT_ID if valid == "1" else MISSING_PARENT_ID
        self.db.session.add(Child(name=name, parent_id=parent_id))
        await self.db.session.flush()
        return 201, {"name": name}

    async def tenant(self, tenant: str) -> Result:
        """Load a tenant's rows twice around a sleep; report the identity map's tenants."""
        session = self.db.session
        query = select(TenantRow).where(TenantRow.tenant == tenant)
        first = list(await session.scalars(query))
        await asyncio.sleep(0.01)  # let the other requests run meanwhile
        second = list(await session.scalars(query))
        seen = sorted({obj.tenant for obj in session.identity_map.values()})  # type: ignore[attr-defined]
        return 200, {"seen": seen, "rows": len(first), "again": len(second)}

    async def slow(self, seconds: str = "5") -> Result:
        """Hold a pooled connection for ``seconds``."""
        await self.db.session.execute(text("SELECT pg_sleep(:s)"), {"s": float(seconds)})
        return 200, {"slept": float(seconds)}


# (method, path pattern with {param}, handler name, query parameters)
ROUTES = [
    ("POST", "/__deferred/{name}", "deferred", ("valid",)),
    ("GET", "/__tenant/{tenant}", "tenant", ()),
    ("GET", "/__slow", "slow", ("seconds",)),
]


def mount(app: Any, db: Database) -> tuple[Any, str]:
    """Mount the routes on ``app`` the way its framework adds routes.

    Returns:
        The app to serve and how the routes were mounted.
    """
    handlers = Handlers(db)
    for mounter in (_mount_starlette, _mount_litestar, _mount_quart):
        mounted = mounter(app, handlers)
        if mounted:
            return app, mounted
    return _AsgiRoutes(app, handlers), "plain ASGI in alchemy_scope.ScopeMiddleware (fallback)"


def _handler(handlers: Handlers, name: str) -> Callable[..., Awaitable[Result]]:
    return getattr(handlers, name)  # type: ignore[no-any-return]


def _mount_starlette(app: Any, handlers: Handlers) -> str | None:
    try:
        # Each framework is imported only to mount on its own apps; any may be missing.
        from starlette.applications import Starlette  # noqa: PLC0415
        from starlette.requests import Request  # noqa: PLC0415
        from starlette.responses import JSONResponse, Response  # noqa: PLC0415
        from starlette.routing import Route  # noqa: PLC0415
    except ImportError:
        return None
    if not isinstance(app, Starlette):  # FastAPI is a Starlette
        return None
    for method, path, name, query in ROUTES:

        def endpoint(
            handler: Callable[..., Awaitable[Result]], query: tuple[str, ...]
        ) -> Callable[[Request], Awaitable[Response]]:
            async def call(request: Request) -> Response:
                params = {
                    key: request.query_params[key] for key in query if key in request.query_params
                }
                status, body = await handler(**request.path_params, **params)
                return JSONResponse(body, status_code=status)

            return call

        route = Route(path, endpoint(_handler(handlers, name), query), methods=[method])
        app.router.routes.insert(0, route)
    return "Starlette routes (app.router.routes)"


def _mount_litestar(app: Any, handlers: Handlers) -> str | None:
    try:
        from litestar import Litestar  # noqa: PLC0415
    except ImportError:
        return None
    if not isinstance(app, Litestar):
        return None
    from ._litestar_routes import route_handlers  # noqa: PLC0415 (imports litestar)

    for route_handler in route_handlers(
        _handler(handlers, "deferred"), _handler(handlers, "tenant"), _handler(handlers, "slow")
    ):
        app.register(route_handler)
    return "Litestar route handlers (app.register)"


def _mount_quart(app: Any, handlers: Handlers) -> str | None:
    try:
        from quart import Quart, request  # noqa: PLC0415
    except ImportError:
        return None
    if not isinstance(app, Quart):
        return None
    for method, path, name, query in ROUTES:
        handler = _handler(handlers, name)

        def view(
            handler: Callable[..., Awaitable[Result]], query: tuple[str, ...]
        ) -> Callable[..., Awaitable[Any]]:
            async def call(**path_params: str) -> Any:
                params = {key: request.args[key] for key in query if key in request.args}
                status, body = await handler(**path_params, **params)
                return body, status

            return call

        rule = path.replace("{", "<").replace("}", ">")
        app.add_url_rule(rule, f"reliability_{name}", view(handler, query), methods=[method])
    return "Quart URL rules (app.add_url_rule)"


class _AsgiRoutes:
    """For a framework this module does not know: the routes as plain ASGI, in a scope."""

    def __init__(self, app: Any, handlers: Handlers) -> None:
        self.app = app
        self.handlers = handlers
        self.routes = ScopeMiddleware(self._routes)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/__"):
            await self.routes(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _routes(self, scope: Any, receive: Any, send: Any) -> None:
        for method, path, name, query in ROUTES:
            prefix = path.split("{")[0]
            if scope["method"] == method and scope["path"].startswith(prefix):
                rest = scope["path"][len(prefix) :]
                params = dict(parse_qsl(scope["query_string"].decode()))
                args = {key: params[key] for key in query if key in params}
                if "{" in path:
                    args[path.split("{")[1].rstrip("}")] = rest
                status, body = await _handler(self.handlers, name)(**args)
                break
        else:
            status, body = 404, {"detail": "no such harness route"}
        payload = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
