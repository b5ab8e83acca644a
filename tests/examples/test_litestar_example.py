"""The Todo contract against examples/litestar."""

from __future__ import annotations

from .contract import TodoContract


class TestLitestarExample(TodoContract):
    example = "litestar"
