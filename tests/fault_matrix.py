"""The fault-injection matrix: each database operation of a scenario fails in turn, each way.

A scenario is one request (or websocket message) against an app that serves the routes
below. The matrix runs it once to record the operations it performs (``tests.faults``),
then once per recorded operation and fault, and after every case checks that the scope
ended clean:

- registry empty, no connection checked out, no PostgreSQL backend idle in transaction;
- another connection can lock and write the table at once (nothing locked, no cursor open);
- a 2xx (or a websocket acknowledgement) only for work that is committed;
- the exception that reaches the server is the handler's own, when the handler raised;
- no warning (a garbage-collected connection, inconsistent results) once garbage is collected.

Routes every matrix app serves (``db`` is the Database under test; ``manual`` policy routes
commit themselves, ``autocommit`` ones leave it to the policy):

- ``POST /plain/{name}``: count the items, add one named ``name``, flush, answer 201.
- ``GET /stream/{name}``: add and flush an item, then stream three item names from
  ``db.session.stream(...)`` as the body, answer 200.
- ``POST /background/{name}``: answer 202; a background task of the request adds the item.
- ``POST /block/{name}``: add the item inside ``async with db.session.begin():``, answer 201.
- websocket ``/ws``: each text message adds an item of that name, commits, replies ``ok``.

The handlers record what they raised in the ``Observed`` they are given (decorated with
``recording(observed)``), so the matrix can tell the handler's exception from a cleanup's.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import gc
import inspect
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import httpx
from sqlalchemy import func, select
from websockets.asyncio.client import connect

from alchemy_scope import Database

from .faults import FAULTS, Case, FaultInjector
from .models import Item
from .support import assert_no_leaks, assert_writable, backend, item_names

Handler = TypeVar("Handler", bound=Callable[..., Any])

SCENARIOS = ("plain", "stream", "background", "block", "websocket")

# The known cases that failed as expected in this run, and how many cases ran on each
# database, for the terminal summary.
KNOWN_SEEN: list[str] = []
CASES_RUN: collections.Counter[str] = collections.Counter()
# Cases that still fail, each with the reason: (backend, scenario, operation, fault). Their
# problems are listed in the terminal summary instead of failing the run; they run last.
KNOWN: dict[tuple[str, str, str, str], str] = {}


@dataclass(frozen=True)
class Raised:
    """An exception, described without holding it (a held traceback pins cursors and locks)."""

    kind: type[BaseException]
    identity: int
    text: str

    @classmethod
    def of(cls, error: BaseException) -> Raised:
        return cls(type(error), id(error), repr(error))

    def __str__(self) -> str:
        return self.text


@dataclass
class Observed:
    """What one request's handler raised and what reached the server."""

    handler_errors: list[Raised] = field(default_factory=list)
    server_errors: list[Raised] = field(default_factory=list)


def observing(app: Any, observed: Observed) -> Any:
    """Wrap an ASGI app to record what propagates out of it (what the server sees)."""

    async def server_side(scope: Any, receive: Any, send: Any) -> None:
        try:
            await app(scope, receive, send)
        except BaseException as exc:
            if scope["type"] != "lifespan":
                observed.server_errors.append(Raised.of(exc))
            raise

    return server_side


async def count(db: Database) -> int:
    """Count the items through the scope's session (one more statement to fail)."""
    return int(await db.session.scalar(select(func.count()).select_from(Item)) or 0)


async def stream_names(db: Database) -> AsyncIterator[bytes]:
    """Three item names, read from a streamed result of the scope's session."""
    result = await db.session.stream(
        select(Item.name).order_by(Item.id).limit(3).execution_options(yield_per=2)
    )
    async for row in result:
        yield row.name.encode() + b"\n"


@dataclass
class Reply:
    """What the client got: a status (None: no complete response) and whether it was acked."""

    status: int | None
    acknowledged: bool


Send = Callable[[str], Awaitable[Reply]]


class Client:
    """Sends each scenario's request to the app, in-process or through a real server."""

    def __init__(self, http: httpx.AsyncClient, ws_url: str | None, app: Any) -> None:
        self.http = http
        self.ws_url = ws_url
        self.app = app
        self.in_flight: asyncio.Task[Reply] | None = None

    def drop(self) -> None:
        """Drop the connection of the request in flight (cancelling it closes its socket)."""
        if self.in_flight is not None:
            self.in_flight.cancel()

    async def send(self, scenario: str, name: str) -> Reply:
        if " " in scenario:  # "METHOD /path/{name}": an app's own route, acknowledged by a 2xx
            method, path = scenario.split(" ", 1)
            response = await self.http.request(method, path.format(name=name))
            return Reply(response.status_code, 200 <= response.status_code < 300)
        if scenario == "websocket":
            return await self._websocket(name)
        method = "GET" if scenario == "stream" else "POST"
        response = await self.http.request(method, f"/{scenario}/{name}")
        ok = 200 <= response.status_code < 300
        return Reply(response.status_code, ok and scenario != "background")

    async def _websocket(self, name: str) -> Reply:
        if self.ws_url is None:
            return await _websocket_in_process(self.app, name)
        async with connect(self.ws_url, open_timeout=5, close_timeout=1) as ws:
            await ws.send(name)
            try:
                answer = await asyncio.wait_for(ws.recv(), 5)
            except Exception:
                return Reply(None, False)
            return Reply(101, answer == "ok")


async def _websocket_in_process(app: Any, name: str) -> Reply:
    """Drive one websocket message through the ASGI app directly, as a server would."""
    incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for message in (
        {"type": "websocket.connect"},
        {"type": "websocket.receive", "text": name},
    ):
        incoming.put_nowait(message)
    sent: list[dict[str, Any]] = []
    acked = asyncio.Event()

    async def receive() -> dict[str, Any]:
        message = await incoming.get()
        return message

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "websocket.send":
            acked.set()
            incoming.put_nowait({"type": "websocket.disconnect", "code": 1000})
        if message["type"] == "websocket.close":
            incoming.put_nowait({"type": "websocket.disconnect", "code": 1000})

    scope = {
        "type": "websocket",
        "path": "/ws",
        "raw_path": b"/ws",
        "query_string": b"",
        "headers": [],
        "scheme": "ws",
        "asgi": {"version": "3.0"},
        "server": ("test", 80),
        "client": ("test", 1),
        "root_path": "",
        "subprotocols": [],
        "extensions": {},
        "state": {},
    }
    with contextlib.suppress(Exception):
        await app(scope, receive, send)
    answers = [m.get("text") for m in sent if m["type"] == "websocket.send"]
    return Reply(101 if answers else None, answers == ["ok"])


ClientFactory = Callable[[Any], AbstractAsyncContextManager[Client]]


@asynccontextmanager
async def in_process(app: Any) -> AsyncIterator[Client]:
    """Requests through httpx's ASGI transport, with the app's lifespan run around them."""
    from .adapters.scenarios import asgi_client

    async with asgi_client(app) as http:
        yield Client(http, None, app)


def through(server: Callable[[Any], AbstractAsyncContextManager[str]]) -> ClientFactory:
    """Requests through a real server started with ``server`` (uvicorn, hypercorn)."""

    @asynccontextmanager
    async def served(app: Any) -> AsyncIterator[Client]:
        async with server(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
            yield Client(http, url.replace("http://", "ws://") + "/ws", app)

    return served


async def run_matrix(
    db: Database,
    make_app: Callable[[Database, Observed], Any],
    scenario: str,
    clients: ClientFactory,
    *,
    sample: int | None = None,
) -> list[Case]:
    """Record ``scenario``, then fail each operation with each fault; raise on any problem.

    Args:
        db: The database under test (its engine is hooked for the run).
        make_app: Builds the app serving the matrix routes on ``db``, recording into the
            ``Observed`` it is given.
        scenario: One of :data:`SCENARIOS`, or ``"METHOD /path/{name}"`` for a route of
            the app's own that writes an item named ``name`` and answers 2xx once committed.
        clients: How requests reach the app (:func:`in_process` or :func:`through`).
        sample: Run one case in ``sample``, on diagonals of operations x faults, so every
            fault and every kind of operation still runs (the slower legs on CI).

    Returns:
        The cases that ran.
    """
    observed = Observed()
    app = observing(make_app(db, observed), observed)
    injector = FaultInjector(db.engine)
    problems: list[str] = []
    known_seen: list[str] = []
    try:
        async with clients(app) as client:
            injector.arm(None)
            await _one(client, scenario, "warm-up")  # first connect: the dialect's own queries
            await _settle(db, scenario)
            injector.arm(None)
            recorded = await _one(client, scenario, "recorded")
            assert recorded.acknowledged or scenario == "background", recorded
            await _settle(db, scenario)
            cases = injector.cases(*(("disconnect",) if client.ws_url else ()))
            injector.disconnect = client.drop
            recorded_operations = list(injector.operations)
            assert cases, f"{scenario} performed no database operation"
            if sample:  # diagonals of operations x faults: every fault, every kind of step
                faults = sorted({case.fault for case in cases}, key=[*FAULTS, "disconnect"].index)
                cases = [c for c in cases if (c.index + faults.index(c.fault)) % sample == 0]
            # Known failures last: what they leave pinned must not fail the cases after them.
            cases.sort(key=lambda case: (backend(db), scenario, case.label, case.fault) in KNOWN)
            CASES_RUN[backend(db)] += len(cases)
            for number, case in enumerate(cases):
                observed.handler_errors.clear()
                observed.server_errors.clear()
                name = f"{scenario[:4].strip()}-{number}-{case.fault}"
                injector.arm(case)
                reply = await _one(client, scenario, name, injector)
                await _settle(db, scenario)
                injector.arm(None)
                found = await _check(db, name, reply, observed)
                if injector.mismatch is not None:
                    found.append(
                        f"took another path: operation #{case.index} was {injector.mismatch}"
                    )
                known = KNOWN.get((backend(db), scenario, case.label, case.fault))
                if known and found:
                    known_seen.append(f"{case}: {'; '.join(found)} ({known})")
                problems += [] if known else [f"{case}: {p}" for p in found]
                if found:  # let the next case start clean: what the failure pinned, let go
                    observed.handler_errors.clear()
                    observed.server_errors.clear()
                    gc.collect()
    finally:
        injector.remove()
    KNOWN_SEEN.extend(known_seen)
    if problems:
        raise AssertionError(
            f"{len(problems)} problem(s) in {len(cases)} cases of {scenario} "
            f"(recorded: {', '.join(recorded_operations)}):\n" + "\n".join(problems)
        )
    return cases


REPLY_TIMEOUT = 15.0  # seconds a request may take before the client gives up on it
# Seconds a request may take once a "cancel" fault has fired in it. Quart answers nothing when
# its view task is cancelled (as for a client gone), and httpx's ASGI transport then waits for
# a response until the app returns: each such case waited the full REPLY_TIMEOUT (the Quart
# write-route matrix: 12 tests x 5 cases x 15 s, 15 minutes of its session on Python 3.13).
AFTER_CANCEL = 1.0


async def _one(
    client: Client, scenario: str, name: str, injector: FaultInjector | None = None
) -> Reply:
    """Send one request in a task of its own, so a cancellation stays with the request.

    The client gives up (cancels the request, as a client that drops the connection) after
    :data:`REPLY_TIMEOUT`, or :data:`AFTER_CANCEL` once ``injector`` fired a "cancel" fault.
    """
    task = client.in_flight = asyncio.create_task(client.send(scenario, name))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + REPLY_TIMEOUT
    try:
        while not task.done() and loop.time() < deadline:
            await asyncio.wait({task}, timeout=0.05)
            fired = injector.fired if injector is not None else None
            if fired is not None and fired.fault == "cancel":
                deadline = min(deadline, loop.time() + AFTER_CANCEL)
        task.cancel()  # no effect once it is done
        return await task
    except (Exception, asyncio.CancelledError):
        task.cancel()
        current = asyncio.current_task()
        cancelling = getattr(current, "cancelling", None)  # Python 3.11+
        if cancelling is not None and cancelling():  # the test itself is cancelled
            raise
        return Reply(None, False)


async def _settle(db: Database, scenario: str) -> None:
    """Give work that outlives the response (background tasks, scope ends) time to end."""
    await asyncio.sleep(0.05 if scenario in ("background", "websocket", "stream") else 0)


async def _check(db: Database, name: str, reply: Reply, observed: Observed) -> list[str]:
    found: list[str] = []
    try:
        await assert_no_leaks(db, wait=3)
    except AssertionError as exc:
        found.append(f"leak: {exc}")
    try:
        await assert_writable(db)
    except Exception as exc:
        found.append(f"not writable: {exc!r}")
    if reply.acknowledged and name not in await item_names(db):
        found.append(f"acknowledged ({reply.status}) but not committed")
    handler = observed.handler_errors[0] if observed.handler_errors else None
    for server in observed.server_errors:
        # A framework's task group cancels the handler with a CancelledError of its own.
        both_cancelled = handler is not None and all(
            issubclass(raised.kind, asyncio.CancelledError) for raised in (server, handler)
        )
        if handler is not None and server.identity != handler.identity and not both_cancelled:
            found.append(f"server saw {server} instead of the handler's {handler}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    found += [f"warning: {w.message}" for w in caught]
    return found


def record_handler_error(observed: Observed, error: BaseException) -> None:
    """What a handler calls when it raises, before re-raising."""
    observed.handler_errors.append(Raised.of(error))


def recording(observed: Observed) -> Callable[[Handler], Handler]:
    """A decorator for handlers: what the handler raises is recorded, then propagates.

    It wraps coroutine functions and async generator functions (a streamed body) alike.
    """

    def decorate(handler: Handler) -> Handler:
        if inspect.isasyncgenfunction(handler):

            @functools.wraps(handler)
            async def generator(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
                try:
                    async for item in handler(*args, **kwargs):
                        yield item
                except BaseException as exc:
                    record_handler_error(observed, exc)
                    raise

            return cast(Handler, generator)

        @functools.wraps(handler)
        async def recorded(*args: Any, **kwargs: Any) -> Any:
            try:
                return await handler(*args, **kwargs)
            except BaseException as exc:
                record_handler_error(observed, exc)
                raise

        return cast(Handler, recorded)

    return decorate


__all__ = [
    "SCENARIOS",
    "Client",
    "Observed",
    "count",
    "in_process",
    "record_handler_error",
    "recording",
    "run_matrix",
    "stream_names",
    "through",
]
