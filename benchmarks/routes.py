"""The three measured routes, as each driver sends them."""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.models import READ_ID


@dataclass(frozen=True)
class BenchRoute:
    """One route of the bench apps and the request every driver sends to it.

    Attributes:
        name: ``ping``, ``read`` or ``insert``.
        method: The HTTP method.
        path: The request path.
        body: The request body (JSON for ``insert``).
        status: The status every response must have.
        uses_database: Whether the route's handler touches the database.
    """

    name: str
    method: str
    path: str
    body: bytes
    status: int
    uses_database: bool


PING = BenchRoute("ping", "GET", "/ping", b"", 200, uses_database=False)
READ = BenchRoute("read", "GET", f"/items/{READ_ID}", b"", 200, uses_database=True)
INSERT = BenchRoute("insert", "POST", "/items", b'{"name": "bench"}', 201, uses_database=True)
ROUTES = [PING, READ, INSERT]
ROUTE_TITLES = {
    "ping": "GET /ping (no database)",
    "read": "primary-key read",
    "insert": "insert + commit",
}
