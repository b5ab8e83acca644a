"""Every measured variant: a framework, how its handlers get a session, and its role."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy.ext.asyncio import AsyncEngine

Role = Literal["baseline", "alchemy-scope", "alternative"]


@dataclass(frozen=True)
class Variant:
    """One way to give a framework's handlers a session.

    Attributes:
        framework: ``starlette``, ``fastapi``, ``litestar`` or ``quart``.
        name: The app factory's name in ``benchmarks.apps_<framework>``.
        label: How the results name it.
        role: ``baseline`` (the framework alone, a session opened in each handler),
            ``alchemy-scope`` (one of our adapters) or ``alternative`` (another library or
            pattern).
    """

    framework: str
    name: str
    label: str
    role: Role

    @property
    def key(self) -> str:
        """``framework/name``: how the command line and the server processes name it."""
        return f"{self.framework}/{self.name}"

    def build(self, engine: AsyncEngine) -> Any:
        """Create the variant's ASGI app on ``engine``."""
        module = importlib.import_module(f"benchmarks.apps_{self.framework}")
        factory: Callable[[AsyncEngine], Any] = getattr(module, self.name)
        return factory(engine)


VARIANTS = [
    Variant("starlette", "bare", "Starlette, session per handler", "baseline"),
    Variant("starlette", "alchemy_scope", "alchemy-scope (db.session)", "alchemy-scope"),
    Variant(
        "starlette", "base_http_middleware", "BaseHTTPMiddleware scoped session", "alternative"
    ),
    Variant("fastapi", "bare", "FastAPI, session per handler", "baseline"),
    Variant("fastapi", "alchemy_scope", "alchemy-scope (db.session)", "alchemy-scope"),
    Variant("fastapi", "alchemy_scope_dependency", "alchemy-scope (SessionDep)", "alchemy-scope"),
    Variant("fastapi", "yield_dependency", "yield dependency", "alternative"),
    Variant("fastapi", "fastapi_async_sqlalchemy", "fastapi-async-sqlalchemy", "alternative"),
    Variant("litestar", "bare", "Litestar, session per handler", "baseline"),
    Variant("litestar", "alchemy_scope", "alchemy-scope (injected db_session)", "alchemy-scope"),
    Variant("litestar", "alchemy_scope_global", "alchemy-scope (db.session)", "alchemy-scope"),
    Variant("litestar", "advanced_alchemy", "advanced-alchemy SQLAlchemyPlugin", "alternative"),
    Variant("quart", "bare", "Quart, session per handler", "baseline"),
    Variant("quart", "alchemy_scope", "alchemy-scope (db.session)", "alchemy-scope"),
]
FRAMEWORKS = ["starlette", "fastapi", "litestar", "quart"]
SERVERS = {
    "starlette": "uvicorn",
    "fastapi": "uvicorn",
    "litestar": "uvicorn",
    "quart": "hypercorn",
}


def variants_of(framework: str) -> list[Variant]:
    """The variants of one framework, its baseline first."""
    return [variant for variant in VARIANTS if variant.framework == framework]


def variant(key: str) -> Variant:
    """The variant named ``framework/name``."""
    for candidate in VARIANTS:
        if candidate.key == key:
            return candidate
    raise KeyError(f"no variant {key!r}: choose one of {', '.join(v.key for v in VARIANTS)}")
