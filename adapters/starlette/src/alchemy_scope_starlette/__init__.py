"""Starlette integration of alchemy-scope: one SQLAlchemy ``AsyncSession`` per request."""

from __future__ import annotations

from ._integration import AlreadyInstalledError, install, lifespan_disposing

__all__ = ["AlreadyInstalledError", "install", "lifespan_disposing"]
