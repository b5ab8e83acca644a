"""The fault-injection matrix through the Starlette integration, in-process and behind uvicorn.

Cases are generated (``tests.fault_matrix``): each scenario runs once to record its database
operations, then once per operation and fault (a driver error, the connection killed on the
server, the task cancelled; behind a real server also the client disconnecting). Every
scenario runs with both commit policies on every database leg. On CI the full matrix runs
on one Python (``ALCHEMY_SCOPE_THOROUGH=1``, set by the noxfile for the newest: every case
in-process, every other one behind uvicorn); the other Pythons run every thirteenth case (a
spread over operations and faults). The few
cases known to fail (``tests.fault_matrix.KNOWN``, with the reason) run last and are listed
in the terminal summary.
"""

from __future__ import annotations

from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from alchemy_scope import Database
from alchemy_scope_starlette import install

from ..conftest import MakeDatabase
from ..fault_matrix import (
    SCENARIOS,
    Observed,
    count,
    in_process,
    recording,
    run_matrix,
    stream_names,
    through,
)
from ..models import Item
from ..servers import uvicorn_server
from ..support import THOROUGH

SAMPLE = None if THOROUGH else 13
# Behind the real server every other case where THOROUGH is set (CI's budget), every 13th
# elsewhere: the server adds the disconnect fault, the in-process runs cover every case.
SERVED_SAMPLE = 2 if THOROUGH else 13


def make_matrix_app(db: Database, observed: Observed) -> Starlette:
    """The matrix routes, written as a Starlette user would."""
    manual = db.commit_policy == "manual"
    recorded = recording(observed)

    @recorded
    async def plain(request: Request) -> Response:
        await count(db)
        db.session.add(Item(name=request.path_params["name"]))
        await db.session.flush()
        if manual:
            await db.session.commit()
        return PlainTextResponse("ok", status_code=201)

    @recorded
    async def stream(request: Request) -> Response:
        db.session.add(Item(name=request.path_params["name"]))
        await db.session.flush()
        if manual:
            await db.session.commit()
        return StreamingResponse(recorded(stream_names)(db), media_type="text/plain")

    async def background(request: Request) -> Response:
        name = request.path_params["name"]

        @recorded
        async def work() -> None:
            db.session.add(Item(name=name))
            await db.session.flush()
            if manual:
                await db.session.commit()

        return PlainTextResponse("accepted", status_code=202, background=BackgroundTask(work))

    @recorded
    async def block(request: Request) -> Response:
        async with db.session.begin():
            db.session.add(Item(name=request.path_params["name"]))
        return PlainTextResponse("ok", status_code=201)

    @recorded
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                name = await websocket.receive_text()
                db.session.add(Item(name=name))
                await db.session.commit()
                await websocket.send_text("ok")
        except WebSocketDisconnect:
            return

    app = Starlette(
        routes=[
            Route("/plain/{name}", plain, methods=["POST"]),
            Route("/stream/{name}", stream),
            Route("/background/{name}", background, methods=["POST"]),
            Route("/block/{name}", block, methods=["POST"]),
            WebSocketRoute("/ws", ws),
        ]
    )
    install(app, db)
    return app


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("commit", ["manual", "autocommit"])
async def test_every_operation_failing_in_process_ends_the_scope_clean(
    make_db: MakeDatabase, commit: Any, scenario: str
) -> None:
    """In-process: whichever operation fails with whichever fault, the scope ends clean."""
    await run_matrix(make_db(commit=commit), make_matrix_app, scenario, in_process, sample=SAMPLE)


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("commit", ["manual", "autocommit"])
async def test_every_operation_failing_behind_uvicorn_ends_the_scope_clean(
    make_db: MakeDatabase, commit: Any, scenario: str
) -> None:
    """Behind uvicorn: whichever operation fails with whichever fault, the scope ends clean."""
    db = make_db(commit=commit)
    await run_matrix(db, make_matrix_app, scenario, through(uvicorn_server), sample=SERVED_SAMPLE)
