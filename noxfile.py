"""Every check of the project.

`nox -s tests` runs the test matrix, `nox -s lint typecheck lowest` the rest. Database legs:
SQLite always; PostgreSQL and MariaDB when ALCHEMY_SCOPE_TEST_DATABASES lists their URLs
(.ci/run sets it).
"""

from __future__ import annotations

import os

import nox

nox.options.default_venv_backend = "uv"
nox.options.download_python = "never"  # only the interpreters installed here, never a download
nox.options.error_on_missing_interpreters = bool(os.environ.get("CI"))  # a missing Python fails CI
nox.options.sessions = ["lint", "typecheck", "tests"]

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
OLDEST_PYTHON = PYTHONS[0]
# Each tested package: its own directory (None for core) and the test files that cover it.
PACKAGES: dict[str, tuple[str | None, list[str]]] = {
    "core": (None, ["tests/core"]),
    "starlette": ("adapters/starlette", ["tests/adapters/test_starlette.py"]),
}
PYPROJECT = nox.project.load_toml("pyproject.toml")
TEST_DEPENDENCIES = nox.project.dependency_groups(PYPROJECT, "test")


def _install(session: nox.Session, package: str, *uv_options: str) -> None:
    """Install core, one adapter and the test dependencies: nothing of the other frameworks."""
    directory, _ = PACKAGES[package]
    editables = ["-e", "core", *(["-e", directory] if directory else [])]
    session.install(*uv_options, *editables, *TEST_DEPENDENCIES)


def _pytest(session: nox.Session, package: str) -> None:
    _, paths = PACKAGES[package]
    session.run(
        "pytest",
        *paths,
        "tests/test_packages.py",
        *session.posargs,
        env={"ALCHEMY_SCOPE_PACKAGE": package},
    )


@nox.session(python=PYTHONS)
@nox.parametrize("package", list(PACKAGES))
def tests(session: nox.Session, package: str) -> None:
    """The test suite of one package on one Python, on every database leg."""
    _install(session, package)
    _pytest(session, package)


@nox.session(python=OLDEST_PYTHON)
@nox.parametrize("package", list(PACKAGES))
def lowest(session: nox.Session, package: str) -> None:
    """The same tests with every direct dependency at its lowest allowed version."""
    _install(session, package, "--resolution", "lowest-direct")
    session.run("uv", "pip", "list", external=True, silent=False)
    _pytest(session, package)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """Ruff: lint and formatting."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python="3.13")
def typecheck(session: nox.Session) -> None:
    """Mypy --strict over every distribution, installed together in one environment."""
    directories = ["core", *(d for d, _ in PACKAGES.values() if d)]
    session.install(
        *(arg for d in directories for arg in ("-e", d)),
        *nox.project.dependency_groups(PYPROJECT, "typecheck"),
    )
    session.run("mypy", *(f"{d}/src" for d in directories))
