"""Test databases: derive their names, create them, mark who holds them, drop them.

``alchemy_url`` names a server and a base database (``.../myapp``); the tests run on a
database derived from it, ``test_myapp`` (``alchemy_test_database`` overrides the name),
with ``_<suffix>`` for ``alchemy_database_suffix`` and ``_<worker>`` under pytest-xdist
(``test_myapp_gw0``). A SQLite file ``app.db`` becomes ``test_app.db`` beside it. The base
database itself, and the server's system databases, are never used, changed or dropped.

Every database the plugin creates, adopts or reuses gets marker rows naming the run that holds
it (see :mod:`pytest_alchemy.ownership`). The plugin only ever drops a database that has its
marker, the name it derived itself, and whose holder is this run, or a run that is provably
gone. It adopts an existing database of that name only when it holds no user object at all
(see :mod:`pytest_alchemy.inventory`), marks it as adopted, and never drops it: it removes only
the objects it recorded creating there. A database held by another live run is left alone,
and this run works on names of its own (``test_myapp_r1a2b3c4d``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Double,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    inspect,
    select,
    update,
)
from sqlalchemy import text as sql
from sqlalchemy.pool import NullPool

from pytest_alchemy import dialects, inventory, ownership
from pytest_alchemy.config import mask
from pytest_alchemy.errors import ProvisioningError

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Iterator

    from sqlalchemy.engine import URL, Connection

    from pytest_alchemy.ownership import Owner

T = TypeVar("T")

MARKER_TABLE = "pytest_alchemy_marker"
WRITTEN_TABLE = "pytest_alchemy_written"  # see commits.py
_marker = Table(
    MARKER_TABLE,
    MetaData(),
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(32), nullable=False),
    Column("fingerprint", String(64)),
    Column("created_at", DateTime),
    Column("host", String(255)),
    Column("pid", Integer),
    # The run's process start time (a reused pid is another process); MySQL's FLOAT is 4 bytes.
    Column("started", Double),
    Column("heartbeat", DateTime),
    Column("adopted", Boolean),  # it existed before us: never dropped, only emptied
    Column("objects", Text),  # in an adopted database, what we created there (JSON)
    Column("released", DateTime),  # kept for reuse, and no longer held by its run
)

#: Databases no test may run on, whatever the configuration says.
RESERVED = {
    "postgresql": {"postgres", "template0", "template1"},
    "mysql": {"mysql", "information_schema", "performance_schema", "sys"},
}


@dataclass(frozen=True)
class Naming:
    """What the test database's name is made of, besides the base name."""

    name: str | None = None  # alchemy_test_database
    suffix: str | None = None  # alchemy_database_suffix
    worker: str | None = None  # pytest-xdist worker id (gw0, gw1, ...)
    template: bool = False  # the run's template, which the workers' databases are cloned from
    run: str | None = None  # "r" + the run id's start: names of our own, the usual ones busy
    schema: str | None = None  # a schema of some tests' own (schema.Schema.key)

    def derive(self, base: str) -> str:
        name = self.name or f"test_{base}"
        last = "template" if self.template else self.worker
        for part in (self.suffix, self.schema, self.run, last):
            if part:
                name = f"{name}_{part}"
        return name


def run_part(run_id: str) -> str:
    """The name part of a run's own databases, when the usual names are another run's."""
    return f"r{run_id[:8]}"


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
    family = "mysql" if url.get_backend_name() in ("mysql", "mariadb") else "postgresql"
    if name.lower() in RESERVED[family]:
        raise ProvisioningError(
            f"alchemy_test_database = {name!r} is a system database of the server. The plugin "
            f"creates, fills and drops its test database, so it must be one of its own: choose "
            f"another name (the default is 'test_' + the database named in alchemy_url)."
        )
    return url.set(database=name)


def run_with_connection(url: URL, fn: Callable[[Connection], T], *, autocommit: bool) -> T:
    """Run ``fn`` on a short-lived connection to ``url``, through its own driver.

    An async URL runs on a private event loop in a thread, so this works from inside a running
    loop as well as at session end, and needs no sync driver.
    """
    from pytest_alchemy.routing import OWN_ENGINES  # its commits are the plugin's, not escapes

    url, options = dialects.engine_options(url)
    options["poolclass"] = NullPool
    if autocommit:
        options["isolation_level"] = "AUTOCOMMIT"
    if not dialects.is_async(url):
        engine = create_engine(url, **options)
        OWN_ENGINES.add(engine)
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
        OWN_ENGINES.add(engine.sync_engine)
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
    adopted: bool  # it existed, empty: remove only what we created in it, and our marker
    recipe: Recipe | None = None
    kept: bool = False  # reused, or made to be reused: left in place at the end


class Busy(Exception):
    """The database is held by another run that is alive: it must not be touched."""

    def __init__(self, url: URL, holder: dict[str, Any]) -> None:
        self.url = url
        self.holder = ownership.describe_holder(holder)
        super().__init__(f"{mask(url)} is in use by {self.holder}")


class Taken(Busy):
    """CREATE DATABASE failed because the database exists now: another run, reaching the
    server by another address (no shared lock file), created it at the same moment. It is
    that run's: never dropped by this one, which works on names of its own instead."""

    def __init__(self, url: URL) -> None:
        self.url = url
        self.holder = "another run that created it at the same moment"
        Exception.__init__(self, f"{mask(url)} was just created by {self.holder}")


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
        lend = getattr(_LENT, "sessions", {}).get(self._admin_urls()[0])
        if lend is not None:  # this thread's turn holds a session on the server: use it
            try:
                return lend(fn)  # type: ignore[no-any-return]
            except ownership.NotHeld:
                pass
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

    def hold(self, fn: Callable[[Connection], None]) -> None:
        """Run ``fn`` on a session of the server's own: MySQL's, or PostgreSQL's ``postgres``
        database (never ``template1``, which would keep CREATE DATABASE from copying it). A
        server without a ``postgres`` database runs nothing."""
        url = self._admin_urls()[0]
        try:
            run_with_connection(url, fn, autocommit=True)
        except Exception as exc:
            if self.family == "postgresql" and "does not exist" in str(exc):
                return
            raise

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

    def create(self, name: str, template: str | None = None) -> None:
        """CREATE DATABASE (from ``template``); :class:`Taken` if it failed because another
        run created the database meanwhile."""

        def create(c: Connection) -> None:
            copy = f" TEMPLATE {_quote(c, template)}" if template else ""
            c.exec_driver_sql(f"CREATE DATABASE {_quote(c, name)}{copy}")

        try:
            self.run(create)
        except Exception:
            if self.exists(name):
                raise Taken(self.url.set(database=name)) from None
            raise

    def drop(self, name: str) -> None:
        def drop(conn: Connection) -> None:
            force = " WITH (FORCE)" if self.family == "postgresql" else ""
            if self.family == "mysql":  # as WITH (FORCE): a session left in a transaction
                # there (a test's leaked connection) would keep DROP waiting for ever
                sessions = conn.execute(
                    sql(
                        "SELECT ID FROM information_schema.PROCESSLIST "
                        "WHERE DB = :name AND ID <> CONNECTION_ID()"
                    ),
                    {"name": name},
                ).scalars()
                for session in list(sessions):
                    with contextlib.suppress(Exception):  # gone meanwhile
                        conn.exec_driver_sql(f"KILL {int(session)}")
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


@dataclass
class _Found:
    """What an existing database holds: user objects besides the marker, and marker rows."""

    objects: list[inventory.Object]
    rows: list[dict[str, Any]] | None  # None: no marker table
    columns: set[str]
    #: A test of the commit strategy began and was not restored (its run was killed): the
    #: database holds what it committed.
    unrestored: bool = False

    @property
    def marked(self) -> bool:
        return self.rows is not None

    @property
    def legible(self) -> bool:
        """Whether the marker says who holds the database (older releases' markers did not)."""
        return bool(self.rows) and "adopted" in self.columns

    @property
    def holder(self) -> dict[str, Any]:
        assert self.rows
        return self.rows[-1]

    @property
    def adopted(self) -> bool:
        return any(row.get("adopted") for row in self.rows or ())

    @property
    def recorded(self) -> list[inventory.Object]:
        """What the plugin created in an adopted database."""
        for row in reversed(self.rows or []):
            if row.get("objects"):
                return inventory.loads(row["objects"])
        return []


def _look(url: URL) -> _Found:
    def read(conn: Connection) -> _Found:
        found = inventory.objects(conn, skip=MARKER_TABLE)
        if not inspect(conn).has_table(MARKER_TABLE):
            return _Found(found, None, set())
        columns = {c["name"] for c in inspect(conn).get_columns(MARKER_TABLE)}
        rows = [dict(r) for r in conn.execute(select(sql("*")).select_from(_marker)).mappings()]
        rows.sort(key=lambda row: row.get("id") or 0)
        unrestored = inspect(conn).has_table(WRITTEN_TABLE) and bool(
            conn.execute(select(sql("1")).select_from(sql(WRITTEN_TABLE)).limit(1)).first()
        )
        return _Found(found, rows, columns, unrestored)

    return run_with_connection(_looking(url), read, autocommit=True)


def _objects(url: URL) -> list[inventory.Object]:
    """Every user object in the database at ``url``, the marker included."""
    return run_with_connection(_looking(url), inventory.objects, autocommit=True)


def _write_marker(
    conn: Connection,
    owner: Owner,
    fingerprint: str | None,
    *,
    adopted: bool = False,
    objects: str | None = None,
    fresh: bool = False,
) -> None:
    """Record ``owner`` as the holder; ``fresh`` first removes rows a clone copied."""
    _marker.create(conn, checkfirst=True)
    if fresh:
        conn.execute(_marker.delete())
    conn.execute(
        _marker.insert().values(
            **owner.marker_values(), fingerprint=fingerprint, adopted=adopted, objects=objects
        )
    )


def _mark(url: URL, owner: Owner, fingerprint: str | None, *, fresh: bool = False) -> None:
    run_with_connection(
        url, lambda c: _write_marker(c, owner, fingerprint, fresh=fresh), autocommit=False
    )


def beat(url: URL, run_id: str) -> None:
    """The heartbeat of a live run on a database it holds."""

    def touch(conn: Connection) -> None:
        conn.execute(
            update(_marker).where(_marker.c.run_id == run_id).values(heartbeat=ownership.now())
        )

    run_with_connection(url, touch, autocommit=False)


@dataclass(frozen=True)
class Recipe:
    """What fills a new test database (schema and seed rows), and its fingerprint."""

    fill: Callable[[Connection], None]
    empty: Callable[[Connection], None]  # undo fill (for the default file, not provisioned)
    fingerprint: str
    describe: str  # for the progress line: "the schema of myapp.models:Base (12 tables)"
    #: Runs before ``fill`` with the database's URL, on connections of its own (Alembic).
    migrate: Callable[[URL], None] | None = None

    def apply(self, url: URL, then: Callable[[Connection], None] | None = None) -> None:
        """Fill the database at ``url``; ``then`` runs in the same transaction (the marker)."""
        if self.migrate is not None:
            self.migrate(url)

        def fill(conn: Connection) -> None:
            self.fill(conn)
            if then is not None:
                then(conn)

        run_with_connection(url, fill, autocommit=False)


def provision(
    target: URL,
    owner: Owner,
    *,
    recipe: Recipe | None = None,
    template: URL | None = None,
    report: Callable[[str], None] = lambda line: None,
    reuse: bool = False,
    recreate: bool = False,
    first: Callable[[], None] | None = None,
) -> ProvisionedDatabase:
    """Create (or adopt, if empty) the test database ``target`` and mark it as ``owner``'s.

    With a recipe the database is filled once per run: into ``template``, built if this run
    has not built it yet, then cloned for each worker. Workers take turns through a lock, so
    the template is built by the first and only cloned by the others. Runs on one server take
    turns through the server's own lock too (:func:`pytest_alchemy.ownership.server_lock`):
    no run finds a database another has just created, not yet marked, and adopts it.

    With ``reuse``, a database (or template) of ours whose recorded fingerprint matches the
    recipe's, and whose holder is gone, is used as it is, and kept at the end; one that does
    not match is rebuilt. ``recreate`` rebuilds in any case (and, with ``reuse``, keeps the
    result). Raises :class:`Busy` when ``target`` or ``template`` is another live run's.
    ``first`` runs at the start of the turn (the run's sweep: on the turn's session).
    """
    if dialects.is_memory(target):
        return ProvisionedDatabase(target, created=False, adopted=False)
    server = _server(target)
    fingerprint = recipe.fingerprint if recipe is not None else None
    with _turn(template or target, report):
        if first is not None:
            first()
        trust = reuse and not recreate
        state = _claim(target, server, owner, fingerprint if trust else _NO_REUSE)
        if state == "reuse":
            report(f"reusing {mask(target)} (schema unchanged)")
            return ProvisionedDatabase(target, created=False, adopted=False, kept=True)
        if state == "adopt":
            _adopt(target, recipe, owner, report)
            return ProvisionedDatabase(target, created=False, adopted=True, recipe=recipe)
        if recipe is not None and template is not None:
            _ensure_template(template, recipe, owner, report, reuse=trust)
        try:
            _make(target, server, owner, recipe, template, report)
        except Taken:
            raise  # another run's: not touched
        except BaseException:
            _drop_quietly(target, server)  # half made by us: leave nothing behind
            raise
    return ProvisionedDatabase(target, created=True, adopted=False, kept=reuse)


@contextlib.contextmanager
def _turn(held: URL, report: Callable[[str], None]) -> Iterator[None]:
    """This process's turn at provisioning ``held``: no other process of this machine (the
    file lock), nor run on its server (the server's lock), provisions it meanwhile."""
    server = _server(held)
    with (
        ownership.file_lock(held),
        ownership.server_lock(
            held.database or "",
            server.family if server else "",
            server.hold if server else None,
            report,
        ) as lend,
    ):
        if server is None or lend is None:
            yield
            return
        sessions = _LENT.__dict__.setdefault("sessions", {})
        admin = server._admin_urls()[0]
        outer = sessions.get(admin)
        sessions[admin] = lend  # the turn's administrative work runs on the lock's session
        try:
            yield
        finally:
            if outer is None:
                del sessions[admin]
            else:
                sessions[admin] = outer


#: Per thread: the sessions that hold a server lock during a provisioning turn (see _turn),
#: by the administrative URL they are connected to.
_LENT = threading.local()


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


def _refuse(url: URL, found: list[inventory.Object]) -> None:
    raise ProvisioningError(
        f"The test database {mask(url)} already exists and holds objects "
        f"({inventory.describe(found)}) but no pytest-alchemy marker, so it was not made by "
        f"this plugin and is left alone. Drop it yourself if it is disposable, or choose "
        f"another name with alchemy_test_database or alchemy_database_suffix."
    )


def _illegible(url: URL) -> ProvisioningError:
    return ProvisioningError(
        f"The test database {mask(url)} has a pytest-alchemy marker that does not say which "
        f"run holds it (an older release wrote it, or a run was killed while marking it), so "
        f"it is left alone. Drop it yourself if it is disposable, or choose another name with "
        f"alchemy_test_database or alchemy_database_suffix."
    )


_NO_REUSE = "no reuse"  # a fingerprint no database carries


def _claim(url: URL, server: _Server | None, owner: Owner, reusable: str | None) -> str:
    """Make room for a database of ``owner``'s at ``url``.

    Returns ``"absent"`` (create it), ``"adopt"`` (it exists and holds nothing, or held only
    what an earlier run created in it, now removed), ``"reuse"`` (its last holder is gone, and
    it was built with the fingerprint ``reusable``: ``owner`` now holds it) or ``"ours"``
    (``owner``'s run holds it already). Raises :class:`Busy` if another live run holds it.
    """
    if not _exists(url, server):
        return "absent"
    found = _look(url)
    if not found.marked:
        if found.objects:
            _refuse(url, found.objects)
        return "adopt"
    if not found.legible:
        raise _illegible(url)
    holder = found.holder
    if holder.get("run_id") == owner.run_id:
        return "ours"
    if ownership.holder_alive(holder, owner.run_id):
        raise Busy(url, holder)
    if holder.get("fingerprint") == reusable and not found.unrestored:
        objects = inventory.dumps(found.recorded) if found.adopted else None
        run_with_connection(
            url,
            lambda c: _write_marker(c, owner, reusable, adopted=found.adopted, objects=objects),
            autocommit=False,
        )
        return "reuse"
    if found.adopted:  # never dropped: what the earlier run created goes, the database stays
        _empty_adopted(url, found.recorded)
        left = _look(url)
        if left.marked or left.objects:
            _refuse(url, left.objects)
        return "adopt"
    _drop(url, server)  # an earlier run's, left behind or built from another schema
    return "absent"


def _adopt(url: URL, recipe: Recipe | None, owner: Owner, report: Callable[[str], None]) -> None:
    """Fill an existing, empty database, recording what was created there.

    The marker goes in first: if the run dies while filling, the next one knows the database
    was adopted (and must not be dropped).
    """
    run_with_connection(
        url, lambda c: _write_marker(c, owner, None, adopted=True), autocommit=False
    )
    if recipe is None:
        return

    def record(conn: Connection) -> None:
        created = inventory.objects(conn, skip=MARKER_TABLE)
        conn.execute(
            update(_marker)
            .where(_marker.c.run_id == owner.run_id)
            .values(fingerprint=recipe.fingerprint, objects=inventory.dumps(created))
        )

    try:
        _fill(url, recipe, report, record)
    except BaseException:
        with contextlib.suppress(Exception):  # it was empty: everything in it is ours
            _empty_adopted(url, None)
        raise


def _empty_adopted(url: URL, recorded: list[inventory.Object] | None) -> None:
    """Remove what the plugin recorded creating in an adopted database, and its marker.

    ``recorded`` None: everything but the marker (a fill that failed in a database that was
    empty when we marked it).
    """

    def empty(conn: Connection) -> None:
        objects = inventory.objects(conn, skip=MARKER_TABLE) if recorded is None else recorded
        inventory.drop(conn, objects)
        _marker.drop(conn, checkfirst=True)

    run_with_connection(url, empty, autocommit=False)


def sweep(base: URL, naming: Naming, owner: Owner, *, ours: bool = False) -> list[str]:
    """Clear what earlier runs that are gone left behind under names we derive.

    ``base`` is the configured URL. Only names this plugin derives from it are looked at
    (``test_myapp``, ``test_myapp_gw3``, ``test_myapp_template``, ``test_myapp_r1a2b3c4d``,
    ``test_myapp_s1a2b3c4d_gw3`` for a schema of some tests' own),
    and only those with a legible marker whose holder is gone (see
    :func:`pytest_alchemy.ownership.holder_alive`) are touched: dropped if a run created them,
    emptied of what it created if they were adopted. With ``ours``, instead, those held by
    ``owner``'s own run (what crashed or interrupted workers left, at the end of the run).
    Databases kept for reuse, and released, are left. Returns what was done, one line each.
    """
    if dialects.is_memory(base):
        return []
    family = Naming(naming.name, naming.suffix)
    server = _server(base)
    tail = r"(_s[0-9a-f]{8})?(_r[0-9a-f]{8})?(_gw\d+|_template)?"
    if server is None:
        path = Path(base.database or "")
        ext = "".join(path.suffixes)
        stem = family.derive(path.name[: len(path.name) - len(ext)] if ext else path.name)
        pattern = re.compile(rf"^{re.escape(stem)}{tail}{re.escape(ext)}$")
        folder = path.parent
        names = (
            [str(p) for p in folder.iterdir() if pattern.match(p.name)] if folder.is_dir() else []
        )
    else:
        pattern = re.compile(rf"^{re.escape(family.derive(base.database or ''))}{tail}$")
        names = [n for n in server.names() if pattern.match(n)]
    done = []
    for name in names:
        url = base.set(database=name)
        try:
            found = _look(url)
            if not found.legible:
                continue
            holder = found.holder
            if ours:
                if holder.get("run_id") != owner.run_id or holder.get("released") is not None:
                    continue
            elif ownership.holder_alive(holder, owner.run_id):
                continue
            who = "this run's workers" if ours else "a run that is gone"
            if found.adopted:
                _empty_adopted(url, found.recorded)
                done.append(f"emptied {mask(url)} of what {who} built there")
            else:
                _drop(url, server)
                done.append(f"dropped {mask(url)}, left by {who}")
        except Exception:  # gone meanwhile (another worker swept it), or not ours to read
            continue
    return done


def _ensure_template(
    template: URL, recipe: Recipe, owner: Owner, report: Callable[[str], None], *, reuse: bool
) -> None:
    """Build the template unless this run already did (or, reusing, an earlier run did)."""
    server = _server(template)
    state = _claim(template, server, owner, recipe.fingerprint if reuse else _NO_REUSE)
    if state in ("ours", "reuse"):
        return
    if state == "adopt":
        _adopt(template, recipe, owner, report)
        return
    _create(template, server)
    try:
        _build(template, owner, recipe, report)
    except BaseException:
        _drop_quietly(template, server)
        raise


def _make(
    url: URL,
    server: _Server | None,
    owner: Owner,
    recipe: Recipe | None,
    template: URL | None,
    report: Callable[[str], None],
) -> None:
    """Create the test database ``url`` and mark it as ``owner``'s: cloned from ``template``
    (xdist workers, reuse), else built from ``recipe`` in it (one process: one CREATE
    DATABASE rather than two), else empty. The caller drops it if this fails."""
    if recipe is not None and template is not None:
        _clone(template, url, server)
        _mark(url, owner, recipe.fingerprint, fresh=True)
        return
    _create(url, server)
    if recipe is None:
        _mark(url, owner, None)
    else:
        _build(url, owner, recipe, report)


def _build(url: URL, owner: Owner, recipe: Recipe, report: Callable[[str], None]) -> None:
    """Fill the new database ``url`` from ``recipe``, marked as ``owner``'s in the same
    transaction."""
    _fill(url, recipe, report, lambda c: _write_marker(c, owner, recipe.fingerprint))


def _fill(
    url: URL,
    recipe: Recipe,
    report: Callable[[str], None],
    then: Callable[[Connection], None] | None,
) -> None:
    report(f"building {recipe.describe} into {mask(url)} ...")
    started = time.perf_counter()
    recipe.apply(url, then)
    report(f"built {recipe.describe} into {mask(url)} in {time.perf_counter() - started:.2f}s")


def _clone(template: URL, target: URL, server: _Server | None) -> None:
    """Copy the template's tables and rows into the new database ``target``."""
    if server is None:
        shutil.copyfile(template.database or "", target.database or "")
    elif server.family == "postgresql":
        server.create(target.database or "", template.database or "")
    else:
        server.create(target.database or "")
        run_with_connection(
            target, lambda c: _copy_mysql(c, template.database or ""), autocommit=True
        )


def _copy_mysql(conn: Connection, source: str) -> None:
    """MySQL has no CREATE DATABASE ... TEMPLATE: copy each table's definition and rows, then
    views, routines, triggers (after the rows, so copying fires none) and events."""
    quoted = _quote(conn, source)

    def show(statement: str) -> list[Any]:
        return list(conn.exec_driver_sql(statement).all())

    conn.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 0")
    try:
        for table, kind in show(
            f"SHOW FULL TABLES FROM {quoted} WHERE Table_type IN ('BASE TABLE', 'SEQUENCE')"
        ):
            name = _quote(conn, table)
            conn.exec_driver_sql(show(f"SHOW CREATE TABLE {quoted}.{name}")[0][1])
            if kind == "BASE TABLE":  # a MariaDB sequence starts again from its start value
                conn.exec_driver_sql(f"INSERT INTO {name} SELECT * FROM {quoted}.{name}")
    finally:
        conn.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 1")
    # A view's definition names the source database: the copy's must name its own.
    views = {
        name: show(f"SHOW CREATE VIEW {quoted}.{_quote(conn, name)}")[0][1].replace(
            f"{quoted}.", ""
        )
        for name, _ in show(f"SHOW FULL TABLES FROM {quoted} WHERE Table_type = 'VIEW'")
    }
    while views:  # views on views: create what can be, until nothing is left
        failed: dict[str, str] = {}
        for name, definition in views.items():
            try:
                conn.exec_driver_sql(definition)
            except Exception:
                failed[name] = definition
        if len(failed) == len(views):
            conn.exec_driver_sql(next(iter(failed.values())))  # raises the real error
        views = failed
    for kind, name in conn.execute(
        sql(
            "SELECT ROUTINE_TYPE, ROUTINE_NAME FROM information_schema.ROUTINES "
            "WHERE ROUTINE_SCHEMA = :source"
        ),
        {"source": source},
    ).all():
        conn.exec_driver_sql(show(f"SHOW CREATE {kind} {quoted}.{_quote(conn, name)}")[0][2])
    for row in show(f"SHOW TRIGGERS FROM {quoted}"):
        conn.exec_driver_sql(show(f"SHOW CREATE TRIGGER {quoted}.{_quote(conn, row[0])}")[0][2])
    for row in show(f"SHOW EVENTS FROM {quoted}"):
        conn.exec_driver_sql(show(f"SHOW CREATE EVENT {quoted}.{_quote(conn, row[1])}")[0][3])


def _drop(url: URL, server: _Server | None) -> None:
    if server is None:
        for suffix in ("", "-journal", "-wal", "-shm"):
            Path(f"{url.database}{suffix}").unlink(missing_ok=True)
    else:
        server.drop(url.database or "")


def restore(
    database: ProvisionedDatabase,
    owner: Owner,
    recipe: Recipe | None,
    template: URL | None,
    report: Callable[[str], None],
    *,
    reuse: bool,
) -> None:
    """Bring a test database back to what provisioning made of it, after a test escaped.

    What escaped is not known, so nothing of the database is kept: one this run created (or
    holds for reuse) is dropped and cloned from the template again (the template built anew
    if it is not there; the database built from the recipe if the run has no template), one
    it adopted is emptied of what was recorded and filled again. Every connection to it must
    be given up by the caller first (PostgreSQL's drop ends any that are left).
    """
    url = database.url
    server = _server(url)
    with _turn(template or url, report):
        if database.adopted:
            _empty_adopted(url, _look(url).recorded)
            _adopt(url, recipe, owner, report)
            return
        _drop(url, server)
        try:
            if recipe is not None and template is not None:
                _ensure_template(template, recipe, owner, report, reuse=reuse)
            _make(url, server, owner, recipe, template, report)
        except BaseException:
            _drop_quietly(url, server)
            raise


def release(database: ProvisionedDatabase, run_id: str) -> None:
    """At the end of the run: remove what this run made, if this run still holds it.

    A database this run created is dropped; one it adopted keeps everything but what the run
    created in it; one kept for reuse is marked as released, free for the next run. Nothing is
    done to a database whose marker is gone or names another holder.
    """
    url = database.url
    if not (database.created or database.adopted or database.kept):
        return
    found = _look(url)
    if not found.legible or found.holder.get("run_id") != run_id:
        return  # someone removed our marker, or another run holds it now
    if database.kept:
        run_with_connection(
            url,
            lambda c: c.execute(
                update(_marker).where(_marker.c.run_id == run_id).values(released=ownership.now())
            ),
            autocommit=False,
        )
        return
    if found.adopted:
        _empty_adopted(url, found.recorded)
    else:
        _drop(url, _server(url))


def release_template(template: URL, run_id: str, *, kept: bool = False) -> None:
    """Remove the template if this run holds it, or with ``kept`` mark it as released (the
    xdist controller calls this once every worker is done)."""
    if _exists(template, _server(template)):
        release(ProvisionedDatabase(template, created=True, adopted=False, kept=kept), run_id)
