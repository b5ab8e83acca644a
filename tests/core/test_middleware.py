"""ScopeMiddleware on a bare ASGI app: no framework, only the ASGI protocol."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import OperationalError

from alchemy_scope import Database, ScopeMiddleware, UnwatchedDatabaseError, current_scope

from ..models import Item
from ..support import (
    add_write_that_fails_at_commit,
    checked_out_connections,
    count_items,
    idle_connections,
    item_names,
    leaks,
    registry,
    run_readme_app,
)

Message = MutableMapping[str, Any]
Handler = Callable[[dict[str, Any]], Awaitable[tuple[int, bytes]]]


def asgi_app(handler: Handler) -> Any:
    """A bare ASGI app whose HTTP response is ``handler(scope)``; records lifespan scopes."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            # An attribute of the function object, which mypy does not track:
            app.lifespan_scopes.append(current_scope_or_none())  # type: ignore[attr-defined]
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        status, body = await handler(scope)
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": body})

    app.lifespan_scopes = []  # type: ignore[attr-defined]  # see above
    return app


def current_scope_or_none() -> object:
    try:
        return current_scope()
    except LookupError:
        return None


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def test_each_request_gets_its_own_scope_and_session(db: Database) -> None:
    """Two requests never see the same scope or session, and both are ended."""
    seen: list[tuple[object, object]] = []

    async def handler(_scope: dict[str, Any]) -> tuple[int, bytes]:
        seen.append((current_scope(), db.session))
        await db.session.execute(text("SELECT 1"))
        return 200, b"ok"

    async with client(ScopeMiddleware(asgi_app(handler))) as http:
        await asyncio.gather(http.get("/"), http.get("/"))
    assert seen[0][0] is not seen[1][0]
    assert seen[0][1] is not seen[1][1]
    assert registry(db) == {}


async def test_a_request_that_never_uses_the_database_opens_nothing(db: Database) -> None:
    """A route that never touches db.session creates no session and checks out nothing."""

    async def handler(_scope: dict[str, Any]) -> tuple[int, bytes]:
        assert checked_out_connections(db) == 0
        return 200, b"pong"

    async with client(ScopeMiddleware(asgi_app(handler))) as http:
        assert (await http.get("/ping")).text == "pong"
    assert registry(db) == {}
    assert idle_connections(db) == 0


async def test_lifespan_passes_through_without_a_scope() -> None:
    """The lifespan protocol reaches the app untouched and outside any scope."""
    # The lifespan never reaches the handler: a do-nothing stand-in, not a real one.
    app = asgi_app(lambda _s: None)  # type: ignore[arg-type,return-value]
    received: list[Message] = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[Message] = []

    async def receive() -> Message:
        return received.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    await ScopeMiddleware(app)({"type": "lifespan"}, receive, send)
    assert app.lifespan_scopes == [None]
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


@pytest.mark.parametrize(
    ("status", "commit_on_redirect", "committed"),
    [
        (200, True, True),
        (201, True, True),
        (303, True, True),
        (303, False, False),
        (400, True, False),
        (404, True, False),
        (500, True, False),
    ],
)
async def test_autocommit_follows_the_response_status(
    make_db: Callable[..., Database], status: int, commit_on_redirect: bool, committed: bool
) -> None:
    """Autocommit commits below 400 (3xx as configured) and rolls back 4xx and 5xx."""
    db = make_db(commit="autocommit", commit_on_redirect=commit_on_redirect)

    async def handler(_scope: dict[str, Any]) -> tuple[int, bytes]:
        db.session.add(Item(name="written"))
        await db.session.flush()
        return status, b""

    async with client(ScopeMiddleware(asgi_app(handler))) as http:
        assert (await http.get("/")).status_code == status
    assert await count_items(db) == (1 if committed else 0)


async def test_autocommit_commits_before_the_response_starts(autocommit_db: Database) -> None:
    """When the client receives the start of a 2xx response, the write is already committed."""
    committed_at_start: list[int] = []

    async def handler(_scope: dict[str, Any]) -> tuple[int, bytes]:
        autocommit_db.session.add(Item(name="early"))
        return 201, b"created"

    app = ScopeMiddleware(asgi_app(handler))

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            committed_at_start.append(await count_items(autocommit_db))

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    await app({"type": "http", "method": "POST", "path": "/", "headers": []}, receive, send)
    assert committed_at_start == [1]


async def test_manual_policy_rolls_back_what_the_request_left(db: Database) -> None:
    """With the manual policy, only what the handler committed persists."""

    async def handler(_scope: dict[str, Any]) -> tuple[int, bytes]:
        db.session.add(Item(name="committed"))
        await db.session.commit()
        db.session.add(Item(name="left over"))
        await db.session.flush()
        return 200, b""

    async with client(ScopeMiddleware(asgi_app(handler))) as http:
        await http.get("/")
    assert await item_names(db) == ["committed"]


async def test_a_commit_that_fails_turns_the_response_into_a_500(
    autocommit_db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """A commit failing at COMMIT gives the client a generic 500, never the handler's 2xx."""

    async def handler(_scope: dict[str, Any]) -> tuple[int, bytes]:
        add_write_that_fails_at_commit(autocommit_db.session)
        await autocommit_db.session.flush()  # every statement passes
        return 201, json.dumps({"created": True}).encode()

    async with client(ScopeMiddleware(asgi_app(handler))) as http:
        response = await http.post("/")
    assert response.status_code == 500
    assert response.text == "Internal Server Error"
    assert "INSERT" not in response.text
    assert await count_items(autocommit_db) == 0
    assert "Commit failed before the response started" in caplog.text


async def test_a_commit_the_database_cannot_serve_turns_the_response_into_a_503(
    autocommit_db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """A COMMIT failing because the database is unavailable gives a retryable 503, not a 2xx."""

    def connection_lost(_connection: object) -> None:
        raise OperationalError("COMMIT", {}, ConnectionResetError("server closed the connection"))

    async def handler(_scope: dict[str, Any]) -> tuple[int, bytes]:
        autocommit_db.session.add(Item(name="unserved"))
        await autocommit_db.session.flush()
        return 201, b"created"

    event.listen(autocommit_db.engine.sync_engine, "commit", connection_lost, once=True)
    async with client(ScopeMiddleware(asgi_app(handler))) as http:
        response = await http.post("/")
    assert (response.status_code, response.text) == (503, "Service Unavailable")
    assert await count_items(autocommit_db) == 0
    assert await leaks(autocommit_db) == []


async def test_an_exception_in_the_app_rolls_back_and_propagates(autocommit_db: Database) -> None:
    """An app that raises: the write is rolled back and the exception reaches the server."""

    async def handler(_scope: dict[str, Any]) -> tuple[int, bytes]:
        autocommit_db.session.add(Item(name="lost"))
        await autocommit_db.session.flush()
        raise RuntimeError("handler failed")

    async with client(ScopeMiddleware(asgi_app(handler))) as http:
        with pytest.raises(RuntimeError, match="handler failed"):
            await http.get("/")
    assert await count_items(autocommit_db) == 0


async def test_a_websocket_connection_is_one_scope(autocommit_db: Database) -> None:
    """Every message of one websocket connection sees one session; it is ended at the close."""
    sessions: list[object] = []

    async def app(scope: Message, receive: Any, send: Any) -> None:
        assert scope["type"] == "websocket"
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        while (message := await receive())["type"] == "websocket.receive":
            sessions.append(autocommit_db.session)
            autocommit_db.session.add(Item(name=message["text"]))
            await autocommit_db.session.flush()
            await send({"type": "websocket.send", "text": "ok"})

    incoming: asyncio.Queue[Message] = asyncio.Queue()
    for message in (
        {"type": "websocket.connect"},
        {"type": "websocket.receive", "text": "one"},
        {"type": "websocket.receive", "text": "two"},
        {"type": "websocket.disconnect", "code": 1000},
    ):
        incoming.put_nowait(message)
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await ScopeMiddleware(app)({"type": "websocket", "path": "/ws"}, incoming.get, send)
    assert len(sessions) == 2
    assert sessions[0] is sessions[1]
    assert await item_names(autocommit_db) == ["one", "two"]
    assert registry(autocommit_db) == {}


async def test_a_cancelled_request_is_rolled_back_and_ended(db: Database) -> None:
    """A request cancelled mid-handler (a disconnect) still ends its session."""
    started = asyncio.Event()

    async def handler(_scope: dict[str, Any]) -> tuple[int, bytes]:
        db.session.add(Item(name="cancelled"))
        await db.session.flush()
        started.set()
        await asyncio.sleep(60)
        return 200, b""

    app = ScopeMiddleware(asgi_app(handler))

    async def receive() -> Message:
        await asyncio.sleep(60)
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        pass

    task = asyncio.create_task(app({"type": "http", "path": "/"}, receive, send))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert registry(db) == {}
    assert await count_items(db) == 0


async def _send_seen_by_the_app(middleware: Any) -> tuple[Any, Any]:
    """Run one request through ``middleware``; return the server's send and the app's."""
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    request = {"type": "http", "method": "GET", "path": "/", "headers": []}
    await middleware(request, receive, send)
    assert [message["type"] for message in sent] == ["http.response.start", "http.response.body"]
    return send, middleware.app.seen_send


def send_recording_app() -> Any:
    """A bare ASGI app that answers 200 and records the ``send`` it was given."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        app.seen_send = send  # type: ignore[attr-defined]  # a function object's attribute
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


async def test_two_apps_in_one_process_each_follow_their_own_databases(
    db: Database, autocommit_db: Database
) -> None:
    """An autocommit Database elsewhere in the process costs a manual-only app nothing."""
    manual = ScopeMiddleware(send_recording_app(), databases=[db])
    watching = ScopeMiddleware(send_recording_app(), databases=[db, autocommit_db])
    server_send, app_send = await _send_seen_by_the_app(manual)
    assert app_send is server_send
    server_send, app_send = await _send_seen_by_the_app(watching)
    assert app_send is not server_send


async def test_a_middleware_not_told_its_databases_watches_every_response(db: Database) -> None:
    """Without ``databases`` the middleware cannot know the policies, so it watches."""
    server_send, app_send = await _send_seen_by_the_app(ScopeMiddleware(send_recording_app()))
    assert app_send is not server_send


async def test_an_autocommit_database_the_middleware_was_not_given_raises(
    db: Database, autocommit_db: Database
) -> None:
    """An autocommit database the middleware was not given raises on use and writes nothing."""

    async def handler(_scope: dict[str, Any]) -> tuple[int, bytes]:
        autocommit_db.session.add(Item(name="unwatched"))
        return 200, b"ok"

    app = ScopeMiddleware(asgi_app(handler), databases=[db])
    async with client(app) as http:
        with pytest.raises(UnwatchedDatabaseError, match="commits by policy"):
            await http.get("/")
    assert await count_items(autocommit_db) == 0
    assert registry(autocommit_db) == {}


async def test_the_architecture_pages_bare_asgi_app_serves_a_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ARCHITECTURE.md's bare ASGI app answers through db.session and leaves nothing open."""
    monkeypatch.chdir(tmp_path)  # its SQLite file goes to a scratch directory
    namespace = run_readme_app("ARCHITECTURE.md")
    app, db = namespace["app"], namespace["db"]
    try:
        async with client(app) as http:
            response = await http.get("/")
        assert response.status_code == 200
        assert response.text
        assert await leaks(db) == []
    finally:
        await db.dispose()
