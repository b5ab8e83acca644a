"""Starlette integration of alchemy-scope: one SQLAlchemy ``AsyncSession`` per request."""

from __future__ import annotations

from ._integration import install, lifespan_disposing

__version__ = "0.1.0"

__all__ = ["install", "lifespan_disposing"]
