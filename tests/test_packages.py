"""Each nox session installs core plus one adapter: prove the other frameworks are absent."""

from __future__ import annotations

import importlib
import importlib.util
import os

import pytest

# What each package may bring along; every other framework must be missing.
FRAMEWORKS = ("starlette", "fastapi", "litestar", "quart")
ALLOWED = {
    "core": set(),
    "starlette": {"starlette"},
    "fastapi": {"starlette", "fastapi"},
    "litestar": {"litestar"},
    "quart": {"quart"},
}
ADAPTERS = {
    "starlette": "alchemy_scope_starlette",
    "fastapi": "alchemy_scope_fastapi",
    "litestar": "alchemy_scope_litestar",
    "quart": "alchemy_scope_quart",
}

PACKAGE = os.environ.get("ALCHEMY_SCOPE_PACKAGE")
pytestmark = pytest.mark.skipif(PACKAGE is None, reason="run by nox, which names the package")


def test_only_the_tested_frameworks_are_installed() -> None:
    """The frameworks other than the tested package's own cannot be imported."""
    assert PACKAGE is not None
    installed = {name for name in FRAMEWORKS if importlib.util.find_spec(name) is not None}
    assert installed == ALLOWED[PACKAGE]


def test_only_the_tested_adapter_is_installed() -> None:
    """Core is importable; of the adapters, only the tested one (and what it builds on)."""
    assert PACKAGE is not None
    assert importlib.util.find_spec("alchemy_scope") is not None
    expected = {ADAPTERS[name] for name in ALLOWED[PACKAGE] if name in ADAPTERS}
    if PACKAGE == "fastapi":
        expected = {"alchemy_scope_starlette", "alchemy_scope_fastapi"}
    installed = {name for name in ADAPTERS.values() if importlib.util.find_spec(name)}
    assert installed == expected


HINTS = {  # FastAPI's scopes come from the Starlette integration, and so does its hint
    "starlette": "install(app, db)",
    "litestar": "AlchemyScopePlugin",
    "quart": "AlchemyScope(app, db)",
}


def test_the_installed_adapter_tells_how_it_opens_scopes() -> None:
    """NoScopeError's message carries the imported integration's hint, and core names none."""
    assert PACKAGE is not None
    if PACKAGE != "core":
        importlib.import_module(ADAPTERS[PACKAGE])
    from alchemy_scope import NoScopeError

    message = str(NoScopeError())
    for name, hint in HINTS.items():
        assert (hint in message) == (name in ALLOWED[PACKAGE]), (name, message)
