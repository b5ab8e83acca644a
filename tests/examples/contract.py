"""The HTTP contract every example Todo API serves, run against each example.

Each framework's test module subclasses :class:`TodoContract` and names its example
directory. The example is imported fresh for every test with ``DATABASE_URL`` pointing at the
test's database leg, exactly as a user would run it.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import json
import socket
import struct
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar
from urllib.parse import quote, urlsplit

import httpx
import pytest
from sqlalchemy import text
from websockets.asyncio.client import connect

from ..adapters.scenarios import asgi_client
from ..servers import uvicorn_server
from ..support import THOROUGH, assert_no_leaks, backend, registry, through_pgbouncer

EXAMPLES = Path(__file__).parent.parent.parent / "examples"

BAD_TODOS: list[Any] = [
    {},
    {"name": "no title"},
    {"title": None},
    {"title": 42},
    {"title": True},
    {"title": ["a list"]},
    {"title": {"an": "object"}},
    {"title": ""},
    {"title": "   "},
    {"title": "\t\n"},
    {"title": "x" * 201},
    {"title": "  " + "y" * 201 + "  "},
    {"title": "nul \x00 inside"},
    {"title": "lone \ud800 surrogate"},
    [],
    "just a string",
    12,
    None,
]
NOT_JSON = [b"", b"{", b"title=x", b"\xff\xfe", b"[" * 100_000, b'{"title": "x"} trailing']
# Integers in forms other than ASCII decimal digits; ``n`` is 1 in a query, a todo's id in a path,
# ``arabic`` and ``fullwidth`` are n in Arabic-Indic and fullwidth digits (see :func:`spell`).
NOT_DECIMAL = [
    *("{n}e3", "{n}e2", "{n}e0", "{n}E0", "0x{n:x}", "0o{n:o}", "0b{n:b}", "{n}.0", "+{n}"),
    *(" {n}", "{n} ", "\t{n}", "{n}\n", "{n}_000", "0_{n}", "{arabic}", "{fullwidth}"),
]
HUGE = "9" * 5000  # int() refuses strings of more than 4300 digits
# Exports that clients abandon after 2 KB: rows enough (about 150 KB) that the export is still
# reading when the client goes away (on MariaDB asyncmy reads buffered rows without yielding,
# so the server there usually finishes the export before it sees the client gone).
EXPORT_ROWS = 3000


ABANDONED_EXPORTS = 50 if THOROUGH else 10  # the full 50 on the newest Python
ABANDON_BATCH = 10  # exports open at once: within the default pool (5 + 10 overflow)
ABANDON_AFTER = 2048  # bytes of the export read before the client goes away
# Relation locks that PostgreSQL backends other than the asking one hold in this database.
PG_RELATION_LOCKS = (
    "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
    " WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()"
    " AND l.granted AND l.locktype = 'relation'"
)


def spell(template: str, n: int) -> str:
    """A :data:`NOT_DECIMAL` template filled in with ``n``, percent-encoded for a URL."""

    def digits(zero: int) -> str:  # n in the ten digits from ``zero`` on
        return "".join(chr(zero + int(digit)) for digit in str(n))

    value = template.format(n=n, arabic=digits(0x0660), fullwidth=digits(0xFF10))
    return quote(value, safe="")


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>/app.py`` as a fresh module."""
    path = EXAMPLES / name / "app.py"
    module_name = f"todo_example_{name}_{id(path)}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


@asynccontextmanager
async def loaded_example(
    example: str,
    leg_url: str,
    monkeypatch: pytest.MonkeyPatch,
    settings: dict[str, str] | None = None,
) -> AsyncIterator[ModuleType]:
    """The example's module on ``leg_url`` (``DATABASE_<setting>`` from ``settings``).

    On exit it checks for leaks, drops the example's tables and disposes its engine.
    """
    monkeypatch.setenv("DATABASE_URL", leg_url)
    if through_pgbouncer(leg_url):  # as a user behind PgBouncer in transaction mode runs it
        monkeypatch.setenv("DATABASE_PGBOUNCER", "1")
    for setting, value in (settings or {}).items():
        monkeypatch.setenv(f"DATABASE_{setting}", value)
    module = load_example(example)
    try:
        yield module
        await assert_no_leaks(module.db)
    finally:
        async with module.db.engine.begin() as connection:
            await connection.run_sync(module.Base.metadata.drop_all)
        await module.db.dispose()
        sys.modules.pop(module.__name__, None)


async def export_then_reset(url: str) -> None:
    """Read about 2 KB of GET /todos/export on a raw socket, then reset the connection (RST)."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(f"GET /todos/export HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode())
        received = b""
        while len(received) < ABANDON_AFTER:
            chunk = await reader.read(ABANDON_AFTER)
            assert chunk, f"the export ended after {len(received)} bytes"
            received += chunk
        assert received.startswith(b"HTTP/1.1 200"), received[:200]
    finally:  # SO_LINGER 0: close() drops the connection with a RST, no FIN handshake
        linger = struct.pack("ii", 1, 0)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        writer.transport.abort()


async def export_then_close(url: str) -> None:
    """Read about 2 KB of GET /todos/export with httpx, then close the unread stream."""
    async with (
        httpx.AsyncClient(base_url=url) as client,
        client.stream("GET", "/todos/export") as response,
    ):
        assert response.status_code == 200
        received = 0
        async for chunk in response.aiter_raw():
            received += len(chunk)
            if received >= ABANDON_AFTER:
                break
        assert received >= ABANDON_AFTER, f"the export ended after {received} bytes"


class TodoContract:
    """The contract of issue #4, as tests. Subclasses set ``example`` (and ``serve``)."""

    example: ClassVar[str]

    @staticmethod
    def serve(app: Any) -> AbstractAsyncContextManager[str]:
        """Serve ``app`` with a real server; the example's usual one."""
        return uvicorn_server(app)

    @pytest.fixture
    async def todo_app(
        self, leg_url: str, monkeypatch: pytest.MonkeyPatch
    ) -> AsyncIterator[ModuleType]:
        async with loaded_example(self.example, leg_url, monkeypatch) as module:
            yield module

    @pytest.fixture
    async def client(self, todo_app: ModuleType) -> AsyncIterator[httpx.AsyncClient]:
        async with asgi_client(todo_app.app) as client:
            yield client

    @staticmethod
    async def titles(client: httpx.AsyncClient) -> list[str]:
        response = await client.get("/todos?limit=1000")
        assert response.status_code == 200
        return [todo["title"] for todo in response.json()]

    @staticmethod
    def assert_error(response: httpx.Response, *statuses: int) -> None:
        assert response.status_code in statuses, (response.status_code, response.text)
        detail = response.json()["detail"]
        assert detail
        assert isinstance(detail, str), detail

    async def test_health_answers_without_a_session(
        self, todo_app: ModuleType, client: httpx.AsyncClient
    ) -> None:
        """GET /health is 200 {"status": "ok"} and opens no session."""
        response = await client.get("/health")
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}
        assert registry(todo_app.db) == {}

    async def test_create_read_update_delete(self, client: httpx.AsyncClient) -> None:
        """A todo goes through create (stripped title), read, update and delete."""
        created = await client.post("/todos", json={"title": "  buy milk  "})
        assert created.status_code == 201
        todo = created.json()
        assert todo == {"id": todo["id"], "title": "buy milk", "done": False}
        assert (await client.get(f"/todos/{todo['id']}")).json() == todo
        patched = await client.patch(f"/todos/{todo['id']}", json={"done": True})
        assert patched.status_code == 200
        assert patched.json() == {**todo, "done": True}
        renamed = await client.patch(f"/todos/{todo['id']}", json={"title": " buy oat milk "})
        assert renamed.json() == {**todo, "title": "buy oat milk", "done": True}
        assert (await client.delete(f"/todos/{todo['id']}")).status_code == 204
        self.assert_error(await client.get(f"/todos/{todo['id']}"), 404)
        self.assert_error(await client.delete(f"/todos/{todo['id']}"), 404)

    async def test_titles_are_unique_and_case_sensitive(self, client: httpx.AsyncClient) -> None:
        """A duplicate title is a 409 that writes nothing; titles differing in case are two."""
        assert (await client.post("/todos", json={"title": "Milk"})).status_code == 201
        self.assert_error(await client.post("/todos", json={"title": " Milk "}), 409)
        assert (await client.post("/todos", json={"title": "milk"})).status_code == 201
        assert (await client.post("/todos", json={"title": "🥛 milk"})).status_code == 201
        assert await self.titles(client) == ["Milk", "milk", "🥛 milk"]

    async def test_the_longest_title_is_accepted(self, client: httpx.AsyncClient) -> None:
        """A title of exactly 200 characters (after stripping) is valid."""
        title = "é" * 200
        response = await client.post("/todos", json={"title": f" {title} "})
        assert response.status_code == 201
        assert response.json()["title"] == title

    @pytest.mark.parametrize("body", BAD_TODOS, ids=repr)
    async def test_bad_todos_are_4xx_and_write_nothing(
        self, client: httpx.AsyncClient, body: Any
    ) -> None:
        """A body without a valid string title is a 4xx with a JSON detail, and writes nothing."""
        content = json.dumps(body).encode("utf-8", "surrogatepass")
        headers = {"content-type": "application/json"}
        response = await client.post("/todos", content=content, headers=headers)
        self.assert_error(response, 400, 422)
        assert await self.titles(client) == []

    @pytest.mark.parametrize("content", NOT_JSON, ids=lambda c: repr(c[:20]))
    async def test_bodies_that_are_not_json_are_4xx(
        self, client: httpx.AsyncClient, content: bytes
    ) -> None:
        """Bodies that are not JSON documents are a 4xx with a JSON detail."""
        headers = {"content-type": "application/json"}
        response = await client.post("/todos", content=content, headers=headers)
        self.assert_error(response, 400, 422)
        assert await self.titles(client) == []

    async def test_list_pages_in_id_order(self, client: httpx.AsyncClient) -> None:
        """GET /todos pages by limit and offset (decimal digits), in id order, 100 by default."""
        response = await client.post("/todos/bulk", json=[{"title": f"t{i}"} for i in range(105)])
        assert response.status_code == 201
        ids = [todo["id"] for todo in response.json()]
        first_page = (await client.get("/todos")).json()
        assert [todo["id"] for todo in first_page] == ids[:100]
        page = (await client.get("/todos?limit=3&offset=101")).json()
        assert [todo["id"] for todo in page] == ids[101:104]
        assert (await client.get("/todos?limit=003&offset=0101")).json() == page
        assert (await client.get("/todos?offset=1000")).json() == []

    async def test_leading_zeros_however_many_change_no_integer(
        self, client: httpx.AsyncClient
    ) -> None:
        """An id, a limit or an offset with leading zeros, even thousands, is the same number."""
        todos = (await client.post("/todos/bulk", json=[{"title": "a"}, {"title": "b"}])).json()
        for zeros in ("0", "000", "0" * 5000):
            assert (await client.get(f"/todos/{zeros}{todos[1]['id']}")).json() == todos[1]
            page = await client.get(f"/todos?limit={zeros}1&offset={zeros}1")
            assert page.json() == todos[1:]

    @pytest.mark.parametrize(
        "query",
        [
            "limit=0",
            "limit=1001",
            "limit=-1",
            "limit=abc",
            "limit=1.5",
            "offset=-1",
            "offset=x",
            "limit=",
            "offset=99999999999999999999999",
            "limit=\u0663",  # ARABIC-INDIC DIGIT THREE
            "offset=\uff15",  # FULLWIDTH DIGIT FIVE
            "offset=5.0",
            "offset=%2B5",  # +5 ("+" alone is a space in a query)
            "offset=%205",
            "offset=5%20",
            "offset=5%0A",
            "offset=%095",
            "limit=1_000",
            "offset=-0",
            pytest.param(f"limit={HUGE}", id="limit=9*5000"),
            pytest.param(f"offset={HUGE}", id="offset=9*5000"),
        ],
    )
    async def test_bad_paging_is_4xx(self, client: httpx.AsyncClient, query: str) -> None:
        """Paging values out of range or not integers are a 4xx with a JSON detail."""
        self.assert_error(await client.get(f"/todos?{query}"), 400, 422)

    @pytest.mark.parametrize("template", NOT_DECIMAL)
    async def test_integers_not_in_decimal_digits_are_4xx_and_change_nothing(
        self, client: httpx.AsyncClient, template: str
    ) -> None:
        """Paging or an id not in decimal digits is a 4xx with a JSON detail and changes nothing."""
        for name in ("limit", "offset"):
            self.assert_error(await client.get(f"/todos?{name}={spell(template, 1)}"), 400, 422)
        created = await client.post("/todos/bulk", json=[{"title": "a"}, {"title": "b"}])
        todos = created.json()
        for todo in todos:
            todo_id = spell(template, todo["id"])
            self.assert_error(await client.get(f"/todos/{todo_id}"), 400, 404, 422)
            patch = await client.patch(f"/todos/{todo_id}", json={"done": True})
            self.assert_error(patch, 400, 404, 422)
            self.assert_error(await client.delete(f"/todos/{todo_id}"), 400, 404, 422)
        assert (await client.get("/todos")).json() == todos

    async def test_unknown_and_huge_ids_are_404(self, client: httpx.AsyncClient) -> None:
        """Ids that match no todo, however large, are a 404 with a JSON detail."""
        for todo_id in ("1", "2147483647", "2147483648", "99999999999999999999999", HUGE):
            self.assert_error(await client.get(f"/todos/{todo_id}"), 404, 422)
            self.assert_error(
                await client.patch(f"/todos/{todo_id}", json={"done": True}), 404, 422
            )
            self.assert_error(await client.delete(f"/todos/{todo_id}"), 404, 422)

    async def test_bad_patches_are_4xx_and_change_nothing(self, client: httpx.AsyncClient) -> None:
        """A patch with a bad title or done, or a duplicate title, changes nothing."""
        todo = (await client.post("/todos", json={"title": "first"})).json()
        await client.post("/todos", json={"title": "second"})
        for body in ({"done": "yes"}, {"done": None}, {"title": ""}, {"title": 5}, [1]):
            self.assert_error(await client.patch(f"/todos/{todo['id']}", json=body), 400, 422)
        self.assert_error(await client.patch(f"/todos/{todo['id']}", json={"title": "second"}), 409)
        assert (await client.get(f"/todos/{todo['id']}")).json() == todo

    async def test_bulk_is_all_or_nothing(self, client: httpx.AsyncClient) -> None:
        """A bulk create writes every todo or, on any bad or duplicate item, none."""
        assert (await client.post("/todos", json={"title": "existing"})).status_code == 201
        for body, statuses in (
            ([{"title": "a"}, {"title": ""}], (400, 422)),
            ([{"title": "b"}, {"title": 3}], (400, 422)),
            ([{"title": "c"}, {"title": " c "}], (409,)),
            ([{"title": "d"}, {"title": "existing"}], (409,)),
            ([], (400, 422)),
            ([{"title": f"n{i}"} for i in range(1001)], (400, 422)),
            ({"title": "not a list"}, (400, 422)),
        ):
            self.assert_error(await client.post("/todos/bulk", json=body), *statuses)
        assert await self.titles(client) == ["existing"]
        created = await client.post("/todos/bulk", json=[{"title": " x "}, {"title": "y"}])
        assert created.status_code == 201
        assert [todo["title"] for todo in created.json()] == ["x", "y"]

    async def test_export_streams_ndjson_in_id_order(self, client: httpx.AsyncClient) -> None:
        """GET /todos/export is NDJSON, one todo per line in id order."""
        await client.post("/todos/bulk", json=[{"title": f"e{i}"} for i in range(250)])
        response = await client.get("/todos/export")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        todos = [json.loads(line) for line in response.text.splitlines()]
        assert [todo["title"] for todo in todos] == [f"e{i}" for i in range(250)]
        assert [todo["id"] for todo in todos] == sorted(todo["id"] for todo in todos)

    async def test_concurrent_duplicate_creates_give_one_201(
        self, client: httpx.AsyncClient
    ) -> None:
        """N concurrent POSTs of one title: exactly one 201, N-1 409s, no 500, one row."""
        responses = await asyncio.gather(
            *(client.post("/todos", json={"title": "race"}) for _ in range(12))
        )
        statuses = sorted(response.status_code for response in responses)
        assert statuses == [201] + [409] * 11
        assert await self.titles(client) == ["race"]

    async def test_a_websocket_message_nested_too_deeply_is_answered(
        self, todo_app: ModuleType
    ) -> None:
        """A message nested too deeply to decode gets a detail; the connection stays open."""
        deep = '{"title": "x", "deep": ' + "[" * 50_000 + "]" * 50_000 + "}"
        async with (
            self.serve(todo_app.app) as url,
            connect(url.replace("http://", "ws://") + "/todos/ws") as socket,
        ):
            await socket.send(deep)
            assert isinstance(json.loads(await socket.recv())["detail"], str)
            await socket.send(json.dumps({"title": "after"}))
            assert json.loads(await socket.recv())["title"] == "after"

    async def test_no_free_connection_is_a_503_and_health_still_answers(
        self, leg_url: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With every pooled connection taken, database routes say 503; /health still answers."""
        pool = {"POOL_SIZE": "1", "MAX_OVERFLOW": "0", "POOL_TIMEOUT": "1"}
        async with (
            loaded_example(self.example, leg_url, monkeypatch, pool) as module,
            asgi_client(module.app) as client,
        ):
            assert (await client.post("/todos", json={"title": "first"})).status_code == 201
            async with module.db.engine.connect():  # the only connection is taken
                assert (await client.get("/health")).status_code == 200
                self.assert_error(await client.get("/todos"), 503)
                self.assert_error(await client.post("/todos", json={"title": "x"}), 503)
            assert [todo["title"] for todo in (await client.get("/todos")).json()] == ["first"]

    async def test_through_a_real_server(self, todo_app: ModuleType) -> None:
        """Smoke test through a real server: HTTP routes, the export stream and the websocket."""
        async with self.serve(todo_app.app) as url:
            async with httpx.AsyncClient(base_url=url) as client:
                assert (await client.get("/health")).json() == {"status": "ok"}
                assert (await client.post("/todos", json={"title": "served"})).status_code == 201
            async with connect(url.replace("http://", "ws://") + "/todos/ws") as socket:
                await socket.send(json.dumps({"title": " via socket "}))
                assert json.loads(await socket.recv())["title"] == "via socket"
                for bad in ("not json", json.dumps({"title": ""}), json.dumps({"title": "served"})):
                    await socket.send(bad)
                    assert isinstance(json.loads(await socket.recv())["detail"], str)
                await socket.send(json.dumps({"title": "still open"}))
                assert json.loads(await socket.recv())["title"] == "still open"
            async with httpx.AsyncClient(base_url=url) as client:
                export = await client.get("/todos/export")
                titles = [json.loads(line)["title"] for line in export.text.splitlines()]
                assert titles == ["served", "via socket", "still open"]
            await assert_no_leaks(todo_app.db)

    async def test_abandoned_exports_leave_nothing_open_for_the_next_write(
        self, todo_app: ModuleType, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Through a real server, exports cut off mid-stream block no write and leak nothing."""
        # Half the clients reset the connection, half close the stream with httpx.
        abandon = [export_then_reset, export_then_close] * (ABANDON_BATCH // 2)
        gc.disable()  # the scope's end must free the cursors, not the garbage collector
        try:
            async with self.serve(todo_app.app) as url:
                async with httpx.AsyncClient(base_url=url) as client:
                    for start in range(0, EXPORT_ROWS, 1000):
                        titles = [{"title": f"x{i}"} for i in range(start, start + 1000)]
                        assert (await client.post("/todos/bulk", json=titles)).status_code == 201
                for _ in range(ABANDONED_EXPORTS // ABANDON_BATCH):
                    batch = (abandon_export(url) for abandon_export in abandon)
                    await asyncio.wait_for(asyncio.gather(*batch), timeout=10)
                # Not the SQLite busy timeout (5 s): a cursor left open would make it wait.
                async with httpx.AsyncClient(base_url=url, timeout=2) as client:
                    created = await client.post("/todos", json={"title": "right after"})
                assert created.status_code == 201, created.text
                # While the server runs: Quart's extension disposes the engine at shutdown.
                await assert_no_leaks(todo_app.db)
                if backend(todo_app.db) == "postgresql":
                    async with todo_app.db.engine.connect() as conn:
                        assert await conn.scalar(text(PG_RELATION_LOCKS)) == 0
        finally:
            # The tracebacks of logged errors would keep what they saw (a leaked cursor, and
            # the SQLite lock with it) alive through teardown: keep only their text.
            for record in caplog.records:
                record.exc_info = None
            gc.enable()
            gc.collect()  # what the test left in cycles goes now, not in a later test
