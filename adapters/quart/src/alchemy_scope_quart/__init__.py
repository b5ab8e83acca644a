"""Quart integration of alchemy-scope: one SQLAlchemy ``AsyncSession`` per request."""

from __future__ import annotations

from ._integration import AlchemyScope

__all__ = ["AlchemyScope"]
