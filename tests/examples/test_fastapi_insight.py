"""DATABASE_INSIGHT=1 in examples/fastapi: Server-Timing and each request's figures."""

from __future__ import annotations

from .insight import InsightContract


class TestFastAPIInsight(InsightContract):
    example = "fastapi"
