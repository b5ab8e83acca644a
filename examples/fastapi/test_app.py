"""Tests of the example, the way an app's own tests use alchemy-scope's pytest plugin."""

from __future__ import annotations

import httpx
import pytest
from app import Todo
from sqlalchemy import select

from alchemy_scope import Database


async def test_a_created_todo_is_listed(client: httpx.AsyncClient) -> None:
    """POST /todos creates a todo that GET /todos lists."""
    created = await client.post("/todos", json={"title": "buy milk"})
    assert created.status_code == 201
    assert [todo["title"] for todo in (await client.get("/todos")).json()] == ["buy milk"]


@pytest.mark.parametrize("title", ["written first", "written second"])
async def test_each_test_sees_only_its_own_writes(client: httpx.AsyncClient, title: str) -> None:
    """Run in either order, the second test proves the first one's committed todo is gone."""
    assert (await client.post("/todos", json={"title": title})).status_code == 201
    assert [todo["title"] for todo in (await client.get("/todos")).json()] == [title]


async def test_a_duplicate_title_is_a_conflict(client: httpx.AsyncClient) -> None:
    """The second todo with one title is a 409, and only the first exists."""
    assert (await client.post("/todos", json={"title": "once"})).status_code == 201
    assert (await client.post("/todos", json={"title": "once"})).status_code == 409
    assert len((await client.get("/todos")).json()) == 1


async def test_the_test_body_sees_what_the_app_wrote(
    client: httpx.AsyncClient, alchemy_db: Database
) -> None:
    """db.session in the test shares the test's transaction with the app's requests."""
    await client.post("/todos", json={"title": "seen"})
    async with alchemy_db.scope():
        assert list(await alchemy_db.session.scalars(select(Todo.title))) == ["seen"]
