"""Test fixtures for this example: each test runs in a transaction rolled back at its end.

alchemy-scope's pytest plugin (installed with it) provides ``alchemy_db``; it only needs to
know the app's Database, through the ``alchemy_database`` fixture.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from quart.typing import TestClientProtocol as QuartTestClient

from alchemy_scope import Database

# A database for the tests; point DATABASE_URL elsewhere to test against PostgreSQL.
os.environ.setdefault(
    "DATABASE_URL", f"sqlite+aiosqlite:///{Path(tempfile.mkdtemp()) / 'todos.db'}"
)

from app import app, db


@pytest.fixture
def alchemy_database() -> Database:
    return db


@pytest.fixture
async def client(alchemy_db: Database) -> AsyncIterator[QuartTestClient]:
    """Quart's test client, the app started (before_serving), inside the test's transaction."""
    async with app.test_app() as test_app:
        yield test_app.test_client()
