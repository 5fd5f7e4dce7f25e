"""Who holds a test database: the run's identity, whether a run is alive, and locks.

Every database the plugin creates, adopts or reuses carries marker rows naming the run that
holds it (see :mod:`pytest_alchemy.databases`). A run is identified by its id, shared by an
xdist controller with its workers, and by the process that started it (pid and start time, so
a reused pid is not mistaken for the run). Whether that run is still alive decides everything
another run may do to the database:

- on the same host (same hostname and pid namespace), the run is alive while its process is;
- from another host, while its heartbeat is recent: each process of a live run touches the
  marker of the databases it holds every :data:`HEARTBEAT_EVERY` seconds.

A database whose holder is alive is never dropped, replaced or used by another run.
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import hashlib
import os
import queue
import socket
import stat
import tempfile
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_alchemy.errors import ProvisioningError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from sqlalchemy.engine import URL, Connection

#: Seconds between two heartbeats of a live run on the databases it holds.
HEARTBEAT_EVERY = 60.0
#: A run on another host whose last heartbeat is older than this is taken as gone.
HEARTBEAT_STALE = timedelta(minutes=10)
#: A marker without a heartbeat (older releases) from another host counts as gone after this.
STALE_AFTER = timedelta(days=2)


def now() -> datetime:
    """UTC, naive: how markers store times on every backend."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


@functools.lru_cache(maxsize=1)
def host_id() -> str:
    """This host as markers record it: the hostname and, on Linux, the pid namespace.

    Two containers may share a hostname; their process ids mean nothing to each other.
    """
    host = socket.gethostname()
    with contextlib.suppress(OSError):
        host += "/" + os.readlink("/proc/self/ns/pid")
    return host[:255]


@functools.lru_cache(maxsize=64)
def started(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), if it can be told."""
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, OSError):
        return None


def process_alive(pid: int, start: float | None) -> bool:
    """Whether process ``pid`` runs, and is the one that started at ``start`` (if given)."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False  # killed, not yet reaped by its parent
        created = process.create_time()
    except psutil.NoSuchProcess:
        return False
    except (psutil.AccessDenied, OSError):
        return True  # it exists, under another user
    return start is None or abs(created - start) < 1.0


@dataclass(frozen=True)
class Owner:
    """The run a process belongs to: its id, and the pid of the process that started it."""

    run_id: str
    pid: int

    @property
    def started(self) -> float | None:
        return started(self.pid)

    def marker_values(self) -> dict[str, Any]:
        """The columns of a marker row naming this run as the holder."""
        moment = now()
        return {
            "run_id": self.run_id,
            "created_at": moment,
            "heartbeat": moment,
            "host": host_id(),
            "pid": self.pid,
            "started": self.started,
        }


def holder_alive(row: dict[str, Any], run_id: str) -> bool:
    """Whether the run named by marker ``row`` is this one or still alive."""
    if row.get("run_id") == run_id:
        return True
    if row.get("released") is not None:  # its run ended and left it for the next one
        return False
    pid = row.get("pid")
    legacy_host = socket.gethostname()[:255]  # written by releases without the pid namespace
    if isinstance(pid, int) and row.get("host") in (host_id(), legacy_host):
        start = row.get("started")
        return process_alive(pid, float(start) if start is not None else None)
    beat = row.get("heartbeat")
    if isinstance(beat, datetime):
        return now() - beat < HEARTBEAT_STALE
    created = row.get("created_at")
    if isinstance(created, datetime):
        return now() - created < STALE_AFTER
    return True  # nothing tells: leave it alone


def describe_holder(row: dict[str, Any]) -> str:
    """The holder of a marker row, for a message: "run 1a2b3c4d (pid 123 on host)"."""
    host = str(row.get("host") or "?").split("/", 1)[0]
    return f"run {str(row.get('run_id'))[:8]} (pid {row.get('pid')} on {host})"


class Heartbeats:
    """Touches the markers of the databases this process holds, from a daemon thread."""

    def __init__(self, beat: Callable[[URL], None]) -> None:
        self._beat = beat
        self._urls: dict[str, URL] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def add(self, url: URL) -> None:
        with self._lock:
            self._urls[url.render_as_string(hide_password=False)] = url
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="pytest-alchemy-heartbeat", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_EVERY):
            with self._lock:
                urls = list(self._urls.values())
            for url in urls:
                with contextlib.suppress(Exception):  # a missed beat is not worth a failure
                    self._beat(url)

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=10)


# -- locks between the processes of this machine ---------------------------------------------


def lock_directory() -> Path:
    """This user's private folder for lock files (0700), created on first use.

    Per user: a lock file another account created could not be opened (and used to read as
    "cannot connect"). Private: nobody else can plant or hold our locks.
    """
    user = str(os.getuid()) if hasattr(os, "getuid") else getpass.getuser()
    folder = Path(tempfile.gettempdir()) / f"pytest-alchemy-{user}"
    folder.mkdir(mode=0o700, exist_ok=True)
    info = folder.lstat()
    foreign = hasattr(os, "getuid") and info.st_uid != os.getuid()
    if foreign or stat.S_ISLNK(info.st_mode) or info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ProvisioningError(
            f"The lock folder {folder} is not private to this user (owner uid {info.st_uid}, "
            f"mode {stat.filemode(info.st_mode)}). pytest-alchemy keeps its lock files there; "
            f"remove the folder, or point TMPDIR at a folder of your own."
        )
    return folder


class _Unlinked(Exception):
    """The lock file was removed by its previous holder before our lock took: retry."""


def _refuse_unlinked(fd: int) -> None:
    if os.fstat(fd).st_nlink == 0:
        raise _Unlinked


@contextlib.contextmanager
def file_lock(url: URL) -> Iterator[None]:
    """Serialize provisioning of one database between the processes of this machine.

    pytest-xdist workers, and concurrent runs, on one machine. The lock file is removed when
    the lock is released, by its holder: a process that was waiting on the removed file finds
    it unlinked once its lock takes, and takes the lock again on a new file.
    """
    from filelock import FileLock

    key = hashlib.sha256(url.render_as_string(hide_password=True).encode()).hexdigest()[:16]
    path = lock_directory() / f"{key}.lock"
    while True:
        lock = FileLock(path, mode=0o600, thread_local=False, on_acquired=_refuse_unlinked)
        try:
            lock.acquire()
        except _Unlinked:
            continue
        break
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        lock.release()


# -- locks between the runs on one server ----------------------------------------------------

#: Seconds of one wait for a MySQL named lock, repeated until it is granted.
_LOCK_WAIT = 5


def _lock_key(name: str) -> bytes:
    return hashlib.sha256(f"pytest-alchemy:{name}".encode()).digest()


def _take(conn: Connection, family: str, name: str, report: Callable[[str], None]) -> None:
    """Take the server's lock on ``name`` for ``conn``'s session, waiting as long as it takes;
    says once that it waits."""
    from sqlalchemy import text

    key = _lock_key(name)
    if family == "postgresql":
        number = {"key": int.from_bytes(key[:8], "big", signed=True)}
        if not conn.execute(text("SELECT pg_try_advisory_lock(:key)"), number).scalar():
            report(f"waiting for another run provisioning {name} on this server")
            conn.execute(text("SELECT pg_advisory_lock(:key)"), number)
        return
    named = {"key": f"pytest_alchemy_{key.hex()[:40]}", "wait": 0}  # 64 characters at most
    said = False
    while conn.execute(text("SELECT GET_LOCK(:key, :wait)"), named).scalar() != 1:
        if not said:
            report(f"waiting for another run provisioning {name} on this server")
            said = True
        named["wait"] = _LOCK_WAIT


@contextlib.contextmanager
def server_lock(
    name: str,
    family: str,
    run: Callable[[Callable[[Connection], None]], None] | None,
    report: Callable[[str], None] = lambda line: None,
) -> Iterator[Callable[[Callable[[Connection], Any]], Any] | None]:
    """Serialize provisioning of the database ``name`` between runs on one server.

    Runs reaching one server by different addresses (127.0.0.1 and localhost, two CI machines)
    share no lock file: between one run's CREATE DATABASE and its marker, another would find
    the new database empty and adopt it. The server's own lock (``pg_advisory_lock``,
    MySQL's ``GET_LOCK``), held by a session that ``run`` opens on an administrative
    database, closes that gap; the server releases it if the holder dies. ``run`` is None
    where there is no such database to hold the session on: only the file lock serializes.

    Yields a function that runs administrative work (``CREATE DATABASE``, ...) on the
    holding session meanwhile, so a turn opens one connection rather than one per statement
    (each costs a connect: about 8 ms on psycopg, 30 ms on PyMySQL, which builds a TLS context
    for every connection); None where no session holds the lock.
    """
    if run is None:
        yield None
        return
    taken = threading.Event()
    jobs: queue.SimpleQueue[tuple[Callable[[Connection], Any], queue.SimpleQueue[Any]] | None]
    jobs = queue.SimpleQueue()
    failed: list[BaseException] = []
    holding: list[bool] = []

    def hold(conn: Connection) -> None:
        _take(conn, family, name, report)
        holding.append(True)
        taken.set()
        # Until the turn ends (None): the server drops the lock with the session.
        while (job := jobs.get()) is not None:
            work, reply = job
            try:
                reply.put((True, work(conn)))
            except BaseException as exc:  # raised in the caller's thread
                if getattr(exc, "connection_invalidated", False):
                    reply.put(None)  # the session is gone, and its lock: the caller connects
                    return
                reply.put((False, exc))

    def holder() -> None:
        try:
            run(hold)
        except BaseException as exc:  # reported by the waiting thread
            failed.append(exc)
        finally:
            holding.clear()
            taken.set()
            while True:  # work that came as the session ended: done by the caller itself
                try:
                    job = jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job[1].put(None)

    def lend(work: Callable[[Connection], Any]) -> Any:
        reply: queue.SimpleQueue[Any] = queue.SimpleQueue()
        jobs.put((work, reply))
        while True:
            try:
                answer = reply.get(timeout=1)
                break
            except queue.Empty:
                if not thread.is_alive():
                    answer = reply.get_nowait() if not reply.empty() else None
                    break
        if answer is None:
            raise NotHeld
        ok, value = answer
        if not ok:
            raise value
        return value

    # A thread of its own: the session stays open across the caller's work, whatever its
    # driver (an async one runs on a private loop), and a daemon never delays the exit.
    thread = threading.Thread(target=holder, name="pytest-alchemy-lock", daemon=True)
    thread.start()
    try:
        taken.wait()
        if failed:
            raise failed[0]
        yield lend if holding else None
    finally:
        jobs.put(None)
        if not failed:
            thread.join(timeout=30)


class NotHeld(Exception):
    """The session holding the lock ended before it ran the work: run it elsewhere."""
