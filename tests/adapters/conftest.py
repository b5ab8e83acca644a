"""Rules for the adapter tests: no test shadows a scenario; known defects are strict xfails."""

from __future__ import annotations

import pytest

from .scenarios import AdapterScenarios, ValidationScenarios

SCENARIOS = {name for name in dir(ValidationScenarios) if name.startswith("test_")}


def _shadowing(item: pytest.Function) -> str | None:
    """Where ``item`` reuses the name of a scenario it does not inherit as it is, if it does."""
    cls = item.cls
    if cls is None or not issubclass(cls, AdapterScenarios):
        return "a module-level test" if item.originalname in SCENARIOS else None
    for klass in cls.__mro__:
        if klass in (AdapterScenarios, ValidationScenarios):
            return None
        if item.originalname in vars(klass):
            return f"{klass.__name__} overrides it"
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if not isinstance(item, pytest.Function) or "adapters" not in item.path.parts:
            continue
        shadowing = _shadowing(item)
        if shadowing:
            raise pytest.UsageError(
                f"{item.nodeid}: {shadowing}, with the name of a shared scenario in "
                "tests/adapters/scenarios.py: rename it, or change the scenario"
            )
        if item.cls is not None and issubclass(item.cls, AdapterScenarios):
            defects = item.cls.known_defects
            unknown = set(defects) - SCENARIOS
            if unknown:
                raise pytest.UsageError(f"{item.cls.__name__}.known_defects: no {unknown}")
            if item.originalname in defects:
                reason = defects[item.originalname]
                item.add_marker(pytest.mark.xfail(reason=reason, strict=True))
