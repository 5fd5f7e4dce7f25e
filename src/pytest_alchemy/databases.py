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
import os
import socket
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, create_engine, inspect
from sqlalchemy import text as sql
from sqlalchemy.pool import NullPool

from pytest_alchemy import dialects
from pytest_alchemy.config import mask
from pytest_alchemy.errors import ProvisioningError

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

    from sqlalchemy.engine import URL, Connection

T = TypeVar("T")

MARKER_TABLE = "pytest_alchemy_marker"
_marker = Table(
    MARKER_TABLE,
    MetaData(),
    Column("run_id", String(32), primary_key=True),
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

    def derive(self, base: str) -> str:
        name = self.name or f"test_{base}"
        for part in (self.suffix, self.worker):
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
    return url.set(database=naming.derive(url.database))


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

    def create(self, name: str) -> None:
        self.run(lambda c: c.exec_driver_sql(f"CREATE DATABASE {_quote(c, name)}"))

    def drop(self, name: str) -> None:
        def drop(conn: Connection) -> None:
            force = " WITH (FORCE)" if self.family == "postgresql" else ""
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {_quote(conn, name)}{force}")

        self.run(drop)


def _quote(conn: Connection, name: str) -> str:
    return conn.dialect.identifier_preparer.quote_identifier(name)


def _tables(url: URL) -> list[str]:
    return run_with_connection(url, lambda c: inspect(c).get_table_names(), autocommit=True)


def _mark(url: URL, run_id: str) -> None:
    def mark(conn: Connection) -> None:
        _marker.create(conn, checkfirst=True)
        conn.execute(
            _marker.insert().values(
                run_id=run_id,
                created_at=datetime.now(timezone.utc).replace(tzinfo=None),
                host=socket.gethostname()[:255],
                pid=os.getpid(),
            )
        )

    run_with_connection(url, mark, autocommit=False)


def provision(target: URL, run_id: str | None = None) -> ProvisionedDatabase:
    """Create (or adopt, if empty) the test database ``target`` (see derive_test_url); mark it."""
    if dialects.is_memory(target):
        return ProvisionedDatabase(target, created=False, adopted=False)
    run_id = run_id or uuid.uuid4().hex
    sqlite = target.get_backend_name() == "sqlite"
    server = None if sqlite else _Server(target)
    name = target.database or ""
    exists = Path(name).exists() if sqlite else server.exists(name)  # type: ignore[union-attr]
    created = adopted = False
    if exists:
        tables = _tables(target)
        if MARKER_TABLE in tables:
            _drop(target, server)  # left by an earlier run of ours that did not clean up
            exists = False
        elif tables:
            shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
            raise ProvisioningError(
                f"The test database {mask(target)} already exists and holds tables ({shown}) "
                f"but no pytest-alchemy marker, so it was not made by this plugin and is left "
                f"alone. Drop it yourself if it is disposable, or choose another name with "
                f"alchemy_test_database or alchemy_database_suffix."
            )
        else:
            adopted = True
    if not exists:
        if server is not None:
            server.create(name)
        created = True
    _mark(target, run_id)
    return ProvisionedDatabase(target, created=created, adopted=adopted)


def _drop(url: URL, server: _Server | None) -> None:
    if server is None:
        for suffix in ("", "-journal", "-wal", "-shm"):
            Path(f"{url.database}{suffix}").unlink(missing_ok=True)
    else:
        server.drop(url.database or "")


def release(database: ProvisionedDatabase) -> None:
    """At the end of the run: drop what this run created; never anything without our marker."""
    url = database.url
    if not (database.created or database.adopted):
        return
    if MARKER_TABLE not in _tables(url):
        return  # someone removed our marker: not ours to drop any more
    if database.created:
        sqlite = url.get_backend_name() == "sqlite"
        _drop(url, None if sqlite else _Server(url))
    else:
        run_with_connection(url, lambda c: _marker.drop(c), autocommit=False)
