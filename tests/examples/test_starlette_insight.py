"""DATABASE_INSIGHT=1 in examples/starlette: Server-Timing and each request's figures."""

from __future__ import annotations

from .insight import InsightContract


class TestStarletteInsight(InsightContract):
    example = "starlette"
