"""alchemy-scope-fastapi: the shared scenarios, plus what is FastAPI's own."""

import asyncio
import importlib
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, ClassVar

import httpx
import pytest
from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException, WebSocket
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.applications import Starlette
from starlette.middleware.base import DispatchFunction
from starlette.websockets import WebSocketDisconnect

from alchemy_scope import AlreadyInstalledError, Database
from alchemy_scope_fastapi import NotInstalledError, SessionDep, install, session_dependency

from ..conftest import MakeDatabase
from ..models import Item
from ..support import (
    add_write_that_fails_at_commit,
    assert_no_leaks,
    item_names,
    readme_code,
)
from .scenarios import AdapterScenarios, asgi_client
from .test_starlette import MiddlewareOrderScenarios


def make_fastapi_app(db: Database) -> FastAPI:
    """The scenario routes as a FastAPI app, installed as the README shows."""
    app = FastAPI()
    install(app, db)

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


class TestFastAPI(AdapterScenarios):
    make_app = staticmethod(make_fastapi_app)
    background_in_request_scope = True


class TestFastAPIMiddlewareOrder(MiddlewareOrderScenarios):
    app_class: ClassVar[type[Starlette]] = FastAPI
    install = staticmethod(install)

    @staticmethod
    def add_dispatch_function(app: Starlette, dispatch: DispatchFunction) -> None:
        """FastAPI's ``@app.middleware("http")`` decorator."""
        assert isinstance(app, FastAPI)
        app.middleware("http")(dispatch)


def test_install_twice_raises_a_clear_error(db: Database) -> None:
    """A second install() on one FastAPI app raises AlreadyInstalledError: pass every db once."""
    app = make_fastapi_app(db)
    with pytest.raises(AlreadyInstalledError, match=r"install\(app, db, other_db\)"):
        install(app, db)


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

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
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


async def test_an_http_exception_rolls_back_with_autocommit(autocommit_db: Database) -> None:
    """An HTTPException's 4xx response rolls back what the route wrote, under autocommit."""
    app = FastAPI()
    install(app, autocommit_db)

    @app.post("/conflict/{name}")
    async def conflict(name: str, session: SessionDep) -> None:
        session.add(Item(name=name))
        await session.flush()
        raise HTTPException(status_code=409, detail="already there")

    async with asgi_client(app) as client:
        response = await client.post("/conflict/clash")
    assert response.status_code == 409
    assert response.json() == {"detail": "already there"}
    assert await item_names(autocommit_db) == []


async def test_a_validation_error_writes_nothing(autocommit_db: Database) -> None:
    """A 422 rolls back what dependencies added before FastAPI validated the request."""
    app = FastAPI()
    install(app, autocommit_db)

    def log_attempt() -> None:
        autocommit_db.session.add(Item(name="attempt"))

    @app.post("/count", dependencies=[Depends(log_attempt)])
    async def count(number: int) -> dict[str, int]:
        return {"number": number}

    async with asgi_client(app) as client:
        assert (await client.post("/count?number=many")).status_code == 422
        assert await item_names(autocommit_db) == []
        # The same dependency's write is committed when the request is valid.
        assert (await client.post("/count?number=7")).json() == {"number": 7}
    assert await item_names(autocommit_db) == ["attempt"]


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
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
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
