"""alchemy-scope-litestar: the shared scenarios, plus what is Litestar's own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import httpx
import litestar.di
import pytest
from litestar import Litestar, MediaType, Request, Response, WebSocket, get, post, websocket
from litestar.background_tasks import BackgroundTask
from litestar.di import Provide
from litestar.exceptions import HTTPException, ImproperlyConfiguredException, WebSocketDisconnect
from litestar.params import Body
from litestar.response import Stream
from litestar.types import ASGIApp, ExceptionHandlersMap
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from websockets.asyncio.client import connect

from alchemy_scope import (
    ConcurrentSessionUseError,
    Database,
    NoScopeError,
    Scope,
    ScopeMiddleware,
    current_scope,
)
from alchemy_scope_litestar import AlchemyScopePlugin

from ..models import Item
from ..servers import uvicorn_server
from ..support import (
    add_write_that_fails_at_commit,
    assert_no_leaks,
    idle_connections,
    item_names,
    run_readme_app,
)
from .scenarios import AnsweredError, ValidationScenarios, asgi_client, lifespanless_client

if TYPE_CHECKING or hasattr(litestar.di, "NamedDependency"):
    from litestar.di import NamedDependency
else:  # Litestar < 2.23 injects by the parameter's name alone

    class NamedDependency:
        def __class_getitem__(cls, annotation: Any) -> Any:
            return annotation


@dataclass
class NewItem:
    name: str
    copies: int


def make_litestar_app(
    db: Database,
    *more_handlers: Any,
    plugins: list[AlchemyScopePlugin] | None = None,
    exception_handlers: ExceptionHandlersMap | None = None,
    **options: Any,
) -> Litestar:
    """The scenario routes (and ``more_handlers``) as a Litestar app with the plugin(s)."""

    def helper_a() -> AsyncSession:
        return db.session

    def helper_b() -> AsyncSession:
        return db.session

    @get("/ping", media_type=MediaType.TEXT)
    async def ping() -> str:
        return "pong"

    @post("/items/{name:str}")
    async def create_item(
        request: Request[Any, Any, Any], db_session: NamedDependency[AsyncSession]
    ) -> Response[dict[str, int]]:
        db_session.add(Item(name=request.path_params["name"]))
        await db_session.flush()
        if request.query_params.get("commit") == "1":
            await db_session.commit()
        status = int(request.query_params.get("status", "201"))
        return Response({"session": id(db_session)}, status_code=status)

    @post("/items/{name:str}/fail")
    async def fail(request: Request[Any, Any, Any]) -> None:
        db.session.add(Item(name=request.path_params["name"]))
        await db.session.flush()
        raise RuntimeError("handler failed")

    @post("/items/{name:str}/refused")
    async def refused(request: Request[Any, Any, Any]) -> None:
        db.session.add(Item(name=request.path_params["name"]))
        await db.session.flush()
        raise HTTPException(status_code=int(request.query_params["status"]))

    @post("/items/{name:str}/answered")
    async def answered(request: Request[Any, Any, Any]) -> None:
        db.session.add(Item(name=request.path_params["name"]))
        await db.session.flush()
        raise AnsweredError

    def answer(_request: Request[Any, Any, Any], _exc: Exception) -> Response[str]:
        return Response("answered", status_code=200, media_type=MediaType.TEXT)

    async def attempt() -> None:
        db.session.add(Item(name="attempt"))
        await db.session.flush()

    @post("/validated", dependencies={"attempted": Provide(attempt)})
    async def validated(
        data: Annotated[NewItem, Body()], attempted: NamedDependency[None]
    ) -> dict[str, int]:
        return {"copies": data.copies}

    @get("/identity")
    async def identity(db_session: NamedDependency[AsyncSession]) -> dict[str, Any]:
        first = helper_a()
        await asyncio.sleep(0.05)
        same = first is helper_b() is db.session is db_session
        return {"same": same, "session": id(first)}

    @get("/stream")
    async def stream(request: Request[Any, Any, Any]) -> Stream:
        count = int(request.query_params.get("n", "3"))
        delay = float(request.query_params.get("delay", "0"))

        async def lines() -> AsyncIterator[str]:
            for _ in range(count):
                items = await db.session.scalar(select(func.count()).select_from(Item))
                yield f"{id(db.session)} {items}\n"
                await asyncio.sleep(delay)

        return Stream(lines(), media_type=MediaType.TEXT)

    @post("/background/{name:str}", status_code=202)
    async def background(request: Request[Any, Any, Any]) -> Response[None]:
        request_session = db.session
        name = request.path_params["name"]

        async def job() -> None:
            suffix = "same" if db.session is request_session else "own"
            db.session.add(Item(name=f"{name}-{suffix}"))
            await db.session.commit()

        return Response(None, status_code=202, background=BackgroundTask(job))

    @post("/orphan")
    async def orphan() -> dict[str, bool]:
        add_write_that_fails_at_commit(db.session)
        await db.session.flush()
        return {"created": True}

    @websocket("/ws")
    async def ws(socket: WebSocket[Any, Any, Any]) -> None:
        await socket.accept()
        try:
            while True:
                name = await socket.receive_text()
                db.session.add(Item(name=name))
                await db.session.commit()
                await socket.send_text(str(id(db.session)))
        except WebSocketDisconnect:
            pass

    @websocket("/ws-fail")
    async def ws_fail(socket: WebSocket[Any, Any, Any]) -> None:
        await socket.accept()
        db.session.add(Item(name=await socket.receive_text()))
        await db.session.flush()
        await socket.send_text("flushed")
        raise RuntimeError("websocket handler failed")

    return Litestar(
        route_handlers=[
            *(ping, create_item, fail, refused, answered, validated, identity, stream),
            *(background, orphan, ws, ws_fail, *more_handlers),
        ],
        plugins=plugins or [AlchemyScopePlugin(db)],
        exception_handlers={AnsweredError: answer, **(exception_handlers or {})},
        debug=False,
        **options,
    )


def litestar_client(app: Litestar) -> AbstractAsyncContextManager[httpx.AsyncClient]:
    """``asgi_client`` for a Litestar app."""
    return asgi_client(app)


class TestLitestar(ValidationScenarios):
    make_app = staticmethod(make_litestar_app)
    background_in_request_scope = True
    install_advice = "AlchemyScopePlugin(db, other_db)"
    invalid_status = 400

    @staticmethod
    def install_twice(db: Database) -> None:
        make_litestar_app(
            db, plugins=[AlchemyScopePlugin(db), AlchemyScopePlugin(db, dependency_key="other")]
        )


async def count_through_the_session(db: Database) -> int:
    """Count the items with ``db.session``; the query awaits the database, so tasks interleave."""
    return int(await db.session.scalar(select(func.count()).select_from(Item)) or 0)


def parallel_dependencies_app(db: Database, **plugin_options: Any) -> Litestar:
    """An app whose ``/parallel`` route has two independent dependencies that both query."""

    async def first_count() -> int:
        return await count_through_the_session(db)

    async def second_count() -> int:
        return await count_through_the_session(db)

    @get(
        "/parallel",
        dependencies={"first": Provide(first_count), "second": Provide(second_count)},
    )
    async def parallel(first: NamedDependency[int], second: NamedDependency[int]) -> list[int]:
        return [first, second]

    def conflict(_request: Request[Any, Any, Any], exc: Exception) -> Response[str]:
        return Response(type(exc).__name__, status_code=409)

    return make_litestar_app(
        db,
        parallel,
        plugins=[AlchemyScopePlugin(db, **plugin_options)],
        exception_handlers={ConcurrentSessionUseError: conflict},
    )


async def test_independent_dependencies_take_turns_on_the_session(db: Database) -> None:
    """By default, two dependencies Litestar resolves concurrently both query the one session."""
    async with litestar_client(parallel_dependencies_app(db)) as client:
        responses = await asyncio.gather(*(client.get("/parallel") for _ in range(5)))
    assert [r.status_code for r in responses] == [200] * 5
    assert all(r.json() == [0, 0] for r in responses)


async def test_without_serialize_independent_dependencies_collide(db: Database) -> None:
    """serialize=False: Litestar really runs the two dependencies at once, and they collide."""
    # The collision cancels the other dependency; with a warm pool that is never mid-connect,
    # where aiosqlite would leave the connection it was opening unclosed.
    async with db.engine.connect():
        pass
    async with litestar_client(parallel_dependencies_app(db, serialize=False)) as client:
        response = await client.get("/parallel")
    assert (response.status_code, response.text) == (409, "ConcurrentSessionUseError")


async def test_dependencies_and_handlers_get_the_request_session(db: Database) -> None:
    """The injected session is db.session, also in a dependency that depends on it."""

    async def session_of_a_dependency(db_session: NamedDependency[AsyncSession]) -> AsyncSession:
        return db_session

    @get("/injected", dependencies={"nested": Provide(session_of_a_dependency)})
    async def injected(
        db_session: NamedDependency[AsyncSession], nested: NamedDependency[AsyncSession]
    ) -> dict[str, bool]:
        return {"same": db_session is nested is db.session}

    async with litestar_client(make_litestar_app(db, injected)) as client:
        response = await client.get("/injected")
    assert response.json() == {"same": True}


async def test_the_dependency_key_is_configurable(db: Database) -> None:
    """dependency_key names the injected session; None registers no dependency at all."""

    @get("/named")
    async def named(session: NamedDependency[AsyncSession]) -> dict[str, bool]:
        return {"same": session is db.session}

    app = Litestar([named], plugins=[AlchemyScopePlugin(db, dependency_key="session")])
    async with litestar_client(app) as client:
        assert (await client.get("/named")).json() == {"same": True}
    plain = Litestar(plugins=[AlchemyScopePlugin(db, dependency_key=None)])
    assert "db_session" not in plain.dependencies
    assert "session" not in plain.dependencies


def test_misuse_raises_errors_that_say_what_to_do() -> None:
    """A non-Database or a taken dependency name fails when the plugin or the app is built."""
    db = Database("sqlite+aiosqlite://")  # never connects
    url: Any = "sqlite+aiosqlite:///app.db"  # a URL where the Database belongs: the misuse tested
    with pytest.raises(TypeError, match=r"alchemy_scope\.Database"):
        AlchemyScopePlugin(url)
    with pytest.raises(ImproperlyConfiguredException, match="dependency_key="):
        Litestar(
            dependencies={"db_session": Provide(count_through_the_session)},
            plugins=[AlchemyScopePlugin(db)],
        )


async def test_scopes_open_with_the_lifespan_once_however_often_it_runs(db: Database) -> None:
    """Before the lifespan no scope opens (NoScopeError names it); two lifespans wrap once."""

    @get("/scope")
    async def scope_of_request() -> dict[str, Any]:
        try:
            current = current_scope()
        except NoScopeError as error:
            return {"error": str(error)}
        return {"nested": current.parent is not None, "same": db.session is db.session}

    app = Litestar([scope_of_request], plugins=[AlchemyScopePlugin(db)])
    async with lifespanless_client(app) as client:
        assert "`with TestClient(app) as client:`" in (await client.get("/scope")).json()["error"]
    for _ in range(2):
        async with litestar_client(app) as client:
            assert (await client.get("/scope")).json() == {"nested": False, "same": True}
    assert isinstance(app.asgi_handler, ScopeMiddleware)
    assert not isinstance(app.asgi_handler.app, ScopeMiddleware)
    await assert_no_leaks(db)


async def test_middleware_exception_handlers_and_hooks_run_inside_the_scope(db: Database) -> None:
    """User middleware, exception handlers and after_response hooks see the request's session."""
    seen: list[tuple[str, int]] = []

    def recording_middleware(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Any, receive: Any, send: Any) -> None:
            seen.append(("middleware", id(db.session)))
            await app(scope, receive, send)
            seen.append(("middleware after", id(db.session)))

        return middleware

    async def record_after_response(_request: Request[Any, Any, Any]) -> None:
        seen.append(("after_response", id(db.session)))

    def handle_value_error(_request: Request[Any, Any, Any], exc: Exception) -> Response[str]:
        seen.append(("exception handler", id(db.session)))  # Litestar calls these sync
        return Response(str(exc), status_code=422)

    @post("/refused")
    async def refused() -> None:
        seen.append(("handler", id(db.session)))
        raise ValueError("refused")

    app = make_litestar_app(
        db,
        refused,
        middleware=[recording_middleware],
        exception_handlers={ValueError: handle_value_error},
        after_response=record_after_response,
    )
    async with litestar_client(app) as client:
        response = await client.post("/refused")
        assert (response.status_code, response.text) == (422, "refused")
        failed, seen[:] = list(seen), []
        session = (await client.post("/items/ok")).json()["session"]
    assert [where for where, _ in failed] == [
        "middleware",
        "handler",
        "exception handler",
        "middleware after",
    ]
    assert len({session for _, session in failed}) == 1
    assert seen == [
        ("middleware", session),
        ("after_response", session),
        ("middleware after", session),
    ]


async def test_shutdown_hooks_and_lifespans_run_before_the_engine_is_disposed(
    db: Database,
) -> None:
    """The app's own lifespan and on_shutdown hooks can use the engine; then it is disposed."""
    events: list[str] = []

    async def pooled() -> int:
        async with db.scope():
            await count_through_the_session(db)
        return idle_connections(db)

    @asynccontextmanager
    async def lifespan(_app: Litestar) -> AsyncIterator[None]:
        yield
        events.append(f"lifespan exit, pool has {await pooled()}")

    async def on_shutdown() -> None:
        events.append(f"on_shutdown, pool has {await pooled()}")

    app = make_litestar_app(db, lifespan=[lifespan], on_shutdown=[on_shutdown])
    async with litestar_client(app) as client:
        assert (await client.get("/ping")).text == "pong"
    assert events == ["lifespan exit, pool has 1", "on_shutdown, pool has 1"]
    assert idle_connections(db) == 0


async def test_a_handler_exception_reaches_the_scope_as_a_500_status(
    autocommit_db: Database,
) -> None:
    """Litestar answers an exception with its 500 inside the middleware; the scope is failed."""
    db = autocommit_db
    scopes: list[Scope] = []

    @post("/broken")
    async def broken() -> None:
        scopes.append(current_scope())
        db.session.add(Item(name="broken"))
        await db.session.flush()
        raise RuntimeError("broken")

    async with litestar_client(make_litestar_app(db, broken)) as client:
        assert (await client.post("/broken")).status_code == 500
    [scope] = scopes
    assert (scope.status, scope.failed, scope.closed) == (500, True, True)
    assert await item_names(db) == []


async def test_a_websocket_that_lets_the_disconnect_escape_commits_nothing(
    autocommit_db: Database,
) -> None:
    """Through a real server: a websocket that re-raises the disconnect commits nothing."""
    db = autocommit_db

    @websocket("/ws/{name:str}")
    async def write_then(socket: WebSocket[Any, Any, Any]) -> None:
        await socket.accept()
        name = socket.path_params["name"]
        db.session.add(Item(name=name))
        await db.session.flush()
        await socket.send_text("written")
        try:
            await socket.receive_text()
        except WebSocketDisconnect:
            if name == "uncaught":
                raise

    async with uvicorn_server(make_litestar_app(db, write_then)) as url:
        for name in ("uncaught", "returns"):
            async with connect(f"{url.replace('http', 'ws')}/ws/{name}") as client:
                assert await client.recv() == "written"
        await assert_no_leaks(db)
    assert await item_names(db) == ["returns"]


@pytest.mark.skipif(
    not hasattr(litestar.di, "NamedDependency"),
    reason="the README app annotates with NamedDependency, which Litestar 2.23 added",
)
async def test_the_readme_app_works_when_copied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's app, run as copied, counts visits through DI and db.session."""
    monkeypatch.chdir(tmp_path)  # its SQLite file lands where a user would run it
    readme = run_readme_app("adapters/litestar/README.md")
    async with litestar_client(readme["app"]) as client:
        for expected in (1, 2, 3):
            response = await client.post("/visits")
            assert (response.status_code, response.json()) == (201, expected)
    await assert_no_leaks(readme["db"])
    assert readme["db"].engine.pool.checkedin() == 0


@pytest.fixture
def alchemy_database(db: Database) -> Database:
    """The Database of the pytest plugin's fixtures: this leg's."""
    return db


async def test_requests_join_the_transaction_of_the_pytest_plugin(alchemy_db: Database) -> None:
    """Under alchemy_db, requests and their parallel dependencies use the test's transaction."""
    async with litestar_client(parallel_dependencies_app(alchemy_db)) as client:
        assert (await client.post("/items/inside?commit=1")).status_code == 201
        responses = await asyncio.gather(*(client.get("/parallel") for _ in range(3)))
    assert [r.json() for r in responses] == [[1, 1]] * 3
    async with alchemy_db.scope():
        assert await count_through_the_session(alchemy_db) == 1
    assert await item_names(alchemy_db) == []  # committed only inside the test's transaction
