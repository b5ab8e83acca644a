"""DATABASE_INSIGHT=1 in examples/quart: Server-Timing and each request's figures."""

from __future__ import annotations

from .insight import InsightContract


class TestQuartInsight(InsightContract):
    example = "quart"
