"""DATABASE_INSIGHT=1 in an example: figures logged, Server-Timing sent; off without it.

Each ``test_<framework>_insight.py`` runs it against its example (with that adapter's tests).
"""

from __future__ import annotations

import logging
import re
from typing import ClassVar

import pytest

from ..adapters.scenarios import asgi_client
from .contract import loaded_example

TIMING = re.compile(
    r'^db;dur=[0-9.]+;desc="(\d+) statements?", db-pool;dur=[0-9.]+;desc="pool wait"$'
)


def statements(header: str) -> int:
    """The statement count a ``Server-Timing`` value reports."""
    match = TIMING.match(header)
    assert match, header
    return int(match.group(1))


class Kept(logging.Handler):
    """A handler keeping the messages it gets (Litestar configures logging of its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class InsightContract:
    """DATABASE_INSIGHT in the example named ``example``."""

    example: ClassVar[str]

    async def test_insight_switched_on_by_the_environment(
        self, leg_url: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """DATABASE_INSIGHT=1: responses carry Server-Timing, each request's figures are logged."""
        kept = Kept()
        logging.getLogger("alchemy_scope.insight").addHandler(kept)
        try:
            async with (
                loaded_example(self.example, leg_url, monkeypatch, {"INSIGHT": "1"}) as module,
                asgi_client(module.app) as client,
            ):
                created = await client.post("/todos", json={"title": "timed"})
                listed = await client.get("/todos")
                export = await client.get("/todos/export")
                health = await client.get("/health")
        finally:
            logging.getLogger("alchemy_scope.insight").removeHandler(kept)
        assert created.status_code == 201
        assert statements(created.headers["server-timing"]) == 1  # the INSERT, committed at start
        assert statements(listed.headers["server-timing"]) == 1
        assert statements(export.headers["server-timing"]) == 0  # its SELECT runs in the body
        assert statements(health.headers["server-timing"]) == 0
        logged = kept.messages
        assert any("GET /todos/export" in line and "1 statement(s)" in line for line in logged), (
            logged
        )
        assert any("POST /todos" in line and "1 commit(s)" in line for line in logged), logged

    async def test_insight_is_off_without_the_switch(
        self, leg_url: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without DATABASE_INSIGHT the example keeps no figures and sends no Server-Timing."""
        async with loaded_example(self.example, leg_url, monkeypatch) as module:
            assert module.db._insight is None
            async with asgi_client(module.app) as client:
                assert "server-timing" not in (await client.get("/todos")).headers
