"""Test databases: derive their names, create them, mark them as ours, drop them.

``alchemy_url`` names a server and a base database (``.../myapp``); the tests run on a
database derived from it, ``test_myapp`` (``alchemy_test_database`` overrides the name),
with ``_<suffix>`` for ``alchemy_database_suffix`` and ``_<worker>`` under pytest-xdist
(``test_myapp_gw0``). A SQLite file ``app.db`` becomes ``test_app.db`` beside it. The base
database itself is never used, changed or dropped.

Every database the plugin creates gets a marker table naming the run that made it. The plugin
only ever drops a database that has its marker and the name it derived itself. It adopts an
existing database of that name only when it is empty; one that holds tables but no marker is
refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import (
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    inspect,
    select,
)
from sqlalchemy import text as sql
from sqlalchemy.pool import NullPool

from pytest_alchemy import dialects
from pytest_alchemy.config import mask
from pytest_alchemy.errors import ProvisioningError

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Iterator

    from sqlalchemy.engine import URL, Connection

T = TypeVar("T")

MARKER_TABLE = "pytest_alchemy_marker"
_marker = Table(
    MARKER_TABLE,
    MetaData(),
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(32), nullable=False),
    Column("fingerprint", String(64)),
    Column("created_at", DateTime),
    Column("host", String(255)),
    Column("pid", Integer),
)


@dataclass(frozen=True)
class Naming:
    """What the test database's name is made of, besides the base name."""

    name: str | None = None  # alchemy_test_database
    suffix: str | None = None  # alchemy_database_suffix
    worker: str | None = None  # pytest-xdist worker id (gw0, gw1, ...)
    template: bool = False  # the run's template, which the workers' databases are cloned from

    def derive(self, base: str) -> str:
        name = self.name or f"test_{base}"
        last = "template" if self.template else self.worker
        for part in (self.suffix, last):
            if part:
                name = f"{name}_{part}"
        return name


def derive_test_url(url: URL, naming: Naming) -> URL:
    """The URL of the test database derived from the configured one."""
    if dialects.is_memory(url):
        return url
    if url.get_backend_name() == "sqlite":
        path = Path(url.database or "")
        suffix = "".join(path.suffixes)
        stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
        return url.set(database=str(path.with_name(naming.derive(stem) + suffix)))
    if not url.database:
        raise ProvisioningError(
            f"alchemy_url {mask(url)} names no database. Name the base database, for example "
            f"'.../myapp'; the tests then run on 'test_myapp', which the plugin creates."
        )
    name = naming.derive(url.database)
    if name == url.database:
        raise ProvisioningError(
            f"alchemy_test_database = {name!r} is the database named in alchemy_url itself. "
            f"The plugin creates and drops its test database, so it must be another one: "
            f"choose a different alchemy_test_database."
        )
    return url.set(database=name)


def run_with_connection(url: URL, fn: Callable[[Connection], T], *, autocommit: bool) -> T:
    """Run ``fn`` on a short-lived connection to ``url``, through its own driver.

    An async URL runs on a private event loop in a thread, so this works from inside a running
    loop as well as at session end, and needs no sync driver.
    """
    url, options = dialects.engine_options(url)
    options["poolclass"] = NullPool
    if autocommit:
        options["isolation_level"] = "AUTOCOMMIT"
    if not dialects.is_async(url):
        engine = create_engine(url, **options)
        try:
            with engine.connect() as conn:
                result = fn(conn)
                if not autocommit:
                    conn.commit()
                return result
        finally:
            engine.dispose()

    async def main() -> T:
        from sqlalchemy.ext.asyncio import create_async_engine

        engine = create_async_engine(url, **options)
        try:
            async with engine.connect() as conn:
                result = await conn.run_sync(fn)
                if not autocommit:
                    await conn.commit()
                return result
        finally:
            await engine.dispose()

    return _in_thread(main)


def _in_thread(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    outcome: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            outcome.append((True, asyncio.run(main())))
        except BaseException as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=run, name="pytest-alchemy")
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


@dataclass
class ProvisionedDatabase:
    """A provisioned test database and what this run may do to it at the end."""

    url: URL
    created: bool  # this run created it: drop the whole database at the end
    adopted: bool  # it existed, empty: drop only the marker (and the tables we built)
    recipe: Recipe | None = None
    kept: bool = False  # reused, or made to be reused: left in place at the end


class _Server:
    """Create, find and drop databases on a server backend."""

    def __init__(self, url: URL) -> None:
        self.url = url
        self.family = "mysql" if url.get_backend_name() in ("mysql", "mariadb") else "postgresql"

    def _admin_urls(self) -> list[URL]:
        if self.family == "mysql":
            return [self.url._replace(database=None)]  # URL.set() ignores None
        # Never the test database itself: it cannot drop itself while connected to.
        return [self.url.set(database=name) for name in ("postgres", "template1")]

    def run(self, fn: Callable[[Connection], T]) -> T:
        error: BaseException | None = None
        for url in self._admin_urls():
            try:
                return run_with_connection(url, fn, autocommit=True)
            except Exception as exc:  # the base database may not exist: try the next
                error = exc
                if "does not exist" not in str(exc):
                    raise
        assert error is not None
        raise error

    def exists(self, name: str) -> bool:
        if self.family == "mysql":
            query = "SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = :name"
        else:
            query = "SELECT 1 FROM pg_database WHERE datname = :name"
        return bool(self.run(lambda c: c.execute(sql(query), {"name": name}).first()))

    def names(self) -> list[str]:
        if self.family == "mysql":
            query = "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA"
        else:
            query = "SELECT datname FROM pg_database"
        return [str(n) for n in self.run(lambda c: c.execute(sql(query)).scalars().all())]

    def create(self, name: str) -> None:
        self.run(lambda c: c.exec_driver_sql(f"CREATE DATABASE {_quote(c, name)}"))

    def drop(self, name: str) -> None:
        def drop(conn: Connection) -> None:
            force = " WITH (FORCE)" if self.family == "postgresql" else ""
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {_quote(conn, name)}{force}")

        self.run(drop)


def _quote(conn: Connection, name: str) -> str:
    return conn.dialect.identifier_preparer.quote_identifier(name)


def _looking(url: URL) -> URL:
    """``url`` for looking only: a SQLite file opened read-only, so that looking at a file
    another process has just removed fails instead of creating it anew. Through the standard
    library's driver: a failed aiosqlite connect can leave its thread calling back into a loop
    that is already closed."""
    if url.get_backend_name() != "sqlite" or dialects.is_memory(url):
        return url
    return url.set(
        drivername="sqlite+pysqlite",
        database=f"file:{url.database}",
        query={"mode": "ro", "uri": "true"},
    )


def _tables(url: URL) -> list[str]:
    return run_with_connection(
        _looking(url), lambda c: inspect(c).get_table_names(), autocommit=True
    )


def _write_marker(conn: Connection, run_id: str, fingerprint: str | None) -> None:
    _marker.create(conn, checkfirst=True)
    conn.execute(
        _marker.insert().values(
            run_id=run_id,
            fingerprint=fingerprint,
            created_at=datetime.now(timezone.utc).replace(tzinfo=None),
            host=socket.gethostname()[:255],
            pid=os.getpid(),
        )
    )


def _mark(url: URL, run_id: str, fingerprint: str | None) -> None:
    run_with_connection(url, lambda c: _write_marker(c, run_id, fingerprint), autocommit=False)


@dataclass(frozen=True)
class Recipe:
    """What fills a new test database (schema and seed rows), and its fingerprint."""

    fill: Callable[[Connection], None]
    empty: Callable[[Connection], None]  # undo fill (for a database we adopted, not created)
    fingerprint: str
    describe: str  # for the progress line: "the schema of myapp.models:Base (12 tables)"
    #: Runs before ``fill`` with the database's URL, on connections of its own (Alembic).
    migrate: Callable[[URL], None] | None = None

    def apply(self, url: URL, run_id: str | None = None) -> None:
        """Fill the database at ``url``; with ``run_id``, mark it as ours in the same go."""
        if self.migrate is not None:
            self.migrate(url)

        def fill(conn: Connection) -> None:
            self.fill(conn)
            if run_id is not None:
                _write_marker(conn, run_id, self.fingerprint)

        run_with_connection(url, fill, autocommit=False)


def provision(
    target: URL,
    run_id: str,
    *,
    recipe: Recipe | None = None,
    template: URL | None = None,
    report: Callable[[str], None] = lambda line: None,
    reuse: bool = False,
    recreate: bool = False,
) -> ProvisionedDatabase:
    """Create (or adopt, if empty) the test database ``target`` and mark it.

    With a recipe the database is filled once per run: into ``template``, built if this run
    has not built it yet, then cloned for each worker. Workers take turns through a lock, so
    the template is built by the first and only cloned by the others.

    With ``reuse``, a database (or template) of ours whose recorded fingerprint matches the
    recipe's is used as it is, and kept at the end; one that does not match is rebuilt.
    ``recreate`` rebuilds in any case (and, with ``reuse``, keeps the result).
    """
    if dialects.is_memory(target):
        return ProvisionedDatabase(target, created=False, adopted=False)
    server = _server(target)
    fingerprint = recipe.fingerprint if recipe is not None else None
    with _file_lock(template or target):
        trust = reuse and not recreate
        state = _claim(target, server, fingerprint if trust else _NO_REUSE)
        if state == "reuse":
            report(f"reusing {mask(target)} (schema unchanged)")
            return ProvisionedDatabase(target, created=False, adopted=False, kept=True)
        if state == "adopt":
            if recipe is not None:
                _fill(target, recipe, run_id, report)
            else:
                _mark(target, run_id, None)
            return ProvisionedDatabase(target, created=False, adopted=True, recipe=recipe)
        if recipe is not None and template is not None:
            _ensure_template(template, recipe, run_id, report, reuse=trust)
        try:
            if recipe is None or template is None:
                _create(target, server)
                _mark(target, run_id, None)
            else:
                _clone(template, target, server)
                _mark(target, run_id, recipe.fingerprint)
        except BaseException:
            _drop_quietly(target, server)  # half made by us: leave nothing behind
            raise
    return ProvisionedDatabase(target, created=True, adopted=False, kept=reuse)


def _drop_quietly(url: URL, server: _Server | None) -> None:
    with contextlib.suppress(Exception):  # the original error is the one worth reporting
        _drop(url, server)


def _server(url: URL) -> _Server | None:
    return None if url.get_backend_name() == "sqlite" else _Server(url)


def _exists(url: URL, server: _Server | None) -> bool:
    name = url.database or ""
    return Path(name).exists() if server is None else server.exists(name)


def _create(url: URL, server: _Server | None) -> None:
    if server is not None:
        server.create(url.database or "")


def _refuse(url: URL, tables: list[str]) -> None:
    shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
    raise ProvisioningError(
        f"The test database {mask(url)} already exists and holds tables ({shown}) but no "
        f"pytest-alchemy marker, so it was not made by this plugin and is left alone. Drop it "
        f"yourself if it is disposable, or choose another name with alchemy_test_database or "
        f"alchemy_database_suffix."
    )


_NO_REUSE = "no reuse"  # a fingerprint no database carries


def _claim(url: URL, server: _Server | None, reusable: str | None) -> str:
    """Make room for a database of ours at ``url``.

    Returns ``"absent"`` (create it), ``"adopt"`` (it exists, empty, not ours) or ``"reuse"``
    (ours, and its last recorded fingerprint is ``reusable``).
    """
    if not _exists(url, server):
        return "absent"
    tables = _tables(url)
    if MARKER_TABLE in tables:
        markers = _markers(url)
        if markers and markers[-1][1] == reusable:
            return "reuse"
        _drop(url, server)  # an earlier run's, left behind or built from another schema
        return "absent"
    if tables:
        _refuse(url, tables)
    return "adopt"


def _marker_rows(url: URL) -> list[dict[str, Any]]:
    def read(conn: Connection) -> list[dict[str, Any]]:
        # Whatever columns the marker has (an older release may have written fewer).
        rows = conn.execute(select(sql("*")).select_from(_marker)).mappings().all()
        return sorted((dict(row) for row in rows), key=lambda row: row.get("id") or 0)

    return run_with_connection(_looking(url), read, autocommit=True)


def _markers(url: URL) -> list[tuple[str, str | None]]:
    return [(str(row.get("run_id")), row.get("fingerprint")) for row in _marker_rows(url)]


#: A database of ours whose run is gone but was not on this host counts as stale after this.
STALE_AFTER = timedelta(days=2)


def _stale(rows: list[dict[str, Any]], run_id: str) -> bool:
    """Whether the run that made a database of ours is over (it crashed or was killed)."""
    if not rows or any(row.get("run_id") == run_id for row in rows):
        return False
    last = rows[-1]
    if last.get("host") == socket.gethostname()[:255] and isinstance(last.get("pid"), int):
        return not _alive(last["pid"])
    created = last.get("created_at")
    now = datetime.now(timezone.utc).replace(tzinfo=None)  # as written by _write_marker
    return isinstance(created, datetime) and now - created > STALE_AFTER


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def sweep(base: URL, naming: Naming, run_id: str) -> list[URL]:
    """Drop the databases of earlier, dead runs that carry our marker and a name we derive.

    ``base`` is the configured URL. Only names this plugin derives from it are looked at
    (``test_myapp``, ``test_myapp_gw3``, ``test_myapp_template``), and only those with the
    marker are dropped, when the run that made them is gone: its process no longer exists on
    this host, or, made on another host, it is older than :data:`STALE_AFTER`. Returns what
    was dropped.
    """
    if dialects.is_memory(base):
        return []
    family = Naming(naming.name, naming.suffix)
    server = _server(base)
    if server is None:
        path = Path(base.database or "")
        ext = "".join(path.suffixes)
        stem = family.derive(path.name[: len(path.name) - len(ext)] if ext else path.name)
        pattern = re.compile(rf"^{re.escape(stem)}(_gw\d+|_template)?{re.escape(ext)}$")
        folder = path.parent
        names = (
            [str(p) for p in folder.iterdir() if pattern.match(p.name)] if folder.is_dir() else []
        )
    else:
        pattern = re.compile(
            rf"^{re.escape(family.derive(base.database or ''))}(_gw\d+|_template)?$"
        )
        names = [n for n in server.names() if pattern.match(n)]
    dropped = []
    for name in names:
        url = base.set(database=name)
        try:
            if MARKER_TABLE in _tables(url) and _stale(_marker_rows(url), run_id):
                _drop(url, server)
                dropped.append(url)
        except Exception:  # gone meanwhile (another worker swept it), or not ours to read
            continue
    return dropped


def _ensure_template(
    template: URL, recipe: Recipe, run_id: str, report: Callable[[str], None], *, reuse: bool
) -> None:
    """Build the template unless this run already did (or, reusing, an earlier run did)."""
    server = _server(template)
    if _exists(template, server):
        tables = _tables(template)
        if MARKER_TABLE in tables:
            markers = _markers(template)
            if (run_id, recipe.fingerprint) in markers:
                return
            if reuse and markers and markers[-1][1] == recipe.fingerprint:
                return
            _drop(template, server)
        elif tables:
            _refuse(template, tables)
        else:
            _fill(template, recipe, run_id, report)  # an empty database we may use
            return
    _create(template, server)
    try:
        _fill(template, recipe, run_id, report)
    except BaseException:
        _drop_quietly(template, server)
        raise


def _fill(url: URL, recipe: Recipe, run_id: str, report: Callable[[str], None]) -> None:
    started = time.perf_counter()
    recipe.apply(url, run_id)
    report(f"built {recipe.describe} into {mask(url)} in {time.perf_counter() - started:.2f}s")


def _clone(template: URL, target: URL, server: _Server | None) -> None:
    """Copy the template's tables and rows into the new database ``target``."""
    if server is None:
        shutil.copyfile(template.database or "", target.database or "")
    elif server.family == "postgresql":
        server.run(
            lambda c: c.exec_driver_sql(
                f"CREATE DATABASE {_quote(c, target.database or '')} "
                f"TEMPLATE {_quote(c, template.database or '')}"
            )
        )
    else:
        server.create(target.database or "")
        run_with_connection(
            target, lambda c: _copy_mysql(c, template.database or ""), autocommit=True
        )


def _copy_mysql(conn: Connection, source: str) -> None:
    """MySQL has no CREATE DATABASE ... TEMPLATE: copy each table's definition, then its rows."""
    quoted = _quote(conn, source)
    conn.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 0")
    try:
        for table, _ in conn.exec_driver_sql(
            f"SHOW FULL TABLES FROM {quoted} WHERE Table_type = 'BASE TABLE'"
        ).all():
            create = conn.exec_driver_sql(
                f"SHOW CREATE TABLE {quoted}.{_quote(conn, table)}"
            ).one()[1]
            conn.exec_driver_sql(create)
            conn.exec_driver_sql(
                f"INSERT INTO {_quote(conn, table)} SELECT * FROM {quoted}.{_quote(conn, table)}"
            )
    finally:
        conn.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 1")


@contextlib.contextmanager
def _file_lock(url: URL) -> Iterator[None]:
    """Serialize provisioning of one database between the processes of this machine.

    pytest-xdist workers run on one machine; a file lock in the temporary directory needs no
    connection and works the same for every backend and driver.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock; workers may then build the template twice
        yield
        return
    key = hashlib.sha256(url.render_as_string(hide_password=True).encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"pytest-alchemy-{key}.lock"
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _drop(url: URL, server: _Server | None) -> None:
    if server is None:
        for suffix in ("", "-journal", "-wal", "-shm"):
            Path(f"{url.database}{suffix}").unlink(missing_ok=True)
    else:
        server.drop(url.database or "")


def release(database: ProvisionedDatabase) -> None:
    """At the end of the run: drop what this run created; never anything without our marker."""
    url = database.url
    if database.kept or not (database.created or database.adopted):
        return
    if MARKER_TABLE not in _tables(url):
        return  # someone removed our marker: not ours to drop any more
    if database.created:
        _drop(url, _server(url))
        return

    def empty(conn: Connection) -> None:
        if database.recipe is not None:
            database.recipe.empty(conn)
        _marker.drop(conn)

    run_with_connection(url, empty, autocommit=False)


def release_template(template: URL, run_id: str) -> None:
    """Drop the template if this run built it (it has our marker with this run's id)."""
    server = _server(template)
    if not _exists(template, server) or MARKER_TABLE not in _tables(template):
        return
    if any(run == run_id for run, _ in _markers(template)):
        _drop(template, server)
