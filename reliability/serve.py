"""The served side: one example on a real server, with the harness's route; or its memory soak.

``python -m reliability.serve <framework>`` imports ``examples/<framework>/app.py`` the way
``uvicorn app:app`` would, with ``DATABASE_URL`` and the ``DATABASE_POOL_*`` settings from the
environment, mounts the harness's route (:func:`mount`) and wraps the app in :class:`Harness`;
:func:`tooling.servers.serve_until_signalled` serves it with uvicorn, or hypercorn for Quart
(it prints ``LISTENING <port>``, stops on SIGTERM, and the app's shutdown disposes the engine).

``GET`` or ``POST /__harness/<handler>?<arguments>`` runs like the example's own routes,
inside the scope alchemy-scope gives every request, with the example's ``db.session``
(commit policy ``autocommit``). The handlers (:class:`Handlers`):

- ``deferred?name=...&valid=1``: insert a child row whose parent exists (``valid=1``) or
  not (``valid=0``); the foreign key is checked only at COMMIT, so the failure comes from the
  commit alchemy-scope runs before the response starts. Answers 201.
- ``tenant?tenant=t07``: load the tenant's rows, sleep, load them again, and answer the
  tenants of every object in the session's identity map.
- ``slow?seconds=5``: hold a pooled connection for that long (``pg_sleep``).
- ``where``: run ``SELECT pg_is_in_recovery()`` through ``db.session``, as a read of the
  example's would: true when the read ran on a replica; with the worker's pid.

``python -m reliability.serve --create <framework>`` creates the example's tables (its
lifespan) and the harness's, then exits: for ``uvicorn --workers``, whose workers would race
to create them. Such workers import :mod:`reliability.workers_app`, the same app and wrapper.

``python -m reliability.serve --soak <framework> <requests> <warm-up>`` imports the example
the same way, runs its lifespan, then calls the ASGI app directly (no TCP, to be fast), 20 at
a time: 40% touch the database (reads, creates, duplicates, 404s), 60% do not (422s, health
checks). RSS is sampled every 2,500 requests; the growth reported is from the end of the
warm-up to the end. The result is one JSON line on stdout.

No ``from __future__ import annotations``: Litestar reads the annotations of its handler.
"""

import asyncio
import contextlib
import importlib
import json
import logging
import os
import random
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import ForeignKey, String, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from alchemy_scope import Database
from tooling.asgi import Request, lifespan
from tooling.memory import soak
from tooling.servers import serve_until_signalled

# RELIABILITY_EXAMPLES points at another copy of examples/: to try a fix before it lands.
EXAMPLES = Path(
    os.environ.get("RELIABILITY_EXAMPLES", Path(__file__).resolve().parent.parent / "examples")
)
CANCEL_HEADER = b"x-reliability-cancel-after"
SERVER_OPTIONS: dict[str, dict[str, Any]] = {  # the servers' logs are checked for secrets
    "uvicorn": {"log_level": "info", "access_log": False, "backlog": 2048, "ws": "auto"},
    "hypercorn": {"loglevel": "INFO", "graceful_timeout": 3, "backlog": 2048},
}
TENANTS, ROWS_PER_TENANT, PARENT_ID, MISSING_PARENT_ID = 30, 3, 1, 999_999
logger = logging.getLogger("reliability.serve")


def examples() -> list[str]:
    """The examples there are: every ``examples/<framework>/app.py``."""
    return sorted(path.parent.name for path in EXAMPLES.glob("*/app.py"))


def server_for(framework: str) -> str:
    """``hypercorn`` if the example's requirements name it (Quart), else ``uvicorn``."""
    requirements = EXAMPLES / framework / "requirements.txt"
    named = requirements.read_text() if requirements.exists() else ""
    return "hypercorn" if "hypercorn" in named else "uvicorn"


def load_example(framework: str) -> Any:
    """Import the example's ``app`` module as ``uvicorn app:app`` run from its directory would."""
    sys.path.insert(0, str(EXAMPLES / framework))
    return importlib.import_module("app")


def registry_size(db: Database) -> int:
    """How many sessions the registry of ``db`` holds (scopes not yet ended)."""
    return len(db.scoped_session.registry.registry)  # type: ignore[attr-defined]


def tenant_name(index: int) -> str:
    """The name of the ``index``-th seeded tenant."""
    return f"t{index:02d}"


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


async def create_tables(db: Database) -> None:
    """Create the harness's tables and seed the parent and the tenants' rows."""
    async with db.engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
        if not await connection.scalar(select(Parent.id).limit(1)):
            await connection.execute(Parent.__table__.insert(), [{"id": PARENT_ID}])
            rows = [
                {"tenant": tenant_name(i)} for i in range(TENANTS) for _ in range(ROWS_PER_TENANT)
            ]
            await connection.execute(TenantRow.__table__.insert(), rows)


class Handlers:
    """The route's logic, framework-neutral: each returns ``(status, JSON body)``."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def __call__(self, name: str, arguments: dict[str, str]) -> tuple[int, Any]:
        """Run the handler ``name`` with the query's arguments."""
        if name not in ("deferred", "tenant", "slow", "where"):
            return 404, {"detail": f"no harness handler {name!r}"}
        return await getattr(self, name)(**arguments)  # type: ignore[no-any-return]

    async def deferred(self, name: str, valid: str = "1") -> tuple[int, Any]:
        """Insert a child that violates the deferred foreign key unless ``valid`` is 1."""
        parent_id = PARENT_ID if valid == "1" else MISSING_PARENT_ID
        self.db.session.add(Child(name=name, parent_id=parent_id))
        await self.db.session.flush()
        return 201, {"name": name}

    async def tenant(self, tenant: str) -> tuple[int, Any]:
        """Load a tenant's rows twice around a sleep; report the identity map's tenants."""
        session, query = self.db.session, select(TenantRow).where(TenantRow.tenant == tenant)
        first = list(await session.scalars(query))
        await asyncio.sleep(0.01)  # let the other requests run meanwhile
        second = list(await session.scalars(query))
        seen = sorted({obj.tenant for obj in session.identity_map.values()})  # type: ignore[attr-defined]
        return 200, {"seen": seen, "rows": len(first), "again": len(second)}

    async def where(self) -> tuple[int, Any]:
        """Where this request's reads run: a replica (in recovery) or the primary; our pid."""
        replica = await self.db.session.scalar(text("SELECT pg_is_in_recovery()"))
        return 200, {"replica": bool(replica), "pid": os.getpid()}

    async def slow(self, seconds: str = "5") -> tuple[int, Any]:
        """Hold a pooled connection for ``seconds``."""
        await self.db.session.execute(text("SELECT pg_sleep(:s)"), {"s": float(seconds)})
        return 200, {"slept": float(seconds)}


def mount(app: Any, db: Database) -> str:
    """Mount ``/__harness/{name}`` (GET, POST) on ``app`` its framework's own way; say how."""
    handlers, methods = Handlers(db), ["GET", "POST"]
    # Each framework is imported only to mount on its own apps; the others may be missing.
    module = type(app).__module__.split(".")[0]
    if module in ("starlette", "fastapi"):
        from starlette.requests import Request as StarletteRequest  # noqa: PLC0415
        from starlette.responses import JSONResponse, Response  # noqa: PLC0415
        from starlette.routing import Route  # noqa: PLC0415

        async def endpoint(request: StarletteRequest) -> Response:
            status, body = await handlers(request.path_params["name"], dict(request.query_params))
            return JSONResponse(body, status_code=status)

        app.router.routes.insert(0, Route("/__harness/{name}", endpoint, methods=methods))
        return "a Starlette route (app.router.routes)"
    if module == "litestar":
        from litestar import Request as LitestarRequest  # noqa: PLC0415
        from litestar import Response as LitestarResponse  # noqa: PLC0415
        from litestar import route  # noqa: PLC0415

        async def handler(name: str, request: LitestarRequest) -> LitestarResponse:  # type: ignore[type-arg]
            status, body = await handlers(name, dict(request.query_params))
            return LitestarResponse(body, status_code=status)

        path = "/__harness/{name:str}"
        app.register(route(path, http_method=methods, include_in_schema=False)(handler))
        return "a Litestar route handler (app.register)"
    if module == "quart":
        from quart import request as quart_request  # noqa: PLC0415

        async def view(name: str) -> Any:
            status, body = await handlers(name, quart_request.args.to_dict())
            return body, status

        app.add_url_rule("/__harness/<name>", "reliability_harness", view, methods=methods)
        return "a Quart URL rule (app.add_url_rule)"
    raise TypeError(f"reliability.serve cannot mount on a {type(app)!r}")


class Harness:
    """An ASGI wrapper around the example: a leak report, and handlers cancelled on request.

    - ``GET /__leaks`` answers, without entering the app: the registry size, the pool's
      checked-out connections, and the reprs of the database objects (for the secrets check).
    - A request with the header ``x-reliability-cancel-after: <seconds>`` has its app task
      cancelled after that long, as a server or proxy timeout would; if no response had
      started, the client gets a 504.
    """

    def __init__(self, app: Any, db: Database) -> None:
        self.app, self.db = app, db

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Answer the leak report, cancel on request, pass everything else to the app."""
        if scope["type"] == "http" and scope["path"] == "/__leaks":
            await _send_json(send, 200, self.leaks())
            return
        delay = dict(scope.get("headers", [])).get(CANCEL_HEADER)
        if scope["type"] != "http" or delay is None:
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, tracking_send))
        done, _ = await asyncio.wait({task}, timeout=float(delay))
        if task in done:
            task.result()
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if not started:
            await _send_json(send, 504, {"detail": "The harness cancelled this request."})

    def leaks(self) -> dict[str, Any]:
        """What the leak check reads."""
        engine = self.db.engine
        pool: Any = engine.pool
        reprs = [repr(self.db), repr(engine), repr(engine.url), str(engine.url), repr(pool)]
        replicas = self.db.replicas.replicas if self.db.replicas is not None else ()
        return {
            "registry": registry_size(self.db),
            "checkedout": pool.checkedout(),
            "replica_checkedout": sum(r.engine.pool.checkedout() for r in replicas),  # type: ignore[attr-defined]
            "pid": os.getpid(),
            "reprs": [*reprs, pool.status()],
        }


async def _send_json(send: Any, status: int, body: Any) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def serve(framework: str) -> None:
    """Load, wrap and serve the example."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    module = load_example(framework)
    db: Database = module.db
    await create_tables(db)
    app, mounted = module.app, mount(module.app, db)
    logger.info("Serving examples/%s with %s; harness routes: %s", framework, db, mounted)
    logger.info("Engine %r, pool %s", db.engine, db.engine.pool.status())
    server = server_for(framework)
    await serve_until_signalled(Harness(app, db), server, **SERVER_OPTIONS[server])


def soak_request(index: int, rng: random.Random, seeded: int) -> Request:
    """The soak's ``index``-th request: 40% use the database, 60% do not."""
    roll = rng.random()
    if roll < 0.25:
        return Request("GET", f"/todos/{rng.randint(1, seeded)}")
    for below, method, target, body in [
        (0.30, "GET", "/todos?limit=10", b""),
        (0.33, "POST", "/todos", json.dumps({"title": f"memory {index}"}).encode()),
        (0.35, "POST", "/todos", b'{"title": "seed 1"}'),  # 409
        (0.40, "GET", "/todos/999999999", b""),  # 404
        (0.60, "POST", "/todos", b'{"title": ""}'),  # 422
    ]:
        if roll < below:
            return Request(method, target, body)
    return Request("GET", "/health")


async def memory_soak(framework: str, total: int, warmup: int) -> dict[str, Any]:
    """Run the soak; return the measurements."""
    module, rng, seeded = load_example(framework), random.Random(5), 20
    app, db = module.app, module.db
    async with lifespan(app) as state:
        for index in range(seeded):
            await Request("POST", "/todos", b'{"title": "seed %d"}' % index)(app, state)

        async def send(index: int) -> int:
            return (await soak_request(index, rng, seeded)(app, state))[0]

        found, statuses = await soak(send, total, 2_500, 20)
        registry, checkedout = registry_size(db), db.engine.pool.checkedout()
    samples = [(index, rss / 2**20) for index, rss in found[1:]]
    after_warmup = [rss for index, rss in samples if index >= warmup]
    return {
        "requests": samples[-1][0],
        "statuses": {str(code): count for code, count in sorted(statuses.items())},
        "registry": registry,
        "checkedout": checkedout,
        "rss_after_warmup": after_warmup[0] if after_warmup else None,
        "rss_end": samples[-1][1],
        "growth_mb": (samples[-1][1] - after_warmup[0]) if after_warmup else None,
        "samples": samples,
        "repr": repr(db),
    }


async def create(framework: str) -> None:
    """Create the example's tables (its lifespan's startup) and the harness's."""
    module = load_example(framework)
    async with lifespan(module.app):
        await create_tables(module.db)


if __name__ == "__main__":
    if sys.argv[1] == "--create":
        asyncio.run(create(sys.argv[2]))
    elif sys.argv[1] == "--soak":
        result = asyncio.run(memory_soak(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
        print(json.dumps(result), flush=True)
    else:
        asyncio.run(serve(sys.argv[1]))
