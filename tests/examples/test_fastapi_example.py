"""The Todo contract against examples/fastapi."""

from __future__ import annotations

from .contract import TodoContract


class TestFastAPIExample(TodoContract):
    example = "fastapi"
