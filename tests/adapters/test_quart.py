"""alchemy-scope-quart: the shared scenarios in production and testing mode, plus Quart's own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from quart import Quart, Response, abort, redirect, request, websocket
from quart.signals import got_background_exception
from sqlalchemy import func, literal, select
from sqlalchemy.ext.asyncio import AsyncSession
from werkzeug.exceptions import InternalServerError
from werkzeug.wrappers import Response as WerkzeugResponse

from alchemy_scope import Database, ScopeClosedError
from alchemy_scope_quart import AlchemyScope

from ..conftest import MakeDatabase
from ..models import Item
from ..servers import hypercorn_server
from ..support import (
    add_write_that_fails_at_commit,
    assert_no_leaks,
    idle_connections,
    item_names,
    registry,
    run_readme_app,
)
from .scenarios import AdapterScenarios, AnsweredError, asgi_client


def make_quart_app(
    db: Database,
    *,
    testing: bool = False,
    alchemy: AlchemyScope | None = None,
    serialize: bool = False,
) -> Quart:
    """The scenario routes as a Quart app, installed as the README shows.

    Args:
        db: The database the routes use.
        testing: Quart's testing mode, in which exceptions propagate out of the views.
        alchemy: An extension to install with ``init_app``; by default a new one is made with
            ``AlchemyScope(app, db, serialize=serialize)``.
        serialize: The ``serialize`` option of that new extension.
    """
    app = Quart(__name__)
    app.testing = testing
    if alchemy is None:
        alchemy = AlchemyScope(app, db, serialize=serialize)
    else:
        alchemy.init_app(app, db)

    def helper_a() -> AsyncSession:
        return db.session

    def helper_b() -> AsyncSession:
        return db.session

    @app.get("/ping")
    async def ping() -> str:
        return "pong"

    @app.post("/items/<name>")
    async def create_item(name: str) -> tuple[dict[str, int], int]:
        db.session.add(Item(name=name))
        await db.session.flush()
        if request.args.get("commit") == "1":
            await db.session.commit()
        return {"session": id(db.session)}, int(request.args.get("status", "201"))

    @app.post("/items/<name>/fail")
    async def fail(name: str) -> str:
        db.session.add(Item(name=name))
        await db.session.flush()
        raise RuntimeError("handler failed")

    @app.post("/items/<name>/refused")
    async def refused(name: str) -> str:
        db.session.add(Item(name=name))
        await db.session.flush()
        abort(int(request.args["status"]))

    @app.post("/items/<name>/answered")
    async def answered(name: str) -> str:
        db.session.add(Item(name=name))
        await db.session.flush()
        raise AnsweredError

    @app.errorhandler(AnsweredError)
    async def answer(_error: AnsweredError) -> tuple[str, int]:
        return "answered", 200

    @app.get("/identity")
    async def identity() -> dict[str, Any]:
        first = helper_a()
        await asyncio.sleep(0.05)
        same = first is helper_b() is db.session
        return {"same": same, "session": id(first)}

    @app.get("/stream")
    async def stream() -> Response:
        count = int(request.args.get("n", "3"))
        delay = float(request.args.get("delay", "0"))

        async def lines() -> AsyncIterator[str]:
            for _ in range(count):
                items = await db.session.scalar(select(func.count()).select_from(Item))
                yield f"{id(db.session)} {items}\n"
                await asyncio.sleep(delay)

        return Response(lines(), mimetype="text/plain")

    @app.post("/background/<name>")
    async def background(name: str) -> tuple[str, int]:
        request_session = db.session

        async def job() -> None:
            suffix = "same" if db.session is request_session else "own"
            db.session.add(Item(name=f"{name}-{suffix}"))
            await db.session.commit()

        alchemy.add_background_task(job)
        return "", 202

    @app.post("/orphan")
    async def orphan() -> tuple[dict[str, bool], int]:
        add_write_that_fails_at_commit(db.session)
        await db.session.flush()
        return {"created": True}, 201

    @app.websocket("/ws")
    async def ws() -> None:
        while True:
            name = await websocket.receive()
            db.session.add(Item(name=name))
            await db.session.commit()
            await websocket.send(str(id(db.session)))

    @app.websocket("/ws-fail")
    async def ws_fail() -> None:
        db.session.add(Item(name=await websocket.receive()))
        await db.session.flush()
        await websocket.send("flushed")
        raise RuntimeError("websocket handler failed")

    return app


class QuartScenarios(AdapterScenarios):
    """What Quart's two modes share."""

    background_in_request_scope = False
    serve = staticmethod(hypercorn_server)
    install_advice = "AlchemyScope(app, db, other_db)"

    @staticmethod
    def install_twice(db: Database) -> None:
        AlchemyScope(make_quart_app(db), db)


class TestQuart(QuartScenarios):
    """Production mode: Quart turns an exception into its 500 before the middleware sees it."""

    make_app = staticmethod(make_quart_app)


class TestQuartTesting(QuartScenarios):
    """Testing mode: by Quart version, an exception reaches the middleware or becomes a 500."""

    make_app = staticmethod(partial(make_quart_app, testing=True))


# Which setting lets a view's exception out of app.asgi_app (instead of Quart's traceback 500)
# changed with pallets/quart#383: testing mode up to 0.20, PROPAGATE_EXCEPTIONS from 0.21 on
# (0.21 lets it out in both).
QUART_PROPAGATES_BY_CONFIG = tuple(int(part) for part in version("quart").split(".")[:2]) >= (0, 21)


async def test_an_exception_that_leaves_quart_rolls_back(autocommit_db: Database) -> None:
    """A view's exception that reaches the middleware (no status seen) commits nothing."""
    app = make_quart_app(autocommit_db, testing=not QUART_PROPAGATES_BY_CONFIG)
    if QUART_PROPAGATES_BY_CONFIG:
        app.config["PROPAGATE_EXCEPTIONS"] = True
    with pytest.raises(Exception) as raised:  # noqa: PT011 - the view's error, maybe in a group
        await app.test_client().post("/items/doomed/fail")
    # Quart 0.23 runs a request in an asyncio.TaskGroup, which wraps the error in a group.
    error = raised.value.exceptions[0] if hasattr(raised.value, "exceptions") else raised.value
    assert repr(error) == "RuntimeError('handler failed')"
    assert await item_names(autocommit_db) == []
    async with asgi_client(app) as client:
        assert (await client.post("/items/doomed/fail")).status_code == 500
    assert await item_names(autocommit_db) == []


async def test_test_app_runs_after_serving_which_disposes_after_background_tasks(
    db: Database,
) -> None:
    """app.test_app(): shutdown waits for scoped background jobs, then disposes the engine."""
    app = make_quart_app(db)

    @app.post("/slow-background")
    async def slow_background() -> tuple[str, int]:
        async def job() -> None:
            await asyncio.sleep(0.2)
            db.session.add(Item(name="late"))
            await db.session.commit()

        app.extensions["alchemy_scope"].add_background_task(job)
        return "", 202

    async with app.test_app() as test_app:
        client = test_app.test_client()
        assert (await client.post("/items/early?commit=1")).status_code == 201
        assert (await client.post("/slow-background")).status_code == 202
        assert idle_connections(db) == 1
    assert idle_connections(db) == 0
    assert await item_names(db) == ["early", "late"]


async def test_init_app_installs_one_extension_in_several_apps(make_db: MakeDatabase) -> None:
    """An app factory's shared AlchemyScope serves each app and disposes only that app's db."""
    alchemy = AlchemyScope()
    first_db, second_db = make_db(), make_db()
    first = make_quart_app(first_db, alchemy=alchemy)
    second = make_quart_app(second_db, alchemy=alchemy)
    async with asgi_client(first) as first_client:
        assert (await first_client.post("/items/first?commit=1")).status_code == 201
        async with asgi_client(second) as second_client:
            assert (await second_client.post("/items/second?commit=1")).status_code == 201
            assert (await second_client.post("/background/job")).status_code == 202
        assert idle_connections(second_db) == 0
        assert idle_connections(first_db) == 1
    assert idle_connections(first_db) == 0
    assert await item_names(first_db) == ["first", "second", "job-own"]


async def test_an_error_handler_that_hides_the_500_still_rolls_back(
    autocommit_db: Database,
) -> None:
    """A view that raised is rolled back even when an error handler answers a redirect."""
    app = make_quart_app(autocommit_db)

    @app.errorhandler(InternalServerError)
    async def to_apology(_error: InternalServerError) -> WerkzeugResponse:
        return redirect("/ping")

    async with asgi_client(app) as client:
        assert (await client.post("/items/doomed/fail")).status_code == 302
    assert await item_names(autocommit_db) == []


async def test_serialize_lets_tasks_of_a_request_take_turns(db: Database) -> None:
    """serialize=True: two tasks of one request wait for each other; by default that is a 500."""
    outcomes = []
    for serialize in (False, True):
        app = make_quart_app(db, serialize=serialize)

        @app.get("/gather")
        async def gather() -> dict[str, list[int | None]]:
            results = await asyncio.gather(*(db.session.scalar(select(literal(n))) for n in (1, 2)))
            return {"results": list(results)}

        async with asgi_client(app) as client:
            outcomes.append((await client.get("/gather")).status_code)
    assert outcomes == [500, 200]


def test_a_database_in_place_of_the_app_is_refused(db: Database) -> None:
    """AlchemyScope(db) raises a TypeError that shows the app-first call."""
    misplaced: Any = db  # a Database where the app belongs: the misuse tested
    with pytest.raises(TypeError, match=r"AlchemyScope\(app, db\)"):
        AlchemyScope(misplaced)


async def test_plain_add_background_task_fails_loudly_and_leaks_nothing(db: Database) -> None:
    """Quart's own add_background_task keeps the ended request scope: db.session raises."""
    app = make_quart_app(db)
    request_ended = asyncio.Event()
    errors: list[Exception] = []

    async def record(_app: Quart, exception: Exception) -> None:
        errors.append(exception)

    @app.post("/plain-background")
    async def plain_background() -> tuple[str, int]:
        async def job() -> None:
            await request_ended.wait()
            db.session.add(Item(name="never written"))
            await db.session.commit()

        app.add_background_task(job)
        return "", 202

    with got_background_exception.connected_to(record, app):
        async with asgi_client(app) as client:
            assert (await client.post("/plain-background")).status_code == 202
            request_ended.set()
    assert len(errors) == 1
    assert isinstance(errors[0], ScopeClosedError)
    assert registry(db) == {}
    await assert_no_leaks(db)
    assert await item_names(db) == []


async def test_the_readme_app_works_when_copied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's complete app creates its table at startup and writes through db.session."""
    monkeypatch.chdir(tmp_path)  # its SQLite file lands where a user would run it
    namespace = run_readme_app("adapters/quart/README.md")
    app: Quart = namespace["app"]
    async with app.test_app() as test_app:
        client = test_app.test_client()
        assert (await (await client.post("/notes/hello")).get_json()) == {"notes": 1}
        assert (await (await client.post("/notes/again")).get_json()) == {"notes": 2}
        await assert_no_leaks(namespace["db"])
