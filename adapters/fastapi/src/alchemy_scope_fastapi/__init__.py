"""FastAPI integration of alchemy-scope: one SQLAlchemy ``AsyncSession`` per request."""

from __future__ import annotations

from alchemy_scope_starlette import lifespan_disposing

from ._integration import NotInstalledError, SessionDep, install, session_dependency

__version__ = "0.1.0"

__all__ = [
    "NotInstalledError",
    "SessionDep",
    "install",
    "lifespan_disposing",
    "session_dependency",
]
