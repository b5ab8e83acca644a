"""Every check of the project.

`nox -s tests` runs the test matrix, `nox -s lint typecheck lowest` the rest. Database legs:
SQLite always; PostgreSQL and MariaDB when ALCHEMY_SCOPE_TEST_DATABASES lists their URLs
(.ci/run sets it).
"""

from __future__ import annotations

import atexit
import datetime
import fnmatch
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import nox
from packaging.requirements import Requirement

sys.path.insert(0, str(Path(__file__).parent))  # the repository's tooling/ (stdlib only here)
from tooling.pgbouncer import PrivatePgBouncer, pgbouncer_binary

nox.options.default_venv_backend = "uv"
nox.options.download_python = "never"  # only the interpreters installed here, never a download
nox.options.error_on_missing_interpreters = bool(os.environ.get("CI"))  # a missing Python fails CI
nox.options.sessions = ["lint", "typecheck", "tests"]

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
OLDEST_PYTHON = PYTHONS[0]
ROOT = Path(__file__).parent
PYPROJECT = nox.project.load_toml("pyproject.toml")
TEST_DEPENDENCIES = nox.project.dependency_groups(PYPROJECT, "test")
COVERAGE = "coverage>=7.10"  # [run] patch = ["subprocess"] came in 7.10
# Where each `nox -s tests` session writes its branch coverage (.coverage.<host>.<pid>.<n>,
# [tool.coverage.run] parallel) and `nox -s coverage` combines them.
COVERAGE_DATA = ROOT / ".coverage"


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


def _install(
    session: nox.Session, package: str, *uv_options: str, extra: tuple[str, ...] = ()
) -> None:
    """Install core, one adapter and the test dependencies: nothing of the other frameworks."""
    directories, _ = PACKAGES[package]
    editables = [arg for directory in directories for arg in ("-e", directory)]
    session.install(*uv_options, *editables, *TEST_DEPENDENCIES, *extra)


def _pytest(session: nox.Session, package: str, *, measure: bool = False) -> None:
    """Run the package's tests; ``measure``: under coverage.py, into a data file of their own."""
    _, paths = PACKAGES[package]
    env = {"ALCHEMY_SCOPE_PACKAGE": package}
    if session.python == PYTHONS[-1]:  # the slowest tests in full once; a sample elsewhere
        env["ALCHEMY_SCOPE_THOROUGH"] = "1"
    command = ["pytest", *paths, "tests/test_packages.py", *session.posargs]
    if measure:
        env["COVERAGE_FILE"] = str(COVERAGE_DATA)
        # sys.monitoring measures branches from Python 3.14 on; before, coverage.py falls
        # back to its C tracer with a warning (no-sysmon), so ask for it only there.
        if tuple(map(int, str(session.python).split("."))) >= (3, 14):
            env["COVERAGE_CORE"] = "sysmon"
        # Under coverage.py's greenlet tracing a teardown of tests/core/test_replicas.py hangs
        # on Python 3.10 (SQLAlchemy 2.0): threads only there; the other Pythons' data cover
        # what that mismeasures.
        concurrency = ["--concurrency=thread"] if session.python == OLDEST_PYTHON else []
        command = ["coverage", "run", *concurrency, "-m", *command]
    session.run(*command, env=env)


# --- the closing summary of `nox -s tests`: what ran, what was skipped, how to enable it ----
_TESTS_RAN: list[tuple[str, str]] = []  # (python, package) of each tests session started
_SERVER_LEGS = {  # backend: the URL .ci/run uses (it starts both servers)
    "postgresql": "postgresql+asyncpg://postgres@127.0.0.1:5432/test",
    "mysql": "mysql+asyncmy://root@127.0.0.1:3306/test",
}


def _interpreter_runs(version: str) -> bool:
    try:
        run = subprocess.run([f"python{version}", "-c", ""], check=False, capture_output=True)
    except OSError:
        return False
    return run.returncode == 0


def _enable_python(version: str) -> str:
    """The one line that makes Python ``version`` visible to nox."""
    try:
        listed = subprocess.run(
            ["pyenv", "versions", "--bare"], check=False, capture_output=True, text=True
        ).stdout.split()
    except OSError:
        listed = []
    newest = {p: [v for v in listed if v.startswith(f"{p}.")][-1:] for p in PYTHONS}
    if newest[version]:  # installed in pyenv, not active: make every version visible at once
        found = [v for versions in newest.values() for v in versions]
        first = [v for v in found if v.startswith(sys.version.split()[0])]  # nox's own first
        return "export PYENV_VERSION=" + ":".join(dict.fromkeys([*first, *found]))
    return f"pyenv install {version}   # or put any python{version} on PATH"


def _tests_summary() -> None:
    """End a run of `nox -s tests` with what ran, what was skipped and how to enable it."""
    if not _TESTS_RAN:
        return
    lines = ["", "nox -s tests: what ran"]
    for python in PYTHONS:
        packages = [package for ran, package in _TESTS_RAN if ran == python]
        if packages:
            lines.append(f"  ran      Python {python}: {', '.join(packages)}")
        elif not _interpreter_runs(python):
            lines.append(f"  SKIPPED  Python {python}: not found. Enable: {_enable_python(python)}")
    listed = os.environ.get(DATABASES, "").split()
    configured = {url.partition(":")[0].partition("+")[0] for url in listed}
    lines.append("  ran      SQLite (always)")
    for backend in _SERVER_LEGS:
        state = "ran     " if backend in configured else "SKIPPED "
        lines.append(
            f"  {state} {backend}" + ("" if backend in configured else f": not in {DATABASES}")
        )
    if not set(_SERVER_LEGS) <= configured:
        urls = " ".join(_SERVER_LEGS.values())
        lines.append(f'  Enable the server legs (servers running): export {DATABASES}="{urls}"')
    print("\n".join(lines), file=sys.stderr)


DATABASES = "ALCHEMY_SCOPE_TEST_DATABASES"
atexit.register(_tests_summary)


@nox.session(python=PYTHONS)
@nox.parametrize("package", list(PACKAGES))
def tests(session: nox.Session, package: str) -> None:
    """The test suite of one package on one Python, on every database leg.

    On the oldest and the newest Python (where the code's version-dependent branches part)
    it runs under coverage.py, writing the branch coverage of core/ and adapters/ to a data
    file of its own; `nox -s coverage` combines them. The Pythons between run without it:
    coverage.py's tracer costs about half again the CPU time (CI's budget).
    """
    _TESTS_RAN.append((str(session.python), package))
    measure = session.python in (OLDEST_PYTHON, PYTHONS[-1])
    _install(session, package, extra=(COVERAGE,) if measure else ())
    _pytest(session, package, measure=measure)


@nox.session(python="3.13", default=False)
def coverage(session: nox.Session) -> None:
    """Combine the branch coverage `nox -s tests` measured; fail under [tool.coverage.report].

    Run it after `nox -s tests` (.ci/run does): it reads the sessions' data files, prints
    every file's missing lines and branches, and fails below `fail_under`.
    """
    session.install(COVERAGE)
    if not any(ROOT.glob(f"{COVERAGE_DATA.name}.*")):
        session.error("No coverage data to combine: run `nox -s tests` first.")
    env = {"COVERAGE_FILE": str(COVERAGE_DATA)}
    session.run("coverage", "combine", env=env)
    session.run("coverage", "report", env=env)


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
    """Mypy --strict over every distribution, the tests and the examples, in one environment.

    Every framework is installed, so the tests of each adapter are checked against it. Each
    example runs from its own directory (its tests import its ``app`` module).
    """
    directories = ["core", *(f"adapters/{name}" for name in ADAPTERS)]
    session.install(
        *(arg for d in directories for arg in ("-e", d)),
        *nox.project.dependency_groups(PYPROJECT, "typecheck"),
    )
    cache = ["--cache-dir", str(ROOT / ".mypy_cache")]
    session.run("mypy", *cache, *(f"{d}/src" for d in directories), "tests")
    config = ["--config-file", str(ROOT / "pyproject.toml")]
    for example in sorted(ROOT.glob("examples/*/app.py")):
        with session.chdir(example.parent):
            session.run("mypy", *cache, *config, ".")


# What `nox -s docs` installs besides the workspace: the site's tools, and what the code blocks
# of its pages import (the recipes and the libraries the migration pages start from).
DOCS_TOOLS = [
    "mkdocs>=1.6.1",
    "mkdocs-material>=9.8",
    "mkdocstrings>=1.0.8",
    "mkdocstrings-python>=2.0.11",
    "ruff>=0.8",  # mkdocstrings formats signatures with it
]
DOCS_BLOCKS = [
    "sqlmodel>=0.0.22",
    "alembic>=1.14",
    "fastapi-async-sqlalchemy>=0.7",
    "flask-sqlalchemy>=3.1",
]


@nox.session(python="3.13")
def docs(session: nox.Session) -> None:
    """Build the documentation site with warnings as errors, then run every code block on it.

    The site goes to .nox/docs/tmp/site (`-- --serve` serves it on http://127.0.0.1:8000
    instead). tests/test_docs.py runs the pages' code with every framework installed.
    """
    directories = ["core", *(f"adapters/{name}" for name in ADAPTERS)]
    session.install(
        *(arg for directory in directories for arg in ("-e", directory)),
        *DOCS_TOOLS,
        *DOCS_BLOCKS,
        *TEST_DEPENDENCIES,
    )
    quiet = {"NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's banner about its successor
    if "--serve" in session.posargs:
        session.run("mkdocs", "serve", "--strict", "--dev-addr", "127.0.0.1:8000", env=quiet)
        return
    site = Path(session.create_tmp()) / "site"
    session.run("mkdocs", "build", "--strict", "--clean", "--site-dir", str(site), env=quiet)
    external = re.compile(
        r'<(?:script|img)[^>]+src="https?://|<link[^>]+stylesheet[^>]+href="https?://'
    )
    fetched = [
        str(p.relative_to(site)) for p in site.rglob("*.html") if external.search(p.read_text())
    ]
    if fetched:
        session.error(f"pages that load assets from elsewhere (no CDN, no web fonts): {fetched}")
    env = {"ALCHEMY_SCOPE_DOCS": "1"}  # every block must run: a missing module fails
    session.run("pytest", "tests/test_docs.py", *session.posargs, env=env)


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


# --- nox -s release: the distributions as a newcomer gets them ------------------------------
DIST = ROOT / "dist"
RELEASE_TOOLS = ["build>=1.2", "twine>=6.1"]
_CURL = re.compile(r"^curl .*$|`(curl [^`]*localhost:8000[^`]*)`", flags=re.M)
_SERVE = re.compile(r"`(uvicorn|hypercorn) (\w+):app`")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _check_metadata(session: nox.Session, directories: list[str]) -> None:
    """Each wheel's metadata and each sdist's files, as an index shows and a user unpacks them."""
    for directory in directories:
        project = nox.project.load_toml(f"{directory}/pyproject.toml")["project"]
        dist_name = project["name"].replace("-", "_")
        init = next((ROOT / directory / "src").glob("*/__init__.py")).read_text()
        version = re.search(r'^__version__ = "([^"]+)"', init, flags=re.M)
        if version is None:
            session.error(f"{directory}: no __version__")
        wheel = DIST / f"{dist_name}-{version.group(1)}-py3-none-any.whl"
        sdist = DIST / f"{dist_name}-{version.group(1)}.tar.gz"
        with zipfile.ZipFile(wheel) as archive:
            metadata = archive.read(f"{dist_name}-{version.group(1)}.dist-info/METADATA").decode()
        with tarfile.open(sdist) as archive:
            names = archive.getnames()
        problems = [
            f"no Project-URL {label}"
            for label in ("Documentation", "Source", "Issues", "Changelog")
            if f"Project-URL: {label}, https://" not in metadata
        ]
        problems += [
            f"no classifier for Python {python}"
            for python in PYTHONS
            if f"Classifier: Programming Language :: Python :: {python}" not in metadata
        ]
        problems += [f"relative link {link}" for link in re.findall(r"\]\((\.[^)]*)\)", metadata)]
        if f"{dist_name}-{version.group(1)}/LICENSE" not in names:
            problems.append("no LICENSE in the sdist")
        for requirement in re.findall(r"^Requires-Dist: (alchemy-scope\S*) (.*)$", metadata, re.M):
            if requirement[1] != "<0.2,>=0.1":
                problems.append(f"{requirement[0]} {requirement[1]}: not the 0.1 series")
        if problems:
            session.error(f"{wheel.name}: {'; '.join(problems)}")
        session.log(f"{wheel.name}, {sdist.name}: metadata, links, LICENSE and pins checked")


def _fresh_venv(session: nox.Session, where: Path, wheels: list[str], *install: str) -> Path:
    """A new virtual environment holding ``wheels`` from dist/ alone, then ``install``."""
    base = str(Path(session.bin) / "python")  # the session's Python
    session.run("uv", "venv", "-q", "--python", base, str(where), external=True)
    python = str(where / "bin" / "python")
    env = {"VIRTUAL_ENV": str(where)}
    pip = ["uv", "pip", "install", "-q", "--python", python]
    # Our distributions from the built wheels only; their third-party dependencies from the
    # registry in the second step, which keeps what is installed.
    session.run(
        *pip,
        "--no-index",
        "--no-deps",
        "--no-build",
        "--no-cache",  # else uv may reuse a wheel of the same name built by an earlier run
        "--find-links",
        str(DIST),
        *wheels,
        env=env,
        external=True,
    )
    session.run(*pip, "--find-links", str(DIST), *install, env=env, external=True)
    return where / "bin"


def _curls(text: str) -> list[str]:
    """The curl commands a README shows: console lines and inline code."""
    return [match.group(1) or match.group(0) for match in _CURL.finditer(text)]


def _serve_and_call(
    session: nox.Session, bin_dir: Path, cwd: Path, app: tuple[str, str], curls: list[str]
) -> None:
    """Start ``app`` (server, module) as the README says, run its curl commands, stop it."""
    server, module = app
    port = _free_port()
    if server == "hypercorn":
        command = [str(bin_dir / "hypercorn"), f"{module}:app", "--bind", f"127.0.0.1:{port}"]
    else:
        command = [str(bin_dir / "uvicorn"), f"{module}:app", "--port", str(port)]
    log = cwd / "server.log"
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=cwd, stdout=output, stderr=subprocess.STDOUT)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                if process.poll() is not None:
                    session.error(f"{' '.join(command)} exited:\n{log.read_text()}")
                time.sleep(0.05)
        for curl in curls:
            args = shlex.split(curl.replace("localhost:8000", f"127.0.0.1:{port}"))
            run = subprocess.run(
                [
                    args[0],
                    "-sS",
                    "--fail-with-body",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    *args[1:],
                ],
                capture_output=True,
                text=True,
                check=False,
                timeout=30,
            )
            if run.returncode != 0:
                session.error(f"{curl}: {run.stdout} {run.stderr}\n{log.read_text()}")
            session.log(f"{curl} -> {run.stdout}")
    finally:
        process.terminate()
        process.wait(timeout=30)


def _core_wheels(framework: str) -> list[str]:
    """The names of our distributions an adapter needs, itself included."""
    return ["alchemy-scope", *(f"alchemy-scope-{d.split('/')[1]}" for d in ADAPTERS[framework])]


def _adapter_from_wheels(session: nox.Session, framework: str, work: Path) -> None:
    """Install the adapter as its README says, from the wheels, and serve its README's app."""
    readme = (ROOT / "adapters" / framework / "README.md").read_text()
    install = next(
        line.split("#")[0].split()[2:]
        for line in readme.splitlines()
        if line.startswith("pip install ") and " -e " not in line
    )
    bin_dir = _fresh_venv(session, work / "venv", _core_wheels(framework), *install)
    versions = "import importlib.metadata as m, {0}; assert {0}.__version__ == m.version({1!r})"
    for name in _core_wheels(framework):
        module = name.replace("-", "_")
        session.run(str(bin_dir / "python"), "-c", versions.format(module, name), external=True)
    app_dir = work / "app"
    app_dir.mkdir()
    serve = _SERVE.search(readme)
    if serve is None:
        session.error(f"adapters/{framework}/README.md: no `uvicorn|hypercorn module:app` line")
    server, module = serve.groups()
    code = re.search(r"```python\n(.*?)```", readme, flags=re.S)
    assert code is not None
    (app_dir / f"{module}.py").write_text(code.group(1))
    curls = _curls(readme.split("```python", 2)[1].split("\n## ", 1)[0]) or ["curl localhost:8000/"]
    _serve_and_call(session, bin_dir, app_dir, (server, module), curls)


def _example_copied_out(session: nox.Session, framework: str, work: Path) -> None:
    """Copy the example out of the checkout; install, test and serve it as its README says."""
    copy = work / "example"
    shutil.copytree(
        ROOT / "examples" / framework,
        copy,
        ignore=shutil.ignore_patterns("__pycache__", "*.db", ".pytest_cache"),
    )
    readme = (copy / "README.md").read_text()
    test_it = readme.split("## Test it", 1)[1]
    install = next(
        shlex.split(line.split("  #")[0])[2:]
        for line in test_it.splitlines()
        if line.startswith("pip install ")
    )
    with session.chdir(copy):  # -r requirements.txt: the copy's own
        bin_dir = _fresh_venv(session, work / "example-venv", _core_wheels(framework), *install)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALCHEMY_SCOPE", "DATABASE"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env.pop("PYTHONPATH", None)
    tests = subprocess.run(
        [str(bin_dir / "pytest"), "-q", "-p", "no:cacheprovider"],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    summary = tests.stdout.strip().splitlines()[-1:] or ["(no output)"]
    if tests.returncode != 0:
        session.error(
            f"examples/{framework} copied out: pytest failed\n{tests.stdout}{tests.stderr}"
        )
    session.log(f"examples/{framework} copied out: {summary[0]}")
    serve = re.search(r"^(uvicorn|hypercorn) (\w+):app$", readme, flags=re.M)
    assert serve is not None
    try_it = readme.split("## Try it", 1)[1].split("\n## ", 1)[0]
    _serve_and_call(session, bin_dir, copy, (serve.group(1), serve.group(2)), _curls(try_it))


@nox.session(python="3.13")
def release(session: nox.Session) -> None:
    """Build every sdist and wheel and use them as a newcomer would, outside the checkout.

    Into dist/: `python -m build` of core and each adapter, `twine check --strict`, then the
    metadata (Project-URLs, classifiers, absolute links, LICENSE, pins). For each framework,
    in a temporary directory: a fresh virtual environment with the adapter from the wheels
    alone (plus the registry for third-party packages) as its README installs it, serving the
    README's app and running its curl commands; then the example copied out, installed and
    tested exactly as its README says (the wheels as --find-links), served, and its "Try it"
    curl commands run against it.
    """
    session.install(*RELEASE_TOOLS)
    shutil.rmtree(DIST, ignore_errors=True)
    directories = ["core", *(f"adapters/{name}" for name in ADAPTERS)]
    for directory in directories:
        session.run("python", "-m", "build", "-q", "--installer", "uv", "-o", str(DIST), directory)
    session.run("twine", "check", "--strict", *sorted(str(p) for p in DIST.iterdir()))
    _check_metadata(session, directories)
    frameworks = session.posargs or list(ADAPTERS)
    with tempfile.TemporaryDirectory(prefix="alchemy-scope-release-") as temporary:
        for framework in frameworks:
            work = Path(temporary) / framework
            work.mkdir()
            _adapter_from_wheels(session, framework, work)
            _example_copied_out(session, framework, work)


@nox.session(python="3.13")
def bench(session: nox.Session) -> None:
    """Benchmarks (not in `tests`, not in CI): both policies against the framework and the seed.

    Writes benchmarks/results/ and takes about 1.5 hours on a quiet machine;
    `nox -s bench -- --standard` measures only the cells of issue 13's goal (every framework
    and variant, in-process and behind the server; 15 rounds of short samples) in about 17
    minutes and writes benchmarks/results/standard/; `-- --quick` is a smoke run of a minute
    or two that writes benchmarks/results/quick/; `--rounds N --scale F` make a trial of a
    profile (benchmarks/results/trial/). PostgreSQL from ALCHEMY_SCOPE_BENCH_POSTGRES (default
    postgresql+asyncpg://postgres@127.0.0.1:5432/test).
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
def browser(session: nox.Session) -> None:
    """Headless Chromium reads the Server-Timing entries of a page an example serves.

    Under a minute. Needs Debian's chromium and chromium-driver (.ci/run installs them; no
    browser is downloaded); writes the screenshot docs/img/server-timing.png.
    """
    _install(session, "fastapi", extra=("selenium>=4.20",))
    session.run(
        "pytest", "tests/test_browser.py", *session.posargs, env={"ALCHEMY_SCOPE_BROWSER": "1"}
    )


@nox.session(python="3.13")
def reliability(session: nox.Session) -> None:
    """Every example through a real server against a private PostgreSQL: load, faults, leaks.

    About 5 minutes; `nox -s reliability -- --quick` is a smoke run and `-- starlette` picks
    examples. Needs PostgreSQL's initdb and pg_ctl: it starts (and restarts, and removes) its
    own instance on a free port, never the shared one. Writes reliability/results.md. Its
    multi-worker run (FastAPI under `uvicorn --workers 4`, through PgBouncer, with a streaming
    standby; `-- --check workers` runs it alone) needs Debian's pgbouncer: installed here with
    apt-get when missing and root, as for `nox -s pgbouncer`.
    """
    directories = ["core", *(f"adapters/{name}" for name in ADAPTERS)]
    examples = sorted(ROOT.glob("examples/*/requirements.txt"))
    session.install(
        *(arg for directory in directories for arg in ("-e", directory)),
        *(arg for path in examples for arg in ("-r", str(path.relative_to(ROOT)))),
        "-r",
        "reliability/requirements.txt",
    )
    if pgbouncer_binary() is None and os.geteuid() == 0:  # the multi-worker run needs it
        _pgbouncer_binary(session)
    session.run("python", "-m", "reliability", *session.posargs)


# --- nox -s pgbouncer: the PostgreSQL leg through a real PgBouncer in transaction mode ------
PGBOUNCER_TESTS = [
    "tests/core/test_pgbouncer.py",
    "tests/core/test_pytest_plugin.py",
    "tests/adapters",
    "tests/examples",
]
PGBOUNCER_PAGE = ROOT / "docs" / "pgbouncer.md"  # its pgbouncer.ini is the one the leg runs


def _pgbouncer_binary(session: nox.Session) -> str:
    """Debian's pgbouncer: installed with apt-get when missing and root; on CI, required."""
    found = pgbouncer_binary()
    if found is None and hasattr(os, "geteuid") and os.geteuid() == 0:
        install = ["apt-get", "install", "-y", "-q", "pgbouncer"]
        session.run(*install, external=True, success_codes=[0, 100])
        found = pgbouncer_binary()
        if found is None:  # package lists missing or stale: update them, then again
            session.run("apt-get", "update", "-q", external=True)
            session.run(*install, external=True)
            found = pgbouncer_binary()
    if found is not None:
        return found
    message = "pgbouncer is not installed: apt-get install -y pgbouncer (Debian's package)"
    if os.environ.get("CI"):
        session.error(message)
    session.skip(message)
    raise AssertionError("unreachable: session.skip() raises")


@nox.session(python="3.13")
def pgbouncer(session: nox.Session) -> None:
    """The PostgreSQL leg through a real PgBouncer in transaction mode (the fourth leg).

    Starts Debian's pgbouncer (1.18: no prepared statements in transaction mode; installed
    with apt-get when missing and root, required on CI) on a free loopback port, with the
    settings docs/pgbouncer.md shows (transaction pooling) and trust, in front of the server of
    ALCHEMY_SCOPE_TEST_DATABASES (default 127.0.0.1:5432). With core and every adapter
    installed together on Python 3.13, it runs on that leg alone (-k pgbouncer): the
    PgBouncer tests, the pytest plugin's tests, every adapter's scenarios and fault matrix,
    and every example's contract, each Database made with pgbouncer=True (the examples with
    DATABASE_PGBOUNCER=1); the slowest tests run their sample (as off the newest Python in
    `nox -s tests`). The run's database is created and dropped on PostgreSQL itself. About 3
    minutes on two busy cores; `nox -s pgbouncer -- tests/adapters/test_starlette.py` runs
    less.
    """
    binary = _pgbouncer_binary(session)
    directories = ["core", *(f"adapters/{name}" for name in ADAPTERS)]
    session.install(
        *(arg for directory in directories for arg in ("-e", directory)), *TEST_DEPENDENCIES
    )
    listed = os.environ.get(DATABASES, "").split()
    server = next(
        (url for url in listed if url.startswith("postgresql")), _SERVER_LEGS["postgresql"]
    )
    bouncer = PrivatePgBouncer(binary, server)  # docs/pgbouncer.md's settings, trust
    try:
        port = bouncer.start()
    except RuntimeError as error:
        session.error(str(error))
    session.log(f"PgBouncer ({binary}, {PGBOUNCER_PAGE.name}'s settings) on 127.0.0.1:{port}")
    try:
        env = {
            DATABASES: server,
            "ALCHEMY_SCOPE_TEST_PGBOUNCER": f"127.0.0.1:{port}",
        }
        paths = [arg for arg in session.posargs if not arg.startswith("-")] or PGBOUNCER_TESTS
        options = [arg for arg in session.posargs if arg.startswith("-")]
        session.run("pytest", *paths, "-k", "pgbouncer", *options, env=env)
    finally:
        bouncer.remove()


MUTMUT = "mutmut==3.8.1"  # pinned: the session reads its stats file and its mutated modules
MUTANTS = ROOT / ".mutmut"  # mutmut's directory (gitignored): sources, tests, mutants/, report
# The functions that importing alchemy_scope calls (a mutant there takes effect only in a
# process that imports it with the mutant active), printed as JSON by mutmut's trampolines.
_IMPORT_TIME_FUNCTIONS = (
    "import json, os, sys; os.environ['MUTANT_UNDER_TEST'] = 'stats'; "
    "sys.path.insert(0, os.path.abspath('mutants/src')); import alchemy_scope.pytest_plugin; "
    "assert alchemy_scope.__file__.startswith(sys.path[0]), alchemy_scope.__file__; "
    "from mutmut.state import state; print(json.dumps(sorted(state()._stats)))"
)
# The diffs of the mutants named as arguments, as one JSON object on one line.
_MUTANT_DIFFS = (
    "import json, sys; from mutmut.mutation.diff_apply import get_diff_for_mutant; "
    "print(json.dumps({name: get_diff_for_mutant(name) for name in sys.argv[1:]}))"
)


def _toml_table(name: str, table: dict[str, object]) -> list[str]:
    """A TOML table of strings, numbers, booleans and lists of them (JSON spells them alike)."""
    return [f"[{name}]", *(f"{key} = {json.dumps(value)}" for key, value in table.items()), ""]


def _write_mutmut_config(config: dict[str, object], *, forkserver: bool) -> None:
    """Write .mutmut/pyproject.toml: the root's pytest options and mutants.toml's mutmut table."""
    mutmut: dict[str, object] = dict(config["tool"]["mutmut"])  # type: ignore[index]
    if forkserver:
        mutmut.update(
            process_isolation="forkserver",
            forkserver_warmup="import",
            preload_modules_file="preload.txt",
        )
    lines = [
        "# Written by `nox -s mutants` from pyproject.toml and mutants.toml: edit those.",
        *_toml_table("tool.pytest.ini_options", PYPROJECT["tool"]["pytest"]["ini_options"]),
        *_toml_table("tool.mutmut", mutmut),
    ]
    (MUTANTS / "pyproject.toml").write_text("\n".join(lines))


def _stage_mutants(config: dict[str, object]) -> None:
    """Lay out .mutmut/ as mutmut 3 wants it: src/alchemy_scope, tests/ and the config."""
    ignore = shutil.ignore_patterns("__pycache__", "*.py[cod]", "*.db")
    core = ROOT / "core" / "src" / "alchemy_scope"
    shutil.copytree(core, MUTANTS / "src" / "alchemy_scope", ignore=ignore, dirs_exist_ok=True)
    shutil.copytree(ROOT / "tests", MUTANTS / "tests", ignore=ignore, dirs_exist_ok=True)
    preload = config["import-time"]["preload_modules"]  # type: ignore[index]
    (MUTANTS / "preload.txt").write_text("".join(f"{module}\n" for module in preload))
    _write_mutmut_config(config, forkserver=False)


def _select_for_import_time(session: nox.Session, tests_of: str | None) -> list[str]:
    """Tie the functions that importing alchemy_scope calls to the tests of ``tests_of``.

    mutmut ties such a function to whichever test ran first, and in a worker forked from a
    process that has imported alchemy_scope, its mutants never take effect: the second pass
    tests them. ``None`` ties them to no test, so that the first pass skips them ("no
    tests") when mutmut's stats exist already. Returns the functions.
    """
    output = session.run("python", "-c", _IMPORT_TIME_FUNCTIONS, silent=True)
    functions: list[str] = json.loads(str(output).strip().splitlines()[-1])
    stats_path = MUTANTS / "mutants" / "mutmut-stats.json"
    stats = json.loads(stats_path.read_text())
    tests = stats["tests_by_mangled_function_name"]
    if tests_of is not None and tests_of not in tests:
        session.error(f"mutants.toml: [import-time] tests_of {tests_of!r} has no tests")
    for function in functions:
        tests[function] = [] if tests_of is None else sorted(tests[tests_of])
    stats_path.write_text(json.dumps(stats, indent=4))
    return functions


def _function_of(mutant: str) -> str:
    """``alchemy_scope._guard.xǁSessionGuardǁrun__mutmut_3`` -> ``…_guard.SessionGuard.run``."""
    module, _, mangled = mutant.partition("__mutmut_")[0].rpartition(".")
    if mangled.startswith("xǁ"):
        return f"{module}.{'.'.join(mangled[2:].split('ǁ'))}"
    return f"{module}.{mangled.removeprefix('x_')}"


def _mutant_number(mutant: str) -> int:
    return int(mutant.rpartition("__mutmut_")[2])


def _source_state() -> str:
    """The commit the run tested, and whether core/src or tests had uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "core/src", "tests"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    return f"{head} + uncommitted changes in core/src or tests" if changed else head


def _report_mutants(session: nox.Session, started: float) -> None:
    """Print the figures; write the surviving mutants and their diffs to .mutmut/survivors.md."""
    output = str(session.run("mutmut", "results", "--all", "true", silent=True))
    status_of = {}
    for line in output.splitlines():
        name, separator, status = line.strip().rpartition(": ")
        if separator and "__mutmut_" in name:
            status_of[name] = status
    counts: dict[str, int] = {}
    for status in status_of.values():
        counts[status] = counts.get(status, 0) + 1
    total = len(status_of)
    killed, survived, timeout = (counts.get(s, 0) for s in ("killed", "survived", "timeout"))
    checked = total - counts.get("not checked", 0) - counts.get("skipped", 0)
    rate = 100 * (killed + timeout) / checked if checked else 0.0
    others = ", ".join(
        f"{n} {s}" for s, n in sorted(counts.items()) if s not in ("killed", "survived", "timeout")
    )
    minutes = (time.monotonic() - started) / 60
    figures = [
        f"mutants: {total} total, {killed} killed, {survived} survived, {timeout} timeout"
        + (f", {others}" if others else ""),
        f"kill rate: {rate:.1f}% ((killed + timeout) / checked)"
        + (f"; killed alone {100 * killed / checked:.1f}%" if checked else ""),
        f"source: {_source_state()}; this session: {minutes:.0f} min, {MUTMUT}",
    ]
    survivors = sorted(
        (name for name, status in status_of.items() if status == "survived"),
        key=lambda name: (_function_of(name), _mutant_number(name)),
    )
    diffs: dict[str, str] = {}
    if survivors:
        diffs_output = session.run("python", "-c", _MUTANT_DIFFS, *survivors, silent=True)
        diffs = json.loads(str(diffs_output).strip().splitlines()[-1])
    by_function: dict[str, list[str]] = {}
    for name in survivors:
        by_function.setdefault(_function_of(name), []).append(name)
    lines = [
        "# Surviving mutants",
        "",
        f"Written by `nox -s mutants` on {datetime.date.today()}.",
        "",
        *(f"- {line}" for line in figures),
        "",
    ]
    for function, names in by_function.items():
        lines += [f"## {function} ({len(names)})", ""]
        for name in names:
            lines += [f"### {name}", "", "```diff", diffs.get(name, "?"), "```", ""]
    unusual = sorted(n for n, s in status_of.items() if s not in ("killed", "survived"))
    if unusual:
        lines += ["## Neither killed nor survived", ""]
        lines += [f"- {name}: {status_of[name]}" for name in unusual] + [""]
    report = MUTANTS / "survivors.md"
    report.write_text("\n".join(lines))
    for line in figures:
        session.log(line)
    for function, names in by_function.items():
        session.log(f"  {len(names):3} survived in {function}")
    session.log(f"surviving mutants and their diffs: {report.relative_to(ROOT)}")


def _mutants_jobs(databases: str) -> int:
    """Parallel mutants: ALCHEMY_SCOPE_MUTANTS_JOBS, else 2 on an idle machine, else 1."""
    if databases:  # forked workers share one run database per server: one at a time
        return 1
    if os.environ.get("ALCHEMY_SCOPE_MUTANTS_JOBS"):
        return int(os.environ["ALCHEMY_SCOPE_MUTANTS_JOBS"])
    idle_cores = (os.cpu_count() or 1) - os.getloadavg()[0]
    return min(2, max(1, int(idle_cores)))


@nox.session(python="3.11", default=False)
def mutants(session: nox.Session) -> None:
    """Mutation testing of the core's lifecycle (_scope, _guard, _lifecycle, ...) with mutmut.

    Not in `tests`, not in CI. Runs tests/core on SQLite against each mutant, then prints
    the figures and writes the surviving mutants with their diffs to .mutmut/survivors.md
    (tests/MUTANTS.md: how to read them, the last figures). A full run starts afresh;
    `nox -s mutants -- --keep` resumes an interrupted one, and `-- 'alchemy_scope._lifecycle*'`
    retests mutants by name (mutmut's globs) with the current tests. Parallel mutants:
    ALCHEMY_SCOPE_MUTANTS_JOBS (default: 2 on an idle machine, else 1). Server legs, slow
    and one mutant at a time: ALCHEMY_SCOPE_MUTANTS_DATABASES, spelt like
    ALCHEMY_SCOPE_TEST_DATABASES.
    """
    session.install("-e", "core", *TEST_DEPENDENCIES, MUTMUT)
    started = time.monotonic()
    names = [arg for arg in session.posargs if arg != "--keep"]
    if not names and "--keep" not in session.posargs:
        shutil.rmtree(MUTANTS, ignore_errors=True)
    config = nox.project.load_toml("mutants.toml")
    _stage_mutants(config)
    databases = os.environ.get("ALCHEMY_SCOPE_MUTANTS_DATABASES", "")
    env = {"ALCHEMY_SCOPE_TEST_DATABASES": databases}
    nice = ["nice", "-n", "10"] if shutil.which("nice") else []
    run = [*nice, "mutmut", "run", "--max-children", str(_mutants_jobs(databases))]
    with session.chdir(MUTANTS):
        if (MUTANTS / "mutants" / "mutmut-stats.json").exists():  # --keep, or names
            _select_for_import_time(session, None)
        session.run(*run, *names, env=env, external=True)
        # Second pass: the functions importing alchemy_scope calls, in workers that import it
        # with their mutant active.
        import_time = _select_for_import_time(session, config["import-time"]["tests_of"])
        patterns = [
            f"{function}__mutmut_*"
            for function in import_time
            if not names or any(fnmatch.fnmatch(f"{function}__mutmut_1", name) for name in names)
        ]
        if patterns:
            _write_mutmut_config(config, forkserver=True)
            session.run(*run, *patterns, env=env, external=True)
            _write_mutmut_config(config, forkserver=False)
        _report_mutants(session, started)
