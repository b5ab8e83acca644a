"""Quart integration of alchemy-scope: one SQLAlchemy ``AsyncSession`` per request."""

from __future__ import annotations

from ._integration import AlchemyScope

__version__ = "0.1.0"

__all__ = ["AlchemyScope"]
