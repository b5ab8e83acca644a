"""alchemy-scope-fastapi: the shared scenarios, plus what is FastAPI's own."""

import asyncio
import importlib
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any, ClassVar

import fastapi
import pytest
from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException, WebSocket
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.applications import Starlette
from starlette.middleware.base import DispatchFunction
from starlette.requests import Request
from starlette.websockets import WebSocketDisconnect

from alchemy_scope import Database
from alchemy_scope_fastapi import NotInstalledError, SessionDep, install, session_dependency

from ..conftest import MakeDatabase
from ..models import Item
from ..support import (
    add_write_that_fails_at_commit,
    assert_no_leaks,
    item_names,
    readme_code,
)
from .scenarios import AnsweredError, ValidationScenarios, asgi_client, lifespanless_client
from .test_starlette import MiddlewareOrderScenarios


class NewItem(BaseModel):
    name: str
    copies: int


def make_fastapi_app(db: Database) -> FastAPI:
    """The scenario routes as a FastAPI app, installed as the README shows.

    The handler of AnsweredError is sync (FastAPI runs it in a thread); Starlette's is async.
    """
    app = FastAPI()
    install(app, db)

    def answer(_request: Request, _exc: Exception) -> PlainTextResponse:
        return PlainTextResponse("answered")

    app.add_exception_handler(AnsweredError, answer)

    async def attempt() -> None:
        db.session.add(Item(name="attempt"))
        await db.session.flush()

    def helper_a() -> AsyncSession:
        return db.session

    def helper_b() -> AsyncSession:
        return db.session

    @app.get("/ping", response_class=PlainTextResponse)
    async def ping() -> str:
        return "pong"

    @app.post("/items/{name}")
    async def create_item(
        name: str, session: SessionDep, commit: int = 0, status: int = 201
    ) -> JSONResponse:
        session.add(Item(name=name))
        await session.flush()
        if commit:
            await session.commit()
        return JSONResponse({"session": id(db.session)}, status_code=status)

    @app.post("/items/{name}/fail")
    async def fail(name: str) -> None:
        db.session.add(Item(name=name))
        await db.session.flush()
        raise RuntimeError("handler failed")

    @app.post("/items/{name}/refused")
    async def refused(name: str, status: int) -> None:
        db.session.add(Item(name=name))
        await db.session.flush()
        raise HTTPException(status_code=status)

    @app.post("/items/{name}/answered")
    async def answered(name: str) -> None:
        db.session.add(Item(name=name))
        await db.session.flush()
        raise AnsweredError

    @app.post("/validated", status_code=201, dependencies=[Depends(attempt)])
    async def validated(new: NewItem) -> dict[str, int]:
        return {"copies": new.copies}

    @app.get("/identity")
    async def identity(session: SessionDep) -> dict[str, object]:
        first = helper_a()
        await asyncio.sleep(0.05)
        same = first is helper_b() is db.session is session
        return {"same": same, "session": id(first)}

    @app.get("/stream")
    async def stream(n: int = 3, delay: float = 0) -> StreamingResponse:
        async def lines() -> AsyncIterator[str]:
            for _ in range(n):
                items = await db.session.scalar(select(func.count()).select_from(Item))
                yield f"{id(db.session)} {items}\n"
                await asyncio.sleep(delay)

        return StreamingResponse(lines(), media_type="text/plain")

    @app.post("/background/{name}", status_code=202)
    async def background(name: str, tasks: BackgroundTasks, session: SessionDep) -> None:
        async def job() -> None:
            suffix = "same" if db.session is session else "own"
            db.session.add(Item(name=f"{name}-{suffix}"))
            await db.session.commit()

        tasks.add_task(job)

    @app.post("/orphan", status_code=201)
    async def orphan() -> dict[str, bool]:
        add_write_that_fails_at_commit(db.session)
        await db.session.flush()
        return {"created": True}

    @app.websocket("/ws")
    async def ws(websocket: WebSocket, session: SessionDep) -> None:
        await websocket.accept()
        try:
            while True:
                name = await websocket.receive_text()
                session.add(Item(name=name))
                await session.commit()
                await websocket.send_text(str(id(db.session)))
        except WebSocketDisconnect:
            pass

    @app.websocket("/ws-fail")
    async def ws_fail(websocket: WebSocket) -> None:
        await websocket.accept()
        db.session.add(Item(name=await websocket.receive_text()))
        await db.session.flush()
        await websocket.send_text("flushed")
        raise RuntimeError("websocket handler failed")

    return app


class TestFastAPI(ValidationScenarios):
    make_app = staticmethod(make_fastapi_app)
    background_in_request_scope = True
    install_advice = "install(app, db, other_db)"
    invalid_status = 422

    @staticmethod
    def install_twice(db: Database) -> None:
        install(make_fastapi_app(db), db)


class TestFastAPIMiddlewareOrder(MiddlewareOrderScenarios):
    app_class: ClassVar[type[Starlette]] = FastAPI
    install = staticmethod(install)

    @staticmethod
    def add_dispatch_function(app: Starlette, dispatch: DispatchFunction) -> None:
        """FastAPI's ``@app.middleware("http")`` decorator."""
        assert isinstance(app, FastAPI)
        app.middleware("http")(dispatch)


async def test_session_dependency_gives_each_database_its_own_session(
    make_db: MakeDatabase,
) -> None:
    """SessionDep gives the first installed database's session, session_dependency(db) any."""
    first, second = make_db(commit="autocommit"), make_db(commit="autocommit")
    app = FastAPI()
    install(app, first, second)

    @app.post("/both")
    async def both(
        session: SessionDep,
        other: Annotated[AsyncSession, Depends(session_dependency(second))],
    ) -> dict[str, bool]:
        session.add(Item(name="first"))
        other.add(Item(name="second"))
        return {"ok": session is first.session and other is second.session}

    async with asgi_client(app) as client:
        response = await client.post("/both")
    assert response.json() == {"ok": True}
    assert sorted(await item_names(first)) == ["first", "second"]  # both share one database


async def test_session_dep_without_install_says_to_call_install() -> None:
    """SessionDep in an app that install() never saw raises NotInstalledError naming the fix."""
    app = FastAPI()

    @app.get("/uses-session")
    async def uses_session(session: SessionDep) -> None:
        raise AssertionError("unreachable: the dependency fails first")

    async with lifespanless_client(app) as client:
        with pytest.raises(NotInstalledError, match=r"install\(app, db\)"):
            await client.get("/uses-session")


async def test_a_sync_dependency_sees_the_request_session(db: Database) -> None:
    """A sync dependency runs in a worker thread, yet db.session there is the request's session."""

    class Repository:
        def __init__(self) -> None:
            self.session = db.session
            self.thread = threading.get_ident()

    app = FastAPI()
    install(app, db)

    @app.get("/repository")
    async def repository(
        repo: Annotated[Repository, Depends(Repository)], session: SessionDep
    ) -> dict[str, bool]:
        in_worker_thread = repo.thread != threading.get_ident()
        return {"same": repo.session is db.session is session, "thread": in_worker_thread}

    async with asgi_client(app) as client:
        assert (await client.get("/repository")).json() == {"same": True, "thread": True}
    await assert_no_leaks(db)


async def test_a_sync_route_adds_and_autocommit_commits(autocommit_db: Database) -> None:
    """A sync route (run in a worker thread) can add() objects; autocommit commits them."""
    app = FastAPI()
    install(app, autocommit_db)

    @app.post("/sync/{name}", status_code=201)
    def add_item(name: str, session: SessionDep) -> dict[str, bool]:
        session.add(Item(name=name))
        return {"same": session is autocommit_db.session}

    async with asgi_client(app) as client:
        response = await client.post("/sync/threaded")
    assert response.status_code == 201
    assert response.json() == {"same": True}
    assert await item_names(autocommit_db) == ["threaded"]


async def test_a_yield_dependency_uses_the_session_in_its_teardown(db: Database) -> None:
    """The teardown of a yield dependency still runs in the request's scope, with its session."""
    app = FastAPI()
    install(app, db)
    seen: list[bool] = []

    async def audited(session: SessionDep) -> AsyncIterator[None]:
        yield
        seen.append(db.session is session)
        db.session.add(Item(name="audit"))
        await db.session.commit()

    @app.post("/audited/{name}", status_code=201, dependencies=[Depends(audited)])
    async def create(name: str, session: SessionDep) -> None:
        session.add(Item(name=name))
        await session.commit()

    async with asgi_client(app) as client:
        assert (await client.post("/audited/work")).status_code == 201
    assert seen == [True]
    assert await item_names(db) == ["work", "audit"]


FASTAPI_VERSION = tuple(int(part) for part in fastapi.__version__.split(".")[:2])
# Where a yield dependency exits: "function" (FastAPI 0.121+) before the response starts,
# "request" (the default) after the body and background tasks from FastAPI 0.118 on.
DEPENDENCY_SCOPES = [
    pytest.param(
        "function",
        marks=pytest.mark.skipif(
            FASTAPI_VERSION < (0, 121),
            reason=f"Depends(scope='function') came in FastAPI 0.121; {fastapi.__version__} "
            "is installed",
        ),
    ),
    "request",
]
POLICIES = ["manual", "autocommit"]


def depends(dependency: Callable[..., Any], scope: str) -> Any:
    """``Depends(dependency)``, with ``scope="function"`` when asked."""
    return Depends(dependency, scope="function") if scope == "function" else Depends(dependency)


def watched(app: Any, events: list[str], errors: list[BaseException]) -> Any:
    """``app`` as a server runs it, noting when the response starts and ends and what it raises."""

    async def watching(scope: Any, receive: Any, send: Any) -> None:
        async def send_noting(message: Any) -> None:
            await send(message)
            if message["type"] == "http.response.start":
                events.append(f"response started: {message['status']}")
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                events.append("response sent")

        try:
            await app(scope, receive, send_noting)
        except BaseException as exc:
            errors.append(exc)
            raise

    return watching


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("dependency_scope", DEPENDENCY_SCOPES)
async def test_a_yield_dependency_in_a_begin_block_commits_at_the_blocks_exit(
    make_db: MakeDatabase, policy: str, dependency_scope: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A yield dependency's begin() block is the app's: its exit commits, whatever the policy."""
    db = make_db(commit=policy)
    events: list[str] = []
    errors: list[BaseException] = []

    async def in_a_transaction() -> AsyncIterator[None]:
        async with db.session.begin():
            yield
            db.session.add(Item(name="teardown"))  # teardown, still inside the block
        events.append("block ended")
        db.session.add(Item(name="after the block"))  # the policy's again: manual drops it
        await db.session.flush()

    app = FastAPI()
    install(app, db)

    @app.post("/items", dependencies=[depends(in_a_transaction, dependency_scope)])
    async def create() -> dict[str, bool]:
        db.session.add(Item(name="route"))
        await db.session.flush()
        return {"in_block": db.session.in_transaction()}

    async with asgi_client(watched(app, events, errors)) as client:
        response = await client.post("/items")
    assert (response.status_code, response.json()) == (200, {"in_block": True})
    assert errors == []
    assert [r.getMessage() for r in caplog.records if r.name == "alchemy_scope"] == []
    committed = ["route", "teardown"] + (["after the block"] if policy == "autocommit" else [])
    assert await item_names(db) == committed
    if dependency_scope == "request" and FASTAPI_VERSION >= (0, 118):
        # The response does not wait for the block: its COMMIT runs after the body was sent.
        assert events == ["response started: 200", "response sent", "block ended"]
    else:
        assert events == ["block ended", "response started: 200", "response sent"]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("dependency_scope", DEPENDENCY_SCOPES)
async def test_a_begin_block_in_a_yield_dependency_commits_even_under_an_error_response(
    make_db: MakeDatabase, policy: str, dependency_scope: str
) -> None:
    """The block's exit decides, not the status: a route that answers 409 in it still commits."""
    db = make_db(commit=policy)

    async def in_a_transaction() -> AsyncIterator[None]:
        async with db.session.begin():
            yield

    app = FastAPI()
    install(app, db)

    @app.post("/items", dependencies=[depends(in_a_transaction, dependency_scope)])
    async def create() -> JSONResponse:
        db.session.add(Item(name="answered 409"))
        await db.session.flush()
        return JSONResponse({"conflict": True}, status_code=409)

    async with asgi_client(app) as client:
        assert (await client.post("/items")).status_code == 409
    assert await item_names(db) == ["answered 409"]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("dependency_scope", DEPENDENCY_SCOPES)
async def test_a_yield_dependency_commits_in_its_teardown_under_either_policy(
    make_db: MakeDatabase, policy: str, dependency_scope: str
) -> None:
    """A yield dependency's teardown adds and commits after the route; both writes are saved."""
    db = make_db(commit=policy)
    errors: list[BaseException] = []

    async def audited() -> AsyncIterator[None]:
        yield
        db.session.add(Item(name="audit"))
        await db.session.commit()

    app = FastAPI()
    install(app, db)

    @app.post("/items", status_code=201, dependencies=[depends(audited, dependency_scope)])
    async def create() -> None:
        db.session.add(Item(name="route"))  # not committed by the route itself
        await db.session.flush()

    async with asgi_client(watched(app, [], errors)) as client:
        assert (await client.post("/items")).status_code == 201
    assert errors == []
    assert await item_names(db) == ["route", "audit"]


@pytest.mark.parametrize("policy", POLICIES)
async def test_a_transaction_the_route_began_and_never_ended_is_rolled_back_and_logged(
    make_db: MakeDatabase, policy: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A begin() the route never ends is rolled back when the request ends, with a warning."""
    db = make_db(commit=policy)
    app = FastAPI()
    install(app, db)

    @app.post("/abandoned")
    async def abandoned() -> dict[str, bool]:
        await db.session.begin()
        db.session.add(Item(name="abandoned"))
        await db.session.flush()
        return {"ok": True}

    async with asgi_client(app) as client:
        assert (await client.post("/abandoned")).json() == {"ok": True}
    assert await item_names(db) == []
    warnings = [r for r in caplog.records if r.name == "alchemy_scope"]
    assert [r.levelname for r in warnings] == ["WARNING"]
    assert "POST /abandoned" in warnings[0].getMessage()
    assert "rolled back" in warnings[0].getMessage()


async def test_a_mounted_sub_app_uses_session_dependency(db: Database) -> None:
    """In a mounted sub-app, session_dependency(db) gives the session; SessionDep raises."""
    sub_app = FastAPI()  # it has a state of its own, without the installed databases

    @sub_app.get("/explicit")
    async def explicit(
        session: Annotated[AsyncSession, Depends(session_dependency(db))],
    ) -> dict[str, bool]:
        return {"same": session is db.session}

    @sub_app.get("/implicit")
    async def implicit(session: SessionDep) -> None:
        raise AssertionError("unreachable: the dependency fails first")

    app = FastAPI()
    install(app, db)
    app.mount("/sub", sub_app)
    async with lifespanless_client(app) as client:
        assert (await client.get("/sub/explicit")).json() == {"same": True}
        with pytest.raises(NotInstalledError):
            await client.get("/sub/implicit")
    await assert_no_leaks(db)


async def test_the_readme_app_works_when_copied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's app, saved as a module, writes with SessionDep and reads with db.session."""
    # Imported as a real module, as uvicorn would: declarative models resolve their Mapped[...]
    # annotations through sys.modules, which exec() of the code alone does not provide.
    monkeypatch.chdir(tmp_path)  # its SQLite file lands where a user would run it
    monkeypatch.syspath_prepend(tmp_path)
    (tmp_path / "readme_notes_app.py").write_text(readme_code("adapters/fastapi/README.md"))
    try:
        readme_app = importlib.import_module("readme_notes_app")
        async with asgi_client(readme_app.app) as client:
            assert (await client.post("/notes?text=hello")).json() == {"id": 1}
            assert (await client.get("/notes")).json() == ["hello"]
            await assert_no_leaks(readme_app.db)
    finally:
        sys.modules.pop("readme_notes_app", None)


def test_not_installed_error_ends_with_its_documentation_link() -> None:
    """FastAPI's own exception links to its section of the errors page, as the core's do."""
    message = str(NotInstalledError())
    assert message.endswith(NotInstalledError.documentation())
    assert NotInstalledError.documentation().endswith("errors/#notinstallederror")
