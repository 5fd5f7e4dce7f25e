"""A throwaway PostgreSQL server for the run: ``--alchemy-url postgresql+ephemeral:///myapp``.

Started on first need from the PostgreSQL binaries on the machine (``initdb`` and ``pg_ctl`` on
PATH, in ``pg_config --bindir``, under ``/usr/lib/postgresql/*/bin``, or from the ``pgserver``
wheel), on a temporary data directory with durability off, on a free port of 127.0.0.1, and
stopped (its directory removed) when the run ends, also when it is interrupted. PostgreSQL
refuses to run as root, so under root (CI containers) the server runs as ``nobody``.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.engine import URL

from pytest_alchemy.errors import ProvisioningError

if TYPE_CHECKING:
    from collections.abc import Callable

#: The driver name that asks for a throwaway server.
DRIVERNAME = "postgresql+ephemeral"
_UNPRIVILEGED = "nobody"


def wanted(url: URL | None) -> bool:
    return url is not None and url.drivername == DRIVERNAME


def find_bindir() -> Path:
    """The folder holding initdb and pg_ctl, or a ProvisioningError saying what to install."""
    candidates: list[Path] = []
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            candidates.append(Path(out.stdout.strip()))
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    with contextlib.suppress(ImportError):
        import pgserver  # type: ignore[import-not-found]

        candidates += [Path(p).parent for p in Path(pgserver.__file__).parent.rglob("pg_ctl")]
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    raise ProvisioningError(
        "--alchemy-url postgresql+ephemeral:// needs the PostgreSQL server binaries (initdb, "
        "pg_ctl), and none were found on PATH, in `pg_config --bindir`, under "
        "/usr/lib/postgresql/*/bin or in the pgserver package. Install them "
        "(apt-get install postgresql, brew install postgresql) or pip install pgserver."
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EphemeralPostgres:
    """One private PostgreSQL server, started by :meth:`start` and removed by :meth:`stop`."""

    def __init__(self, report: Callable[[str], None] = lambda line: None) -> None:
        self._report = report
        self._bindir: Path | None = None
        self._datadir: Path | None = None
        self.port: int | None = None

    def _run(self, *args: str, timeout: float = 120) -> None:
        assert self._bindir is not None
        command = [str(self._bindir / args[0]), *args[1:]]
        user = _UNPRIVILEGED if os.geteuid() == 0 else None
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, user=user, check=False
        )
        if done.returncode != 0:
            raise ProvisioningError(
                f"The throwaway PostgreSQL server did not start: `{' '.join(args[:2])} …` "
                f"exited with {done.returncode}: {(done.stderr or done.stdout).strip()[-800:]}"
            )

    def start(self, database: str | None) -> URL:
        """Start the server; returns the URL (psycopg) of ``database`` on it."""
        started = time.perf_counter()
        self._bindir = find_bindir()
        self._datadir = Path(tempfile.mkdtemp(prefix="pytest-alchemy-pg-"))
        if os.geteuid() == 0:  # PostgreSQL refuses root; the folder must be the server user's
            shutil.chown(self._datadir, user=_UNPRIVILEGED)
        atexit.register(self.stop)
        data = str(self._datadir / "data")
        self._run("initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
        self.port = _free_port()
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        log = str(self._datadir / "server.log")
        self._run("pg_ctl", "-D", data, "-l", log, "-o", options, "-w", "-t", "60", "start")
        self._report(
            f"started a throwaway PostgreSQL ({self._bindir}) on 127.0.0.1:{self.port} "
            f"in {time.perf_counter() - started:.2f}s"
        )
        return URL.create(
            "postgresql+psycopg",
            username="postgres",
            host="127.0.0.1",
            port=self.port,
            database=database or "postgres",
        )

    def stop(self) -> None:
        """Stop the server and remove its files; idempotent."""
        datadir, self._datadir = self._datadir, None
        if datadir is None:
            return
        with contextlib.suppress(Exception):
            self._run("pg_ctl", "-D", str(datadir / "data"), "-m", "immediate", "-w", "stop")
        shutil.rmtree(datadir, ignore_errors=True)
