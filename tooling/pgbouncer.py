"""A private PgBouncer in transaction mode, on a free loopback port, in front of PostgreSQL.

Its settings are docs/pgbouncer.md's ``pgbouncer.ini`` (transaction pooling, pool sizes,
timeouts) as they are; then a ``*`` wildcard database on the given server, a free port, no
Unix socket, and the log and pid files in a directory of its own. PgBouncer refuses to run
as root: then it runs as the ``postgres`` OS user, which owns that directory.
``nox -s pgbouncer`` (the tests' PgBouncer leg) and the reliability suite's multi-worker run
both start it with :class:`PrivatePgBouncer`.
"""

from __future__ import annotations

import configparser
import io
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "pgbouncer.md"  # its pgbouncer.ini is the one we run


def pgbouncer_binary() -> str | None:
    """Debian's ``pgbouncer`` (on ``PATH`` or in ``/usr/sbin``), or ``None``."""
    return shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")


def pgbouncer_ini(server: str, listen: int, directory: Path, users: dict[str, str]) -> str:
    """docs/pgbouncer.md's ``pgbouncer.ini`` for a run in ``directory``, listening on ``listen``.

    ``server`` is a URL (its host and port are used); ``users`` maps each user to its
    password: all empty, clients are trusted (``auth_type = trust``); else they log in with
    scram-sha-256, and PgBouncer uses the same passwords towards PostgreSQL.
    """
    block = re.search(r"^```ini\n(.*?)^```$", PAGE.read_text(), flags=re.M | re.S)
    if block is None:
        raise ValueError(f"{PAGE.relative_to(ROOT)} shows no ```ini block")
    config = configparser.ConfigParser(interpolation=None, delimiters=("=",))
    config.optionxform = str  # type: ignore[assignment,method-assign]  # keep keys' case
    config.read_string(block.group(1))
    url = urlsplit(server)
    config["databases"] = {"*": f"host={url.hostname} port={url.port or 5432}"}
    userlist = "".join(f'"{user}" "{password}"\n' for user, password in users.items())
    (directory / "userlist.txt").write_text(userlist)
    config["pgbouncer"].update(
        listen_addr="127.0.0.1",
        listen_port=str(listen),
        unix_socket_dir="",
        auth_type="scram-sha-256" if any(users.values()) else "trust",
        auth_file=str(directory / "userlist.txt"),
        logfile=str(directory / "pgbouncer.log"),
        pidfile=str(directory / "pgbouncer.pid"),
    )
    if config["pgbouncer"].get("pool_mode") != "transaction":
        raise ValueError(f"{PAGE.relative_to(ROOT)}: pool_mode is not transaction")
    text = io.StringIO()
    config.write(text)
    return text.getvalue()


class PrivatePgBouncer:
    """PgBouncer (transaction pooling) on 127.0.0.1 and a free port, in a temporary directory.

    ``users`` as :func:`pgbouncer_ini` takes them (default: the server URL's user, trusted).
    :meth:`start` raises ``RuntimeError`` with PgBouncer's log if it does not listen.
    """

    def __init__(
        self,
        binary: str,
        server: str,
        users: dict[str, str] | None = None,
        directory: Path | None = None,
    ) -> None:
        self.binary, self.server = binary, server
        self.users = users if users is not None else {urlsplit(server).username or "postgres": ""}
        self.directory = directory or Path(tempfile.mkdtemp(prefix="alchemy-scope-pgbouncer-"))
        self.log = self.directory / "pgbouncer.log"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> int:
        """Start it and wait until it accepts connections; return its port."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        ini = self.directory / "pgbouncer.ini"
        ini.write_text(pgbouncer_ini(self.server, self.port, self.directory, self.users))
        root = os.geteuid() == 0
        if root:
            for path in [self.directory, *self.directory.iterdir()]:
                shutil.chown(path, "postgres", "postgres")
            (self.directory / "userlist.txt").chmod(0o600)
        self.process = subprocess.Popen(
            [self.binary, str(ini)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            user="postgres" if root else None,
            group="postgres" if root else None,
            extra_groups=[] if root else None,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.1).close()
                return self.port
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"pgbouncer exited:\n{self.read_log()}") from None
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"pgbouncer did not listen on 127.0.0.1:{self.port} in {timeout} s")

    def read_log(self) -> str:
        """PgBouncer's log so far."""
        return self.log.read_text() if self.log.exists() else ""

    def stop(self) -> None:
        """Stop it (SIGTERM, SIGKILL after 30 s)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def remove(self) -> None:
        """Stop it and delete its directory."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
