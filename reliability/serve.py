"""Serve one example on a real server (uvicorn, or hypercorn for Quart) on 127.0.0.1.

``python -m reliability.serve <framework>`` imports ``examples/<framework>/app.py`` the way
``uvicorn app:app`` would, with ``DATABASE_URL`` and the ``DATABASE_POOL_*`` settings from the
environment, mounts the harness routes (:mod:`reliability.routes`) and wraps the app in
:class:`Harness`; :func:`tooling.servers.serve_until_signalled` serves it (it prints
``LISTENING <port>``, stops on SIGTERM, and the app's shutdown disposes the engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from alchemy_scope import Database
from tooling.servers import serve_until_signalled

from .routes import create_tables, mount

# RELIABILITY_EXAMPLES points at another copy of examples/: to try a fix before it lands.
EXAMPLES = Path(
    os.environ.get("RELIABILITY_EXAMPLES", Path(__file__).resolve().parent.parent / "examples")
)
LEAKS_PATH = "/__leaks"
CANCEL_HEADER = b"x-reliability-cancel-after"
SERVER_OPTIONS: dict[str, dict[str, Any]] = {  # the servers' logs are checked for secrets
    "uvicorn": {"log_level": "info", "access_log": False, "backlog": 2048, "ws": "auto"},
    "hypercorn": {"loglevel": "INFO", "graceful_timeout": 3, "backlog": 2048},
}

logger = logging.getLogger("reliability.serve")


def examples() -> list[str]:
    """The examples there are: every ``examples/<framework>/app.py``."""
    return sorted(path.parent.name for path in EXAMPLES.glob("*/app.py"))


def server_for(framework: str) -> str:
    """``hypercorn`` if the example's requirements name it (Quart), else ``uvicorn``."""
    requirements = EXAMPLES / framework / "requirements.txt"
    named = requirements.read_text() if requirements.exists() else ""
    return "hypercorn" if "hypercorn" in named else "uvicorn"


def load_example(framework: str) -> Any:
    """Import the example's ``app`` module as ``uvicorn app:app`` run from its directory would."""
    sys.path.insert(0, str(EXAMPLES / framework))
    return importlib.import_module("app")


def registry_size(db: Database) -> int:
    """How many sessions the registry of ``db`` holds (scopes not yet ended)."""
    return len(db.scoped_session.registry.registry)  # type: ignore[attr-defined]


class Harness:
    """An ASGI wrapper around the example: a leak report, and handlers cancelled on request.

    - ``GET /__leaks`` answers, without entering the app: the registry size, the pool's
      checked-out connections, and the reprs of the database objects (for the secrets check).
    - A request with the header ``x-reliability-cancel-after: <seconds>`` has its app task
      cancelled after that long, as a server or proxy timeout would; if no response had
      started, the client gets a 504.
    """

    def __init__(self, app: Any, db: Database) -> None:
        self.app = app
        self.db = db

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Answer the leak report, cancel on request, pass everything else to the app."""
        if scope["type"] == "http":
            if scope["path"] == LEAKS_PATH:
                await _send_json(send, 200, self.leaks())
                return
            for name, value in scope["headers"]:
                if name == CANCEL_HEADER:
                    await self.cancelled_after(float(value), scope, receive, send)
                    return
        await self.app(scope, receive, send)

    def leaks(self) -> dict[str, Any]:
        """What the leak check reads."""
        engine = self.db.engine
        return {
            "registry": registry_size(self.db),
            "checkedout": engine.pool.checkedout(),  # type: ignore[attr-defined]
            "reprs": [
                repr(self.db),
                repr(engine),
                repr(engine.url),
                str(engine.url),
                repr(engine.pool),
                engine.pool.status(),
            ],
        }

    async def cancelled_after(self, delay: float, scope: Any, receive: Any, send: Any) -> None:
        """Run the app, cancelling it after ``delay`` seconds if it has not finished."""
        started = False

        async def tracking_send(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, tracking_send))
        done, _ = await asyncio.wait({task}, timeout=delay)
        if task in done:
            task.result()
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if not started:
            await _send_json(send, 504, {"detail": "The harness cancelled this request."})


async def _send_json(send: Any, status: int, body: Any) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def main(framework: str) -> None:
    """Load, wrap and serve the example."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    module = load_example(framework)
    db: Database = module.db
    await create_tables(db)
    app, mounted = module.app, mount(module.app, db)
    logger.info("Serving examples/%s with %s; harness routes: %s", framework, db, mounted)
    logger.info("Engine %r, pool %s", db.engine, db.engine.pool.status())
    server = server_for(framework)
    await serve_until_signalled(Harness(app, db), server, **SERVER_OPTIONS[server])


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
