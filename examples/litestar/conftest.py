"""Test fixtures for this example: each test runs in a transaction rolled back at its end.

alchemy-scope's pytest plugin (installed with it) provides ``alchemy_db``; it only needs to
know the app's Database, through the ``alchemy_database`` fixture.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from alchemy_scope import Database

# A database for the tests; point DATABASE_URL elsewhere to test against PostgreSQL.
os.environ.setdefault(
    "DATABASE_URL", f"sqlite+aiosqlite:///{Path(tempfile.mkdtemp()) / 'todos.db'}"
)

from app import app, db


@pytest.fixture
def alchemy_database() -> Database:
    return db


async def app_with_state_copies(scope: Any, receive: Any, send: Any) -> None:
    """The app, each request with its own copy of the lifespan state, as servers give it.

    asgi-lifespan hands every request the same state dict, and Litestar keeps per-request
    bookkeeping there (whether the response has started, the parsed body): without a copy,
    an exception in any request after the first ends in Litestar's "Exception caught after
    response started" instead of its error response. The alchemy-scope-litestar README says so.
    """
    if scope["type"] != "lifespan" and "state" in scope:
        scope = {**scope, "state": dict(scope["state"])}
    await app(scope, receive, send)


@pytest.fixture
async def client(alchemy_db: Database) -> AsyncIterator[httpx.AsyncClient]:
    """The app, started, behind an in-process HTTP client, inside the test's transaction.

    httpx runs the app on the test's event loop; Litestar's AsyncTestClient would run it on
    another, where the engine's connections do not work.
    """
    async with LifespanManager(app_with_state_copies) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client
