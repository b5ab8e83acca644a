"""Tests of the example, the way an app's own tests use alchemy-scope's pytest plugin."""

from __future__ import annotations

import pytest
from app import Todo
from quart.typing import TestClientProtocol as QuartTestClient  # pytest would collect Test*
from sqlalchemy import select

from alchemy_scope import Database


async def test_a_created_todo_is_listed(client: QuartTestClient) -> None:
    """POST /todos creates a todo that GET /todos lists."""
    created = await client.post("/todos", json={"title": "buy milk"})
    assert created.status_code == 201
    listed = await (await client.get("/todos")).get_json()
    assert [todo["title"] for todo in listed] == ["buy milk"]


@pytest.mark.parametrize("title", ["written first", "written second"])
async def test_each_test_sees_only_its_own_writes(client: QuartTestClient, title: str) -> None:
    """Run in either order, the second test proves the first one's committed todo is gone."""
    assert (await client.post("/todos", json={"title": title})).status_code == 201
    listed = await (await client.get("/todos")).get_json()
    assert [todo["title"] for todo in listed] == [title]


async def test_a_duplicate_title_is_a_conflict(client: QuartTestClient) -> None:
    """The second todo with one title is a 409, and only the first exists."""
    assert (await client.post("/todos", json={"title": "once"})).status_code == 201
    assert (await client.post("/todos", json={"title": "once"})).status_code == 409
    assert len(await (await client.get("/todos")).get_json()) == 1


async def test_a_todo_sent_over_the_websocket_is_created(client: QuartTestClient) -> None:
    """A todo sent over the websocket is answered with its JSON and listed by a later request."""
    async with client.websocket("/todos/ws") as socket:
        await socket.send_json({"title": "by socket"})
        assert (await socket.receive_json())["title"] == "by socket"
    listed = await (await client.get("/todos")).get_json()
    assert [todo["title"] for todo in listed] == ["by socket"]


async def test_the_test_body_sees_what_the_app_wrote(
    client: QuartTestClient, alchemy_db: Database
) -> None:
    """db.session in the test shares the test's transaction with the app's requests."""
    await client.post("/todos", json={"title": "seen"})
    async with alchemy_db.scope():
        assert list(await alchemy_db.session.scalars(select(Todo.title))) == ["seen"]


async def test_the_app_sees_what_the_test_body_wrote(
    client: QuartTestClient, alchemy_db: Database
) -> None:
    """A request sent inside the test's scope nests in it and sees its uncommitted writes."""
    async with alchemy_db.scope():
        alchemy_db.session.add(Todo(title="from the test", done=False))
        await alchemy_db.session.flush()
        listed = await (await client.get("/todos")).get_json()
    assert [todo["title"] for todo in listed] == ["from the test"]
