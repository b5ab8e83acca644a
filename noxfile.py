"""Every check of the project.

`nox -s tests` runs the test matrix, `nox -s lint typecheck lowest` the rest. Database legs:
SQLite always; PostgreSQL and MariaDB when ALCHEMY_SCOPE_TEST_DATABASES lists their URLs
(.ci/run sets it).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nox
from packaging.requirements import Requirement

nox.options.default_venv_backend = "uv"
nox.options.download_python = "never"  # only the interpreters installed here, never a download
nox.options.error_on_missing_interpreters = bool(os.environ.get("CI"))  # a missing Python fails CI
nox.options.sessions = ["lint", "typecheck", "tests"]

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
OLDEST_PYTHON = PYTHONS[0]
ROOT = Path(__file__).parent
PYPROJECT = nox.project.load_toml("pyproject.toml")
TEST_DEPENDENCIES = nox.project.dependency_groups(PYPROJECT, "test")


def _adapters() -> dict[str, list[str]]:
    """Each adapter under adapters/ and the workspace directories it installs (its own last)."""
    adapters = {}
    for pyproject in sorted(ROOT.glob("adapters/*/pyproject.toml")):
        name = pyproject.parent.name
        requires = nox.project.load_toml(pyproject)["project"]["dependencies"]
        names = [Requirement(requirement).name for requirement in requires]
        siblings = [
            f"adapters/{name.removeprefix('alchemy-scope-')}"
            for name in names
            if name.startswith("alchemy-scope-")
        ]
        adapters[name] = [*siblings, f"adapters/{name}"]
    return adapters


def _adapter_tests(name: str) -> list[str]:
    """The adapter's scenarios, the contract suite of its example, and the example's tests."""
    contract = [
        str(path.relative_to(ROOT)) for path in ROOT.glob(f"tests/examples/test_{name}_*.py")
    ]
    example = [f"examples/{name}"] if (ROOT / "examples" / name / "test_app.py").exists() else []
    extra = [str(path.relative_to(ROOT)) for path in ROOT.glob(f"tests/adapters/test_{name}_*.py")]
    return [f"tests/adapters/test_{name}.py", *extra, *contract, *example]


ADAPTERS = _adapters()
# Each tested package: the editable directories it installs and the tests that cover it.
PACKAGES: dict[str, tuple[list[str], list[str]]] = {
    "core": (["core"], ["tests/core"]),
    **{
        name: (["core", *directories], _adapter_tests(name))
        for name, directories in ADAPTERS.items()
    },
}


def _install(session: nox.Session, package: str, *uv_options: str) -> None:
    """Install core, one adapter and the test dependencies: nothing of the other frameworks."""
    directories, _ = PACKAGES[package]
    editables = [arg for directory in directories for arg in ("-e", directory)]
    session.install(*uv_options, *editables, *TEST_DEPENDENCIES)


def _pytest(session: nox.Session, package: str) -> None:
    _, paths = PACKAGES[package]
    env = {"ALCHEMY_SCOPE_PACKAGE": package}
    if session.python == PYTHONS[-1]:  # the slowest tests in full once; a sample elsewhere
        env["ALCHEMY_SCOPE_THOROUGH"] = "1"
    session.run("pytest", *paths, "tests/test_packages.py", *session.posargs, env=env)


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
    directories = ["core", *(f"adapters/{name}" for name in ADAPTERS)]
    session.install(
        *(arg for d in directories for arg in ("-e", d)),
        *nox.project.dependency_groups(PYPROJECT, "typecheck"),
    )
    session.run("mypy", *(f"{d}/src" for d in directories))


@nox.session
def demo(session: nox.Session) -> None:
    """Serve one example Todo API on http://127.0.0.1:8000: `nox -s demo -- starlette`.

    FastAPI when none is named. DATABASE_URL chooses the database (default: SQLite todos.db
    in the example's directory).
    """
    framework = session.posargs[0] if session.posargs else "fastapi"
    if framework not in ADAPTERS or not (ROOT / "examples" / framework).is_dir():
        session.error(f"No example for {framework!r}: choose one of {', '.join(ADAPTERS)}.")
    directories, _ = PACKAGES[framework]
    editables = [arg for directory in directories for arg in ("-e", directory)]
    session.install(*editables, "-r", f"examples/{framework}/requirements.txt")
    session.chdir(f"examples/{framework}")
    if framework == "quart":
        session.run("hypercorn", "app:app", "--bind", "127.0.0.1:8000")
    else:
        session.run("uvicorn", "app:app", "--host", "127.0.0.1", "--port", "8000")


@nox.session(python="3.13")
def bench(session: nox.Session) -> None:
    """Benchmarks (not in `tests`, not in CI): each adapter against its bare framework.

    Writes benchmarks/results/ and takes about 10 minutes; `nox -s bench -- --quick` is a
    one-minute smoke run that writes benchmarks/results/quick/. PostgreSQL from
    ALCHEMY_SCOPE_BENCH_POSTGRES (default postgresql+asyncpg://postgres@127.0.0.1:5432/test).
    """
    directories = ["core", *(f"adapters/{name}" for name in ADAPTERS)]
    session.install(
        *(arg for directory in directories for arg in ("-e", directory)),
        "-r",
        "benchmarks/requirements.txt",
    )
    if shutil.which("wrk") is None and hasattr(os, "geteuid") and os.geteuid() == 0:
        session.run("apt-get", "install", "-y", "-q", "wrk", external=True, success_codes=[0, 100])
    session.run("python", "-m", "benchmarks", *session.posargs)


@nox.session(python="3.13")
def reliability(session: nox.Session) -> None:
    """Every example through a real server against a private PostgreSQL: load, faults, leaks.

    About 4 minutes; `nox -s reliability -- --quick` is a smoke run and `-- starlette` picks
    examples. Needs PostgreSQL's initdb and pg_ctl: it starts (and restarts, and removes) its
    own instance on a free port, never the shared one. Writes reliability/results.md.
    """
    directories = ["core", *(f"adapters/{name}" for name in ADAPTERS)]
    examples = sorted(ROOT.glob("examples/*/requirements.txt"))
    session.install(
        *(arg for directory in directories for arg in ("-e", directory)),
        *(arg for path in examples for arg in ("-r", str(path.relative_to(ROOT)))),
        "-r",
        "reliability/requirements.txt",
    )
    session.run("python", "-m", "reliability", *session.posargs)
