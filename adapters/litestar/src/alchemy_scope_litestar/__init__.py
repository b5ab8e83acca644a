"""Litestar integration of alchemy-scope: one SQLAlchemy ``AsyncSession`` per request."""

from __future__ import annotations

from ._integration import AlchemyScopePlugin

__all__ = ["AlchemyScopePlugin"]
