"""The harness's extra route, mounted on an example app in that framework's own way.

``GET`` or ``POST /__harness/<handler>?<arguments>`` runs like the example's own routes,
inside the scope alchemy-scope gives every request, and uses the example's ``db.session``
(commit policy ``autocommit``). The handlers:

- ``deferred?name=...&valid=1``: insert a child row whose parent exists (``valid=1``) or
  not (``valid=0``); the foreign key is checked only at COMMIT, so the failure comes from the
  commit alchemy-scope runs before the response starts. Answers 201.
- ``tenant?tenant=t07``: load the tenant's rows, sleep, load them again, and answer the
  tenants of every object in the session's identity map.
- ``slow?seconds=5``: hold a pooled connection for that long (``pg_sleep``).

No ``from __future__ import annotations``: Litestar reads the annotations of its handler.
"""

import asyncio
from typing import Any

from sqlalchemy import ForeignKey, String, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from alchemy_scope import Database

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
    """The route's logic, framework-neutral: each returns ``(status, JSON body)``."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def __call__(self, name: str, arguments: dict[str, str]) -> Result:
        """Run the handler ``name`` with the query's arguments."""
        if name not in ("deferred", "tenant", "slow"):
            return 404, {"detail": f"no harness handler {name!r}"}
        return await getattr(self, name)(**arguments)  # type: ignore[no-any-return]

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


PATH = "/__harness/{name}"
METHODS = ["GET", "POST"]


def mount(app: Any, db: Database) -> str:
    """Mount the route on ``app`` the way its framework adds routes; say how."""
    handlers = Handlers(db)
    # Each framework is imported only to mount on its own apps; the others may be missing.
    module = type(app).__module__.split(".")[0]
    if module in ("starlette", "fastapi"):
        from starlette.requests import Request  # noqa: PLC0415
        from starlette.responses import JSONResponse, Response  # noqa: PLC0415
        from starlette.routing import Route  # noqa: PLC0415

        async def endpoint(request: Request) -> Response:
            name, arguments = request.path_params["name"], dict(request.query_params)
            status, body = await handlers(name, arguments)
            return JSONResponse(body, status_code=status)

        app.router.routes.insert(0, Route(PATH, endpoint, methods=METHODS))
        return "a Starlette route (app.router.routes)"
    if module == "litestar":
        from litestar import Request as LitestarRequest  # noqa: PLC0415
        from litestar import Response as LitestarResponse  # noqa: PLC0415
        from litestar import route  # noqa: PLC0415

        async def handler(name: str, request: LitestarRequest) -> LitestarResponse:  # type: ignore[type-arg]
            status, body = await handlers(name, dict(request.query_params))
            return LitestarResponse(body, status_code=status)

        path = PATH.replace("{name}", "{name:str}")
        app.register(route(path, http_method=METHODS, include_in_schema=False)(handler))
        return "a Litestar route handler (app.register)"
    if module == "quart":
        from quart import request as quart_request  # noqa: PLC0415

        async def view(name: str) -> Any:
            status, body = await handlers(name, quart_request.args.to_dict())
            return body, status

        rule = PATH.replace("{name}", "<name>")
        app.add_url_rule(rule, "reliability_harness", view, methods=METHODS)
        return "a Quart URL rule (app.add_url_rule)"
    raise TypeError(f"reliability.routes cannot mount on a {type(app)!r}")
