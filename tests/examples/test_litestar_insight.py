"""DATABASE_INSIGHT=1 in examples/litestar: Server-Timing and each request's figures."""

from __future__ import annotations

from .insight import InsightContract


class TestLitestarInsight(InsightContract):
    example = "litestar"
