"""A throwaway PostgreSQL server for the run: ``--alchemy-url postgresql+ephemeral:///myapp``.

Started on first need from the PostgreSQL binaries on the machine (``initdb`` and ``pg_ctl`` on
PATH, in ``pg_config --bindir``, under ``/usr/lib/postgresql/*/bin``, or from the ``pgserver``
wheel), on a temporary data directory with durability off, on a free port of 127.0.0.1, and
stopped (its directory removed) when the run ends, also when it is interrupted or killed (a
watchdog process sees to that). It asks for a random password, and its files are private.
PostgreSQL refuses to run as root, so under root (CI containers) the server runs as
``nobody`` with nobody's group.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
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


_PREFIX = "pytest-alchemy-pg-"
_OWNER = "owner.json"


def _server_account() -> tuple[int | None, int | None]:
    """(uid, gid) the server runs as: ours, or under root an unprivileged account and group
    (PostgreSQL refuses to run as root; root's group would give it root's files)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None, None
    import pwd

    account = pwd.getpwnam(_UNPRIVILEGED)
    return account.pw_uid, account.pw_gid


def _run_as(
    uid: int | None, gid: int | None, command: list[str], timeout: float
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        user=uid,
        group=gid,
        extra_groups=[] if gid is not None else None,
    )


def clean_stale(report: Callable[[str], None] = lambda line: None) -> None:
    """Stop and remove the throwaway servers of this user's earlier runs that are gone.

    Their watchdog does it as soon as the run dies; this is for a watchdog that died too.
    """
    from pytest_alchemy import ownership

    for folder in Path(tempfile.gettempdir()).glob(f"{_PREFIX}*"):
        try:
            owner = json.loads((folder / _OWNER).read_text())
            if owner.get("user") != _user() or ownership.process_alive(
                int(owner["pid"]), owner.get("started")
            ):
                continue
            bindir = Path(owner["bindir"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        uid, gid = _server_account()
        with contextlib.suppress(Exception):
            _run_as(
                uid,
                gid,
                [
                    str(bindir / "pg_ctl"),
                    "-D",
                    str(folder / "data"),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                ],
                60,
            )
        shutil.rmtree(folder, ignore_errors=True)
        report(f"removed a throwaway PostgreSQL left by a run that is gone ({folder})")


def _user() -> int | str:
    return os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "")


class EphemeralPostgres:
    """One private PostgreSQL server, started by :meth:`start` and removed by :meth:`stop`.

    It listens on 127.0.0.1 only and asks for a password, a random one of this run's; its
    files are private (0700) to the account it runs as: ours, or under root an unprivileged
    account and group. A watchdog process stops it if the run dies without doing so.
    """

    def __init__(self, report: Callable[[str], None] = lambda line: None) -> None:
        self._report = report
        self._bindir: Path | None = None
        self._datadir: Path | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self.port: int | None = None

    def _run(self, *args: str, timeout: float = 120) -> None:
        assert self._bindir is not None
        uid, gid = _server_account()
        done = _run_as(uid, gid, [str(self._bindir / args[0]), *args[1:]], timeout)
        if done.returncode != 0:
            raise ProvisioningError(
                f"The throwaway PostgreSQL server did not start: `{' '.join(args[:2])} …` "
                f"exited with {done.returncode}: {(done.stderr or done.stdout).strip()[-800:]}"
            )

    def start(self, database: str | None) -> URL:
        """Start the server; returns the URL (psycopg) of ``database`` on it."""
        from pytest_alchemy import ownership

        started = time.perf_counter()
        self._bindir = find_bindir()
        clean_stale(self._report)
        self._datadir = folder = Path(tempfile.mkdtemp(prefix=_PREFIX))  # 0700
        atexit.register(self.stop)
        me = os.getpid()
        (folder / _OWNER).write_text(
            json.dumps(
                {
                    "pid": me,
                    "started": ownership.started(me),
                    "user": _user(),
                    "bindir": str(self._bindir),
                }
            )
        )
        password = secrets.token_urlsafe(24)
        secret = folder / "password"
        secret.write_text(password)
        secret.chmod(0o600)
        uid, gid = _server_account()
        if uid is not None:
            for path in (folder, secret):
                os.chown(path, uid, gid or -1)
        data = str(folder / "data")
        self._run(
            "initdb", "-D", data, "-U", "postgres", "-A", "scram-sha-256",
            f"--pwfile={secret}", "-E", "UTF8", "--no-sync",
        )  # fmt: skip
        secret.unlink()
        self.port = _free_port()
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        log = str(folder / "server.log")
        self._run("pg_ctl", "-D", data, "-l", log, "-o", options, "-w", "-t", "60", "start")
        self._watch(folder)
        self._report(
            f"started a throwaway PostgreSQL ({self._bindir}) on 127.0.0.1:{self.port} "
            f"in {time.perf_counter() - started:.2f}s"
        )
        return URL.create(
            "postgresql+psycopg",
            username="postgres",
            password=password,
            host="127.0.0.1",
            port=self.port,
            database=database or "postgres",
        )

    def _watch(self, folder: Path) -> None:
        """The watchdog: a process of its own that outlives a killed run, to stop the server."""
        from pytest_alchemy import ownership

        assert self._bindir is not None
        uid, gid = _server_account()
        me = os.getpid()
        self._watchdog = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).with_name("_watchdog.py")),
                str(me),
                repr(ownership.started(me) or 0.0),
                str(self._bindir / "pg_ctl"),
                str(folder),
                "" if uid is None else str(uid),
                "" if gid is None else str(gid),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in the terminal is for the run, not for it
        )

    def stop(self) -> None:
        """Stop the server and remove its files; idempotent."""
        datadir, self._datadir = self._datadir, None
        if datadir is None:
            return
        with contextlib.suppress(Exception):
            self._run("pg_ctl", "-D", str(datadir / "data"), "-m", "immediate", "-w", "stop")
        shutil.rmtree(datadir, ignore_errors=True)
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:  # it sees the folder gone, and ends
            try:
                watchdog.wait(timeout=5)
            except subprocess.TimeoutExpired:
                watchdog.kill()
                watchdog.wait()
