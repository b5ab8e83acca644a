"""The Todo contract against examples/starlette."""

from __future__ import annotations

from .contract import TodoContract


class TestStarletteExample(TodoContract):
    example = "starlette"
