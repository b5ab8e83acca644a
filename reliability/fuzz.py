"""Bad input, generated: never a 5xx, and a 4xx never writes.

Hypothesis sends generated paths, query strings, JSON and raw bodies and websocket messages
to every endpoint of the contract; schemathesis generates requests from the app's OpenAPI
schema, when it serves one (FastAPI, Litestar). After each request, a 4xx must leave the
todos table untouched: a trigger counts every committed statement that writes to it. Runs
synchronously, in a thread of its own: hypothesis drives plain functions.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import asyncpg
import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from websockets.sync.client import connect

from tooling.postgres import APP_ROLE

from .client import Failures, Tally

# Every committed statement that writes to todos bumps a counter; a rolled-back one does not.
WRITE_COUNTER = """
CREATE TABLE IF NOT EXISTS reliability_writes (n bigint NOT NULL);
INSERT INTO reliability_writes SELECT 0 WHERE NOT EXISTS (SELECT FROM reliability_writes);
GRANT SELECT, UPDATE ON reliability_writes TO {role};
CREATE OR REPLACE FUNCTION reliability_count_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN UPDATE reliability_writes SET n = n + 1; RETURN NULL; END $$;
CREATE OR REPLACE TRIGGER reliability_count_writes AFTER INSERT OR UPDATE OR DELETE ON todos
FOR EACH STATEMENT EXECUTE FUNCTION reliability_count_write();
"""
COUNT_WRITES = "SELECT n FROM reliability_writes"
SCHEMA_PATHS = ("/openapi.json", "/schema/openapi.json")  # FastAPI, Litestar

EDGE_TITLES = ["", " ", "\t\n", "\x00", "a\x00b", "\ud800", "a\udfff", "x" * 200, "x" * 201,
               " " + "é" * 200 + " ", "🥛" * 201, "\u200b", "9" * 30, "null", "-1"]  # fmt: skip
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=30)
    | st.sampled_from(EDGE_TITLES)
)
# Any code point, lone surrogates and NUL included: what a JSON string can carry.
_any_text = st.text(st.characters(exclude_categories=()), max_size=210)
titles = st.one_of(st.sampled_from(EDGE_TITLES), _any_text, _scalars)
json_values = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["title", "done", "id", "x"]) | st.text(max_size=5),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)
# Mostly near-valid todos, which get past the first checks; sometimes anything at all.
todo_like = st.one_of(
    st.fixed_dictionaries({"title": titles}),
    st.fixed_dictionaries({"title": titles}, optional={"done": _scalars, "id": _scalars}),
    st.fixed_dictionaries({}, optional={"title": titles, "done": _scalars}),
    json_values,
)


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value).encode("utf-8", "surrogatepass")


bodies = st.one_of(
    todo_like.map(_json_bytes),
    st.lists(todo_like, max_size=5).map(_json_bytes),
    st.binary(max_size=64),
)
queries = st.dictionaries(
    st.sampled_from(["limit", "offset", "title", "x"]),
    st.one_of(st.integers(-(2**40), 2**70).map(str), st.text(max_size=12)),
    max_size=3,
)
todo_ids = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.text(min_size=1, max_size=12),
    st.sampled_from(["0", "1", "2147483647", "2147483648", "1e3", "0x1", " 1", "\u0661"]),
).map(lambda raw: quote(raw, safe=""))
messages = st.one_of(  # escaped: a lone surrogate travels as "\\ud800" in a text frame
    todo_like.map(json.dumps),
    st.text(st.characters(codec="utf-8"), max_size=40),
)


@dataclass(frozen=True)
class Endpoint:
    """An endpoint of the contract and how to generate requests for it."""

    method: str
    path: str  # as the contract writes it
    paths: Any = None  # strategy; the path itself when None
    body: Any = None  # strategy; no body when None
    edge: Callable[[str], Any] | None = None  # a body carrying a title, tried for every edge

    @property
    def label(self) -> str:
        """``METHOD /path``."""
        return f"{self.method} {self.path}"


ids_path = todo_ids.map("/todos/{}".format)
ENDPOINTS = [
    Endpoint("GET", "/health"),
    Endpoint("GET", "/todos"),
    Endpoint("POST", "/todos", body=bodies, edge=lambda title: {"title": title}),
    Endpoint("POST", "/todos/bulk", body=bodies, edge=lambda title: [{"title": title}]),
    Endpoint("GET", "/todos/export"),
    Endpoint("GET", "/todos/{id}", ids_path),
    Endpoint("PATCH", "/todos/{id}", ids_path, bodies, lambda title: {"title": title}),
    Endpoint("DELETE", "/todos/{id}", ids_path),
]


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,  # nothing written into the repository
        derandomize=True,  # the same examples every run: CI failures reproduce
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        report_multiple_bugs=False,
    )


class Fuzzer:
    """Sends generated requests to one served example and checks every answer."""

    def __init__(self, base_url: str, admin_dsn: str, tally: Tally) -> None:
        self.base_url = base_url
        self.admin_dsn = admin_dsn
        self.tally = tally
        self.sent = 0
        self.statuses: dict[int, int] = {}
        self._last: int | None = None  # the fingerprint after the last call, if known
        self._found: list[str] = []  # every failing request, as it was sent

    def fingerprint(self) -> int:
        """How many committed statements have written to todos so far."""
        return int(self._loop.run_until_complete(self._admin.fetchval(COUNT_WRITES)))

    def check(self, request: str, call: Callable[[], tuple[int, bytes]]) -> None:
        """Make one call; fail on a 5xx, and on a 4xx that changed the table.

        Args:
            request: The request as sent, for the report.
            call: Sends it; returns the status and the body.
        """
        before = self.fingerprint() if self._last is None else self._last
        self._last = None
        status, body = call()
        self.sent += 1
        self.statuses[status] = self.statuses.get(status, 0) + 1
        problem = None
        if status >= 500:
            problem = f"{request} answered {status} {body[:100]!r}"
        elif 400 <= status < 500:
            after = self.fingerprint()
            if after != before:
                problem = f"{request} answered {status} but wrote"
            self._last = after
        if problem:
            self._found.append(problem)
            raise AssertionError(problem)

    def _run(self, failures: Failures, test_settings: settings, test: Callable[[], None]) -> None:
        """Run one hypothesis test; record the smallest failing request it found."""
        found_before = len(self._found)
        try:
            test_settings(test)()
        except Unsatisfiable:  # no negative case exists (an operation without parameters)
            pass
        except Exception as exc:  # the shrunk failure, or hypothesis finding it flaky
            found = self._found[found_before:]
            failures.add(found[-1][:400] if found else f"{exc}"[:400])

    def run(self, examples: int, schema_examples: int) -> tuple[Failures, str]:
        """Fuzz every endpoint; return the failures and an account of what was sent."""
        failures = Failures()
        self._loop = asyncio.new_event_loop()
        self._admin = self._loop.run_until_complete(asyncpg.connect(self.admin_dsn))
        self._loop.run_until_complete(self._admin.execute(WRITE_COUNTER.format(role=APP_ROLE)))
        try:
            with httpx.Client(base_url=self.base_url, timeout=30) as client:
                for endpoint in ENDPOINTS:
                    self._run(failures, _settings(examples), self._endpoint_test(client, endpoint))
                self._run(failures, _settings(examples), self._websocket_test())
                schema = self._schema_tests(client, schema_examples, failures)
        finally:
            self._loop.run_until_complete(self._admin.close())
            self._loop.close()
        statuses = ", ".join(f"{code}: {count}" for code, count in sorted(self.statuses.items()))
        return failures, f"{self.sent} generated requests ({statuses}); {schema}"

    def _endpoint_test(self, client: httpx.Client, endpoint: Endpoint) -> Callable[[], None]:
        label, method = endpoint.label, endpoint.method
        paths = st.just(endpoint.path) if endpoint.paths is None else endpoint.paths
        body = st.none() if endpoint.body is None else endpoint.body

        @given(path=paths, params=queries, content=body)
        def endpoint_test(path: str, params: dict[str, str], content: bytes | None) -> None:
            def call() -> tuple[int, bytes]:
                headers = {"content-type": "application/json"} if content is not None else {}
                response = client.request(
                    method, path, params=params, content=content, headers=headers
                )
                self.tally.count(str(response.status_code), response.content, label)
                return response.status_code, response.content

            query = f"?{urlencode(params)}" if params else ""
            self.check(f"{method} {path}{query} {content!r:.200}", call)

        if endpoint.edge is not None:  # every edge title, every run
            path = endpoint.path.replace("{id}", "1")
            for title in EDGE_TITLES:
                content = _json_bytes(endpoint.edge(title))
                endpoint_test = example(path=path, params={}, content=content)(endpoint_test)
        endpoint_test.__name__ = label
        return endpoint_test

    def _websocket_test(self) -> Callable[[], None]:
        url = self.base_url.replace("http://", "ws://") + "/todos/ws"

        @given(message=messages)
        def websocket_test(message: str) -> None:
            def call() -> tuple[int, bytes]:
                with connect(url, open_timeout=10) as socket:
                    socket.send(message)
                    reply = json.loads(socket.recv(timeout=30))
                self.tally.count("ws", json.dumps(reply).encode(), "websocket")
                assert isinstance(reply, dict), f"websocket replied {reply!r}"
                return (201 if "id" in reply else 422), json.dumps(reply).encode()

            self.check(f"websocket /todos/ws message {message!r:.200}", call)

        for title in EDGE_TITLES:
            websocket_test = example(message=json.dumps({"title": title}))(websocket_test)
        return websocket_test

    def _schema_tests(self, client: httpx.Client, examples: int, failures: Failures) -> str:
        """Schemathesis, positive and negative, over every operation of the app's schema."""
        for path in SCHEMA_PATHS:
            response = client.get(path)
            if response.status_code == 200 and "openapi" in response.text[:100]:
                break
        else:
            return "no OpenAPI schema served: schemathesis skipped"
        schema = schemathesis.openapi.from_url(self.base_url + path)
        operations = [
            operation
            for operation in (result.ok() for result in schema.get_all_operations())
            if not operation.path.startswith("/__")  # the harness's own routes
        ]
        before = self.sent
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                self._run(failures, _settings(examples), self._schema_case_test(operation, mode))
        sent = self.sent - before
        return f"schemathesis ({path}): {sent} requests over {len(operations)} operations"

    def _schema_case_test(self, operation: Any, mode: Any) -> Callable[[], None]:
        label = f"{operation.method.upper()} {operation.path} ({mode.value})"

        @given(case=operation.as_strategy(generation_mode=mode))
        def schema_case(case: Any) -> None:
            def call() -> tuple[int, bytes]:
                response = case.call(base_url=self.base_url, timeout=30)
                self.tally.count(str(response.status_code), response.content, label)
                return response.status_code, response.content

            self.check(f"{label}: {case.as_curl_command()[:300]}", call)

        return schema_case
