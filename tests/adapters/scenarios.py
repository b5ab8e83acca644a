r"""The scenarios every adapter passes, on every database leg.

Each adapter's test module subclasses :class:`AdapterScenarios` and provides ``make_app``: a
factory ``make_app(db) -> ASGI app`` that serves the routes below, written the way that
adapter's README recommends. The scenarios speak only HTTP and websockets to the app and
inspect the database and the registry directly.

Routes every app serves (``db`` is the Database given to the factory):

- ``GET /ping``: ``pong``; never touches the database.
- ``POST /items/{name}?commit=0|1&status=201``: add an item named ``name``, flush, commit if
  asked, answer ``status`` with JSON ``{"session": id(db.session)}``.
- ``POST /items/{name}/fail``: add and flush an item, then raise ``RuntimeError``.
- ``POST /items/{name}/refused?status=404``: add and flush an item, then raise the framework's
  own HTTP error (``HTTPException``, ``abort``) with that status.
- ``POST /items/{name}/answered``: add and flush an item, then raise :class:`AnsweredError`,
  which an exception handler of the app (registered after the adapter) answers with a 200
  whose body is ``answered``.
- ``GET /identity``: read ``db.session`` in two helper functions, sleep 50 ms, read it again;
  answer ``{"same": <all reads gave one object>, "session": id(db.session)}``.
- ``GET /stream?n=3&delay=0``: a streamed body of ``n`` lines ``"<id(db.session)> <items>\\n"``,
  each line counting the items through ``db.session``, ``delay`` seconds apart.
- ``POST /background/{name}``: answer 202; a framework background task then adds an item
  ``"{name}-same"`` if it sees the request's session as ``db.session``, else ``"{name}-own"``,
  and commits.
- ``POST /orphan``: ``add_write_that_fails_at_commit(db.session)``, flush, answer 201.
- websocket ``/ws``: for each text message, add an item of that name, commit, and reply with
  ``str(id(db.session))``.
- websocket ``/ws-fail``: receive a text message, add and flush an item of that name, reply
  ``flushed``, then raise ``RuntimeError``.

Frameworks that validate requests (:class:`ValidationScenarios`) also serve ``POST /validated``:
a dependency adds an item ``attempt`` and flushes, then the framework validates the JSON body
``{"name": str, "copies": int}``; the handler answers 201 ``{"copies": copies}``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, ClassVar

import httpx
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import event
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from alchemy_scope import AlreadyInstalledError, Database

from ..conftest import MakeDatabase
from ..fault_matrix import in_process, run_matrix
from ..servers import uvicorn_server
from ..support import THOROUGH, assert_no_leaks, count_items, idle_connections, item_names, registry


class AnsweredError(Exception):
    """Raised by ``POST /items/{name}/answered``; the app's exception handler answers 200."""


@asynccontextmanager
async def asgi_client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client that calls ``app`` in-process, with its lifespan run around it."""
    async with LifespanManager(_copying_lifespan_state(app)) as manager:
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


@asynccontextmanager
async def lifespanless_client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client that calls ``app`` in-process without running its lifespan.

    App exceptions reach the caller.
    """
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


def _copying_lifespan_state(app: Any) -> Any:
    """Give each request a shallow copy of the lifespan state, as the ASGI spec requires.

    asgi-lifespan 2.1 hands every request the lifespan's own state dict (servers copy it);
    Litestar caches a request's parsed query and path there, so without a copy the second
    request of a client would read the first one's parameters.
    """

    async def app_with_copied_state(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan" and "state" in scope:
            scope = {**scope, "state": dict(scope["state"])}
        await app(scope, receive, send)

    return app_with_copied_state


class AdapterScenarios:
    """Scenarios shared by every adapter; subclasses set the factories and flags below."""

    # Where the framework runs background tasks: True if inside the request's scope (before
    # the request ends), False if after it, in a scope of their own.
    background_in_request_scope: ClassVar[bool] = True
    # What the error of a second install shows the user to call instead.
    install_advice: ClassVar[str]
    # Scenarios this adapter is known to fail, with the reason: strict xfails (conftest.py).
    known_defects: ClassVar[dict[str, str]] = {}

    @staticmethod
    def make_app(db: Database) -> Any:
        """The app serving the routes above on ``db``, the adapter installed as its README shows."""
        raise NotImplementedError

    @staticmethod
    def install_twice(db: Database) -> None:
        """Build an app on ``db`` in which the adapter is installed a second time."""
        raise NotImplementedError

    @staticmethod
    def serve(app: Any) -> AbstractAsyncContextManager[str]:
        """Serve ``app`` with a real server; the framework's usual one."""
        return uvicorn_server(app)

    def app(self, db: Database) -> Any:
        return self.make_app(db)

    async def test_a_route_that_never_touches_the_database_checks_out_nothing(
        self, db: Database
    ) -> None:
        """A request that never uses db.session opens no session and no connection."""
        async with asgi_client(self.app(db)) as client:
            response = await client.get("/ping")
            assert response.status_code == 200
            assert response.text == "pong"
            assert registry(db) == {}
            assert idle_connections(db) == 0

    async def test_every_helper_of_a_request_gets_the_same_session(self, db: Database) -> None:
        """All code that runs for one request, across awaits, sees one session."""
        async with asgi_client(self.app(db)) as client:
            response = await client.get("/identity")
        assert response.status_code == 200
        assert response.json()["same"] is True

    async def test_concurrent_requests_never_share_a_session(self, db: Database) -> None:
        """Requests in flight at the same time each have their own session."""
        async with asgi_client(self.app(db)) as client:
            responses = await asyncio.gather(*(client.get("/identity") for _ in range(10)))
        assert all(r.status_code == 200 for r in responses)
        assert len({r.json()["session"] for r in responses}) == 10

    async def test_manual_policy_keeps_what_was_committed_only(self, db: Database) -> None:
        """Manual policy: an explicit commit persists; what was only flushed is rolled back."""
        async with asgi_client(self.app(db)) as client:
            assert (await client.post("/items/committed?commit=1")).status_code == 201
            assert (await client.post("/items/flushed?commit=0")).status_code == 201
        assert await item_names(db) == ["committed"]

    async def test_autocommit_commits_a_2xx_and_rolls_back_4xx_and_5xx(
        self, autocommit_db: Database
    ) -> None:
        """Autocommit: a 2xx commits; a 4xx or 5xx, returned or raised (HTTP error), rolls back."""
        async with asgi_client(self.app(autocommit_db)) as client:
            for name, status in (("ok", 201), ("bad", 400), ("missing", 404), ("error", 503)):
                response = await client.post(f"/items/{name}?status={status}")
                assert response.status_code == status
            for name, status in (("not found", 404), ("conflict", 409)):
                response = await client.post(f"/items/{name}/refused?status={status}")
                assert response.status_code == status  # the framework's own HTTP error
        assert await item_names(autocommit_db) == ["ok"]

    async def test_an_exception_gives_a_500_and_rolls_back(self, make_db: MakeDatabase) -> None:
        """A handler that raises gets the framework's 500 and its writes are rolled back."""
        for db in (make_db(), make_db(commit="autocommit")):
            async with asgi_client(self.app(db)) as client:
                response = await client.post("/items/doomed/fail")
            assert response.status_code == 500
            assert await count_items(db) == 0

    async def test_an_exception_the_framework_answers_commits_nothing(
        self, autocommit_db: Database
    ) -> None:
        """Autocommit: a handler that raised commits nothing, even when a handler answers 200."""
        async with asgi_client(self.app(autocommit_db)) as client:
            response = await client.post("/items/forgiven/answered")
            assert (response.status_code, response.text) == (200, "answered")
            assert (await client.post("/items/kept")).status_code == 201
        assert await item_names(autocommit_db) == ["kept"]

    def test_installing_twice_raises_already_installed(self) -> None:
        """A second install in one app raises AlreadyInstalledError showing the call to use."""
        db = Database("sqlite+aiosqlite://")  # never connects: no database leg needed
        with pytest.raises(AlreadyInstalledError, match=re.escape(self.install_advice)):
            self.install_twice(db)

    async def test_a_commit_that_fails_becomes_a_500(self, autocommit_db: Database) -> None:
        """Autocommit: a COMMIT that fails gives the client a 500 and persists nothing."""
        async with asgi_client(self.app(autocommit_db)) as client:
            response = await client.post("/orphan")
        assert response.status_code == 500
        assert "INSERT" not in response.text
        assert await count_items(autocommit_db) == 0

    async def test_a_streaming_body_reads_through_the_request_session(self, db: Database) -> None:
        """Every chunk of a streamed body is produced with the request's one session."""
        async with asgi_client(self.app(db)) as client:
            await client.post("/items/streamed?commit=1")
            response = await client.get("/stream?n=3")
        assert response.status_code == 200
        lines = [line.split() for line in response.text.splitlines()]
        assert len(lines) == 3
        assert len({session for session, _ in lines}) == 1
        assert {count for _, count in lines} == {"1"}

    async def test_the_session_ends_after_the_last_chunk(self, db: Database) -> None:
        """Through a real server: the session is open while the body streams, ended after."""
        async with self.serve(self.app(db)) as url, httpx.AsyncClient(base_url=url) as client:
            async with client.stream("GET", "/stream?n=3&delay=0.2") as response:
                lines = response.aiter_lines()
                assert (await anext(lines)).strip()
                assert len(registry(db)) == 1  # still streaming: the session is open
                rest = [line async for line in lines if line.strip()]
            assert len(rest) == 2
            await assert_no_leaks(db)

    async def test_a_client_that_disconnects_mid_stream_still_ends_the_session(
        self, db: Database
    ) -> None:
        """Through a real server: dropping the connection mid-stream ends the session."""
        async with self.serve(self.app(db)) as url:
            async with (
                httpx.AsyncClient(base_url=url) as client,
                client.stream("GET", "/stream?n=1000&delay=0.01") as response,
            ):
                assert (await anext(response.aiter_lines())).strip()
                assert len(registry(db)) == 1
            # The client closed the connection before the body ended.
            await assert_no_leaks(db)

    async def test_background_tasks_run_in_the_documented_scope(self, db: Database) -> None:
        """Background tasks see the request's session, or their own scope, as documented."""
        expected = "job-same" if self.background_in_request_scope else "job-own"
        async with asgi_client(self.app(db)) as client:
            assert (await client.post("/background/job")).status_code == 202

            async def written() -> bool:
                return await item_names(db) == [expected]

            for _ in range(250):
                if await written():
                    break
                await asyncio.sleep(0.02)
        assert await item_names(db) == [expected]

    async def test_a_websocket_connection_is_one_scope(self, db: Database) -> None:
        """Through a real server: one session per websocket connection, ended when it closes."""
        async with self.serve(self.app(db)) as url:
            ws_url = url.replace("http://", "ws://") + "/ws"
            async with connect(ws_url) as first, connect(ws_url) as second:
                await first.send("a")
                await first.send("b")
                await second.send("c")
                first_ids = {await first.recv(), await first.recv()}
                second_ids = {await second.recv()}
            assert len(first_ids) == 1
            assert first_ids != second_ids
            await assert_no_leaks(db)
        assert sorted(await item_names(db)) == ["a", "b", "c"]

    async def test_a_websocket_handler_that_raises_commits_nothing(
        self, autocommit_db: Database
    ) -> None:
        """Through a real server: an autocommit websocket whose handler raised is rolled back."""
        async with self.serve(self.app(autocommit_db)) as url:
            async with connect(url.replace("http://", "ws://") + "/ws-fail") as client:
                await client.send("doomed")
                assert await client.recv() == "flushed"
                with pytest.raises(ConnectionClosed):
                    await client.recv()
            await assert_no_leaks(autocommit_db)
        assert await item_names(autocommit_db) == []

    async def test_a_real_server_serves_requests_with_sessions(self, db: Database) -> None:
        """End to end through a real server on 127.0.0.1: writes, reads, no leaks."""
        async with self.serve(self.app(db)) as url, httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/ping")).text == "pong"
            assert (await client.post("/items/real?commit=1")).status_code == 201
            assert (await client.get("/identity")).json()["same"] is True
            await assert_no_leaks(db)
        assert await item_names(db) == ["real"]

    @pytest.mark.parametrize("commit", ["manual", "autocommit"])
    async def test_every_step_of_a_write_failing_ends_the_scope_clean(
        self, make_db: MakeDatabase, commit: Any
    ) -> None:
        """Each database operation of a write request, failing each way, ends the scope clean."""
        flag = "1" if commit == "manual" else "0"  # autocommit: the policy commits
        await run_matrix(
            make_db(commit=commit),
            lambda db, _observed: self.app(db),
            f"POST /items/{{name}}?commit={flag}",
            in_process,
            sample=None if THOROUGH else 5,
        )

    async def test_shutdown_disposes_the_engine(self, db: Database) -> None:
        """When the app shuts down, the database's pooled connections are closed."""
        async with asgi_client(self.app(db)) as client:
            await client.post("/items/pooled?commit=1")
            assert idle_connections(db) == 1
        assert idle_connections(db) == 0


class ValidationScenarios(AdapterScenarios):
    """The scenarios, plus ``POST /validated`` for frameworks that validate requests."""

    invalid_status: ClassVar[int]  # what the framework answers a body that fails validation

    async def test_a_validation_error_writes_nothing(self, autocommit_db: Database) -> None:
        """A body that fails validation is refused; what a dependency wrote first is rolled back."""
        inserts: list[str] = []

        def note_insert(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
            if statement.startswith("INSERT"):
                inserts.append(statement)

        event.listen(autocommit_db.engine.sync_engine, "before_cursor_execute", note_insert)
        async with asgi_client(self.app(autocommit_db)) as client:
            refused = await client.post("/validated", json={"name": "x", "copies": "many"})
            assert refused.status_code == self.invalid_status
            assert len(inserts) == 1  # the dependency did write, before the validation
            assert await item_names(autocommit_db) == []
            # The same dependency's write is committed when the body is valid.
            accepted = await client.post("/validated", json={"name": "x", "copies": 2})
            assert (accepted.status_code, accepted.json()) == (201, {"copies": 2})
        assert await item_names(autocommit_db) == ["attempt"]
