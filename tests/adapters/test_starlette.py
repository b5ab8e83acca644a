"""alchemy-scope-starlette: the shared scenarios, plus what is Starlette's own."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, ClassVar

import pytest
from sqlalchemy import TextClause, event, func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, DispatchFunction, RequestResponseEndpoint
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Lifespan, Receive, Send
from starlette.types import Scope as AsgiScope
from starlette.websockets import WebSocket, WebSocketDisconnect

from alchemy_scope import AlreadyInstalledError, Database
from alchemy_scope_starlette import install

from ..models import Item
from ..support import (
    THOROUGH,
    add_write_that_fails_at_commit,
    assert_no_leaks,
    backend,
    idle_connections,
    item_names,
    run_readme_app,
)
from .scenarios import AdapterScenarios, AnsweredError, asgi_client


def make_starlette_app(db: Database, *, lifespan: Lifespan[Starlette] | None = None) -> Starlette:
    """The scenario routes as a Starlette app, installed as the README shows.

    The handler of AnsweredError is async, added after install(); FastAPI's is sync.
    """

    def helper_a() -> AsyncSession:
        return db.session

    def helper_b() -> AsyncSession:
        return db.session

    async def ping(_request: Request) -> Response:
        return PlainTextResponse("pong")

    async def create_item(request: Request) -> Response:
        db.session.add(Item(name=request.path_params["name"]))
        await db.session.flush()
        if request.query_params.get("commit") == "1":
            await db.session.commit()
        status = int(request.query_params.get("status", "201"))
        return JSONResponse({"session": id(db.session)}, status_code=status)

    async def fail(request: Request) -> Response:
        db.session.add(Item(name=request.path_params["name"]))
        await db.session.flush()
        raise RuntimeError("handler failed")

    async def refused(request: Request) -> Response:
        db.session.add(Item(name=request.path_params["name"]))
        await db.session.flush()
        raise HTTPException(status_code=int(request.query_params["status"]))

    async def answered(request: Request) -> Response:
        db.session.add(Item(name=request.path_params["name"]))
        await db.session.flush()
        raise AnsweredError

    async def answer(_request: Request, _exc: Exception) -> Response:
        return PlainTextResponse("answered")

    async def identity(_request: Request) -> Response:
        first = helper_a()
        await asyncio.sleep(0.05)
        same = first is helper_b() is db.session
        return JSONResponse({"same": same, "session": id(first)})

    async def stream(request: Request) -> Response:
        count = int(request.query_params.get("n", "3"))
        delay = float(request.query_params.get("delay", "0"))

        async def lines() -> AsyncIterator[str]:
            for _ in range(count):
                items = await db.session.scalar(select(func.count()).select_from(Item))
                yield f"{id(db.session)} {items}\n"
                await asyncio.sleep(delay)

        return StreamingResponse(lines(), media_type="text/plain")

    async def background(request: Request) -> Response:
        request_session = db.session
        name = request.path_params["name"]

        async def job() -> None:
            suffix = "same" if db.session is request_session else "own"
            db.session.add(Item(name=f"{name}-{suffix}"))
            await db.session.commit()

        return Response(status_code=202, background=BackgroundTask(job))

    async def orphan(_request: Request) -> Response:
        add_write_that_fails_at_commit(db.session)
        await db.session.flush()
        return JSONResponse({"created": True}, status_code=201)

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                name = await websocket.receive_text()
                db.session.add(Item(name=name))
                await db.session.commit()
                await websocket.send_text(str(id(db.session)))
        except WebSocketDisconnect:
            pass

    async def ws_fail(websocket: WebSocket) -> None:
        await websocket.accept()
        db.session.add(Item(name=await websocket.receive_text()))
        await db.session.flush()
        await websocket.send_text("flushed")
        raise RuntimeError("websocket handler failed")

    app = Starlette(
        routes=[
            Route("/ping", ping),
            Route("/items/{name}", create_item, methods=["POST"]),
            Route("/items/{name}/fail", fail, methods=["POST"]),
            Route("/items/{name}/refused", refused, methods=["POST"]),
            Route("/items/{name}/answered", answered, methods=["POST"]),
            Route("/identity", identity),
            Route("/stream", stream),
            Route("/background/{name}", background, methods=["POST"]),
            Route("/orphan", orphan, methods=["POST"]),
            WebSocketRoute("/ws", ws),
            WebSocketRoute("/ws-fail", ws_fail),
        ],
        lifespan=lifespan,
    )
    install(app, db)
    app.add_exception_handler(AnsweredError, answer)  # after install(): still fails the scope
    return app


class TestStarlette(AdapterScenarios):
    make_app = staticmethod(make_starlette_app)
    background_in_request_scope = True
    install_advice = "install(app, db, other_db)"

    @staticmethod
    def install_twice(db: Database) -> None:
        install(make_starlette_app(db), db)


MIDDLEWARE_STYLES = ["pure ASGI class", "BaseHTTPMiddleware subclass", "dispatch function"]


class _PassThrough(BaseHTTPMiddleware):
    """A BaseHTTPMiddleware that does nothing: it still runs the app in a child task."""

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        return await call_next(request)


_GZIP = Middleware(GZipMiddleware, minimum_size=16)  # every test body is compressed
_BASE_HTTP = Middleware(_PassThrough)

# Middleware inside the scope that change when, and in which task, the response starts;
# innermost first (each one goes outside those added before it, as add_middleware() does).
INNER_MIDDLEWARE: dict[str, list[Middleware]] = {
    "BaseHTTPMiddleware": [_BASE_HTTP],
    "GZipMiddleware": [_GZIP],
    "BaseHTTPMiddleware inside GZipMiddleware": [_BASE_HTTP, _GZIP],
    "GZipMiddleware inside BaseHTTPMiddleware": [_GZIP, _BASE_HTTP],
}

# What a streamed body does with the session first, as its response starts: a 50 ms query,
# reading a streamed result (more rows than one fetch of asyncpg's server-side cursor, 50),
# a begin_nested() block that writes.
FIRST_STEPS = {
    "slow query": ("slow query",),
    "streamed result": ("streamed result",),
    "slow query, then a streamed result": ("slow query", "streamed result"),
    "slow query, then a begin_nested() block": ("slow query", "begin_nested() block"),
}

SEEDED_ROWS = 120
PADDING = "padding " * 20  # enough body for GZipMiddleware to compress


def slow_statement(db: Database) -> TextClause:
    """A statement that takes 50 ms on ``db`` (SQLite: a ``sleep()`` registered per connection)."""
    name = backend(db)
    if name == "postgresql":
        return text("SELECT pg_sleep(0.05)")
    if name == "mysql":
        return text("SELECT SLEEP(0.05)")

    def register_sleep(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.create_function("sleep", 1, time.sleep)

    event.listen(db.engine.sync_engine, "connect", register_sleep)
    return text("SELECT sleep(0.05)")


class MiddlewareOrderScenarios:
    """The scope is outermost, whatever order user middleware and install() come in.

    Shared with FastAPI: subclasses set ``app_class``, ``install`` and ``add_dispatch_function``.
    """

    app_class: ClassVar[type[Starlette]] = Starlette
    install: ClassVar[Callable[..., None]] = staticmethod(install)

    @staticmethod
    def add_dispatch_function(app: Starlette, dispatch: DispatchFunction) -> None:
        """What Starlette 0.x's deprecated ``@app.middleware("http")`` did (1.x removed it)."""
        app.add_middleware(BaseHTTPMiddleware, dispatch=dispatch)

    def app(self, db: Database) -> Starlette:
        """An app of ``app_class`` whose ``POST /items/{name}`` writes and answers its session."""

        async def create_item(request: Request) -> Response:
            db.session.add(Item(name=request.path_params["name"]))
            await db.session.flush()
            return JSONResponse({"session": id(db.session)}, status_code=201)

        return self.app_class(routes=[Route("/items/{name}", create_item, methods=["POST"])])

    def add_middleware(
        self, app: Starlette, db: Database, style: str, when: str, seen: list[int]
    ) -> None:
        """Add a middleware of ``style`` that records its session and adds an item."""

        def use_the_session() -> None:
            seen.append(id(db.session))
            db.session.add(Item(name=f"{style} {when}"))

        class PureAsgi:
            def __init__(self, app: ASGIApp) -> None:
                self.app = app

            async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
                if scope["type"] == "http":
                    use_the_session()
                await self.app(scope, receive, send)

        class Subclass(BaseHTTPMiddleware):
            async def dispatch(
                self, request: Request, call_next: RequestResponseEndpoint
            ) -> Response:
                use_the_session()
                return await call_next(request)

        async def dispatch(request: Request, call_next: RequestResponseEndpoint) -> Response:
            use_the_session()
            return await call_next(request)

        if style == "pure ASGI class":
            app.add_middleware(PureAsgi)
        elif style == "BaseHTTPMiddleware subclass":
            app.add_middleware(Subclass)
        else:
            self.add_dispatch_function(app, dispatch)

    @pytest.mark.parametrize("style", MIDDLEWARE_STYLES)
    async def test_middleware_added_before_and_after_install_runs_inside_the_scope(
        self, autocommit_db: Database, style: str
    ) -> None:
        """Middleware of any style, added before or after install(), uses the request's session."""
        seen: list[int] = []
        app = self.app(autocommit_db)
        self.add_middleware(app, autocommit_db, style, "before", seen)
        type(self).install(app, autocommit_db)
        self.add_middleware(app, autocommit_db, style, "after", seen)
        async with asgi_client(app) as client:
            response = await client.post("/items/route")
        assert response.status_code == 201
        assert seen == [response.json()["session"]] * 2
        names = await item_names(autocommit_db)
        assert sorted(names) == sorted([f"{style} after", f"{style} before", "route"])

    async def test_a_500_handler_runs_inside_the_scope(self, autocommit_db: Database) -> None:
        """The app's 500 handler sees the request's session; what the route wrote rolls back."""
        sessions: list[AsyncSession] = []

        async def fails_after_writing(_request: Request) -> Response:
            sessions.append(autocommit_db.session)
            autocommit_db.session.add(Item(name="doomed"))
            await autocommit_db.session.flush()
            raise RuntimeError("handler failed")

        async def server_error(_request: Request, _exc: Exception) -> Response:
            return JSONResponse({"same": autocommit_db.session is sessions[0]}, status_code=500)

        app = self.app_class(
            routes=[Route("/fail", fails_after_writing, methods=["POST"])],
            exception_handlers={Exception: server_error},
        )
        type(self).install(app, autocommit_db)
        async with asgi_client(app) as client:
            response = await client.post("/fail")
        assert response.status_code == 500
        assert response.json() == {"same": True}
        assert await item_names(autocommit_db) == []

    def test_install_twice_raises_even_with_middleware_in_between(self, db: Database) -> None:
        """A second install(), after more middleware was added, raises AlreadyInstalledError."""
        app = self.app(db)
        type(self).install(app, db)
        self.add_middleware(app, db, MIDDLEWARE_STYLES[0], "after", [])
        with pytest.raises(AlreadyInstalledError, match=r"install\(app, db, other_db\)"):
            type(self).install(app, db)

    # Every combination where THOROUGH is set; elsewhere the two that race hardest.
    @pytest.mark.parametrize(
        "first_step", list(FIRST_STEPS) if THOROUGH else ["slow query, then a streamed result"]
    )
    @pytest.mark.parametrize(
        "inner", list(INNER_MIDDLEWARE) if THOROUGH else ["BaseHTTPMiddleware", "GZipMiddleware"]
    )
    async def test_a_stream_whose_first_query_races_the_commit_at_response_start(
        self, autocommit_db: Database, inner: str, first_step: str
    ) -> None:
        """Autocommit: a stream that queries as its response starts gets 200, in full, committed."""
        db = autocommit_db
        sleep = slow_statement(db)
        steps = FIRST_STEPS[first_step]
        seeded = [f"seed {n}" for n in range(SEEDED_ROWS)]
        async with db.engine.begin() as conn:
            await conn.execute(insert(Item), [{"name": name} for name in seeded])
        commits_under_the_body: list[str] = []  # COMMITs while the body used the session

        async def write_then_stream(request: Request) -> Response:
            name = request.path_params["name"]
            db.session.add(Item(name=name))
            await db.session.flush()
            body_is: list[str] = []  # what the body is doing with the session right now

            def before_commit(session: Session) -> None:
                if not session.in_nested_transaction():  # not the block's own RELEASE
                    commits_under_the_body.extend(f"{name}: {doing}" for doing in body_is)

            event.listen(db.session.sync_session, "before_commit", before_commit)

            async def lines() -> AsyncIterator[str]:
                # These first steps run as the response starts. Under BaseHTTPMiddleware they
                # run in a child task while our middleware commits; under GZipMiddleware the
                # start goes out with the first chunk, a streamed result still open.
                for step in steps:
                    body_is.append(f"in its {step}")
                    if step == "slow query":
                        await db.session.execute(sleep)
                    elif step == "streamed result":
                        result = await db.session.stream_scalars(
                            select(Item.name)
                            .where(Item.name.startswith("seed ") | (Item.name == name))
                            .order_by(Item.id)
                        )
                        async for found in result:
                            yield f"{found}\n"
                    else:
                        async with db.session.begin_nested():
                            db.session.add(Item(name=f"{name} nested"))
                            await db.session.flush()
                    body_is.clear()
                if "streamed result" not in steps:
                    yield f"{await db.session.scalar(select(Item.name).where(Item.name == name))}\n"
                for line in range(3):
                    yield f"{name} line {line} {PADDING}\n"

            return StreamingResponse(lines(), media_type="text/plain")

        app = self.app_class(routes=[Route("/stream/{name}", write_then_stream, methods=["POST"])])
        type(self).install(app, db)
        for middleware in INNER_MIDDLEWARE[inner]:
            app.user_middleware.insert(0, middleware)  # what add_middleware() does

        def expected(name: str) -> str:
            rows = [*seeded, name] if "streamed result" in steps else [name]
            return "".join(f"{row}\n" for row in rows) + "".join(
                f"{name} line {line} {PADDING}\n" for line in range(3)
            )

        names = [f"one by one {n}" for n in range(8)] + [f"together {n}" for n in range(12)]
        async with asgi_client(app) as client:
            responses = [await client.post(f"/stream/{name}") for name in names[:8]]
            for start in (8, 12, 16):  # then three bursts of four at once
                responses += await asyncio.gather(
                    *(client.post(f"/stream/{name}") for name in names[start : start + 4])
                )
        assert [
            name for name, r in zip(names, responses, strict=True) if r.status_code != 200
        ] == []
        assert commits_under_the_body == []
        assert [r.text for r in responses] == [expected(name) for name in names]
        if "GZip" in inner:
            assert {r.headers.get("content-encoding") for r in responses} == {"gzip"}
        nested = [f"{name} nested" for name in names if "begin_nested() block" in steps]
        assert sorted(await item_names(db)) == sorted(seeded + names + nested)


class TestStarletteMiddlewareOrder(MiddlewareOrderScenarios):
    pass


async def test_user_lifespan_still_runs_and_databases_are_disposed_after_it(
    db: Database,
) -> None:
    """install() keeps the app's own lifespan and disposes the engine after its shutdown."""
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        events.append("startup")
        yield
        # The engine is still usable during the app's own shutdown.
        async with db.scope():
            await db.session.execute(select(Item))
        events.append(f"shutdown, pool has {idle_connections(db)}")

    async with asgi_client(make_starlette_app(db, lifespan=lifespan)) as client:
        assert (await client.get("/ping")).text == "pong"
    assert events == ["startup", "shutdown, pool has 1"]
    assert idle_connections(db) == 0


async def test_other_middleware_runs_inside_the_scope(db: Database) -> None:
    """A user middleware (even BaseHTTPMiddleware) sees the request's session."""
    seen: list[bool] = []

    class Audit(BaseHTTPMiddleware):
        async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
            before = db.session
            response = await call_next(request)
            seen.append(before is db.session)
            return response

    app = make_starlette_app(db)
    app.user_middleware.append(Middleware(Audit))
    async with asgi_client(app) as client:
        assert (await client.post("/items/audited?commit=1")).status_code == 201
    assert seen == [True]
    assert await item_names(db) == ["audited"]


async def test_handlers_given_as_partials_or_async_callables_are_awaited(
    autocommit_db: Database,
) -> None:
    """An async handler wrapped in functools.partial, or an object, is awaited; nothing commits."""

    class PartialError(Exception):
        pass

    class CallableError(Exception):
        pass

    class Answer:
        async def __call__(self, _request: Request, _exc: Exception) -> Response:
            return PlainTextResponse("an object")

    async def answer(text: str, _request: Request, _exc: Exception) -> Response:
        return PlainTextResponse(text)

    async def fails_after_writing(request: Request) -> Response:
        name = request.path_params["name"]
        autocommit_db.session.add(Item(name=name))
        await autocommit_db.session.flush()
        raise (PartialError if name == "partial" else CallableError)()

    app = Starlette(routes=[Route("/{name}", fails_after_writing, methods=["POST"])])
    install(app, autocommit_db)
    app.add_exception_handler(PartialError, functools.partial(answer, "a partial"))
    app.add_exception_handler(CallableError, Answer())
    async with asgi_client(app) as client:
        assert (await client.post("/partial")).text == "a partial"
        assert (await client.post("/callable")).text == "an object"
    assert await item_names(autocommit_db) == []


def test_install_after_startup_fails_with_starlettes_error(db: Database) -> None:
    """install() on an app whose middleware stack is built raises instead of doing nothing."""
    app = Starlette()
    app.middleware_stack = app.build_middleware_stack()
    with pytest.raises(RuntimeError):
        install(app, db)


@pytest.mark.parametrize("readme", ["README.md", "adapters/starlette/README.md"])
async def test_the_readme_app_works_when_copied(
    readme: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The complete app shown in the README serves a request through db.session."""
    monkeypatch.chdir(tmp_path)  # its SQLite file lands where a user would run it
    namespace = run_readme_app(readme)
    db: Database = namespace["db"]
    async with asgi_client(namespace["app"]) as client:
        response = await client.get("/")
    assert response.status_code == 200
    assert response.json()["now"]
    await assert_no_leaks(db)
