"""The ``commit`` strategy: a test's commits are real, then the tables it wrote are restored.

``@pytest.mark.alchemy(strategy="commit")`` gives a test no sandbox: its sessions and
connections commit for real, so other connections, threads and processes see its writes
(``LISTEN/NOTIFY``, a worker in a subprocess, advisory locks, ``SERIALIZABLE`` retries). After
the test the database is put back as provisioning left it, at a cost that grows with what the
test wrote, not with the schema:

- Writes are noted by the database itself, whoever makes them: the first such test of a run
  gives every table of the test database a trigger that notes the table's name in
  ``pytest_alchemy_written`` (PostgreSQL: one per statement, TRUNCATE included; MySQL/MariaDB
  and SQLite: one per row). Nothing else of the schema changes. A table of seed rows that a
  TRUNCATE emptied on MySQL/MariaDB (no trigger sees it) is found by its row count.
- At that moment the database is as provisioned, so the rows of every table that holds any
  (the seed), the id counters and a digest of the schema are read then, once per database and
  process.
- After each such test, the tables written are emptied and given their seed rows again (on
  PostgreSQL with the tables that reference them: TRUNCATE cascades), and their counters are
  set back. A test that changed the schema (a table or column created, altered or dropped) gets
  the whole database rebuilt from the template instead.

Only the plugin's own test databases are restored this way: one it adopted (it existed, empty,
before the run) or a ``db_engine`` of the user's is rebuilt, or refused, never given triggers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import MetaData, Table, func, select
from sqlalchemy import text as sql

from pytest_alchemy import databases
from pytest_alchemy.counters import Counters

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from sqlalchemy.engine import URL, Connection, Engine

T = TypeVar("T")

WRITTEN_TABLE = databases.WRITTEN_TABLE
#: The row that says a commit test is running: a database left with it was not restored.
RUNNING = ""
_TRIGGER = "pytest_alchemy_note"
#: Seconds the restore waits for a lock another connection holds before it fails.
LOCK_TIMEOUT = 10
_OWN = {WRITTEN_TABLE, "pytest_alchemy_marker"}

_PG_DIGEST = """
SELECT count(*), coalesce(sum(hashtext(n.nspname || '.' || c.relname || '.'
       || c.relkind::text || ':' || coalesce(a.attname, '') || ':' || coalesce(a.atttypid::text, '')
       || ':' || coalesce(a.attnotnull::text, ''))::bigint), 0)
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0
    AND NOT a.attisdropped
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'i')
  AND left(n.nspname, 3) <> 'pg_' AND n.nspname <> 'information_schema'
"""
_MYSQL_DIGEST = """
SELECT COUNT(*), COALESCE(SUM(CRC32(CONCAT_WS('.', c.TABLE_NAME, c.COLUMN_NAME, c.COLUMN_TYPE,
       c.IS_NULLABLE, COALESCE(c.COLUMN_DEFAULT, '')))), 0)
FROM information_schema.COLUMNS c WHERE c.TABLE_SCHEMA = DATABASE()
"""
_PG_TRIGGERS = (
    "SELECT count(*), 0 FROM pg_catalog.pg_trigger "
    f"WHERE tgname = '{_TRIGGER}' AND NOT tgisinternal"
)
_MYSQL_TRIGGERS = (
    "SELECT COUNT(*), 0 FROM information_schema.TRIGGERS "
    f"WHERE TRIGGER_SCHEMA = DATABASE() AND LEFT(TRIGGER_NAME, {len(_TRIGGER)}) = '{_TRIGGER}'"
)
_SQLITE_DIGEST = "SELECT type, name, coalesce(sql, '') FROM sqlite_master ORDER BY type, name"


class SchemaChanged(Exception):
    """The test changed the schema: the database must be rebuilt, not its tables refilled."""


@dataclass
class Snapshot:
    """One test database as provisioned: its tables, seed rows, counters and schema digest."""

    backend: str
    metadata: MetaData
    seeds: dict[Table, list[dict[str, Any]]]
    counters: Counters
    digest: str
    sqlite_sequence: dict[str, int] = field(default_factory=dict)
    #: The layers open now (see :func:`push_layer`), innermost last.
    layers: list[_Layer] = field(default_factory=list)

    def table(self, schema: str | None, name: str) -> Table | None:
        key = f"{schema}.{name}" if schema else name
        found = self.metadata.tables.get(key)
        if found is None and schema is not None:  # the default schema, named
            found = self.metadata.tables.get(name)
        return found


def _backend(conn: Connection) -> str:
    name = conn.dialect.name
    return "mysql" if name in ("mysql", "mariadb") else name


def _quote(conn: Connection, name: str) -> str:
    return conn.dialect.identifier_preparer.quote_identifier(name)


def _qualified(conn: Connection, table: Table) -> str:
    name = _quote(conn, table.name)
    return f"{_quote(conn, table.schema)}.{name}" if table.schema else name


def digest(conn: Connection) -> str:
    """What changes when a table, column, view, sequence or index is created, altered or
    dropped, and when a table lost its note trigger (dropped and created again, as a fixture's
    ``drop_all``/``create_all`` does: its writes would go unnoted). One query."""
    backend = _backend(conn)
    if backend == "postgresql":
        rows = conn.exec_driver_sql(f"{_PG_DIGEST} UNION ALL {_PG_TRIGGERS}").all()
    elif backend == "mysql":
        rows = conn.exec_driver_sql(f"{_MYSQL_DIGEST} UNION ALL {_MYSQL_TRIGGERS}").all()
    else:
        rows = conn.exec_driver_sql(_SQLITE_DIGEST).all()  # triggers are in sqlite_master
    return hashlib.sha256(repr([tuple(r) for r in rows]).encode()).hexdigest()


def install(conn: Connection, schemas: set[str | None]) -> Snapshot:
    """Give every table a trigger noting writes, and read what restoring needs; in one
    transaction the caller commits. ``schemas``: the schemas the tests' tables live in."""
    backend = _backend(conn)
    metadata = MetaData()
    for schema in sorted(schemas, key=lambda s: s or ""):
        metadata.reflect(conn, schema=schema)
    for name in [key for key, table in metadata.tables.items() if table.name in _OWN]:
        metadata.remove(metadata.tables[name])
    tables = list(metadata.tables.values())
    if backend == "postgresql":
        _install_postgresql(conn, tables)
    elif backend == "mysql":
        _install_mysql(conn, tables)
    else:
        _install_sqlite(conn, tables)
    seeds = {}
    for table in tables:
        rows = [dict(r) for r in conn.execute(select(table)).mappings()]
        if rows:
            seeds[table] = rows
    sequence = _sqlite_sequence(conn) if backend == "sqlite" else {}
    snapshot = Snapshot(backend, metadata, seeds, Counters.read(conn), digest(conn), sequence)
    conn.execute(sql(f"DELETE FROM {WRITTEN_TABLE}"))  # what a killed test noted
    return snapshot


def _sqlite_sequence(conn: Connection) -> dict[str, int]:
    if not conn.exec_driver_sql(
        "SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'"
    ).first():
        return {}
    return {
        str(n): int(s) for n, s in conn.exec_driver_sql("SELECT name, seq FROM sqlite_sequence")
    }


def _install_postgresql(conn: Connection, tables: list[Table]) -> None:
    schema = _quote(conn, str(conn.exec_driver_sql("SELECT current_schema()").scalar()))
    written = f"{schema}.{WRITTEN_TABLE}"
    conn.exec_driver_sql(
        f"CREATE UNLOGGED TABLE IF NOT EXISTS {written} (schema_name text NOT NULL, "
        f"table_name text NOT NULL)"
    )
    # No key: concurrent writers never wait on each other's notes (nor conflict, serializable).
    conn.exec_driver_sql(
        f"CREATE OR REPLACE FUNCTION {schema}.{_TRIGGER}() RETURNS trigger LANGUAGE plpgsql "
        f"AS $$ BEGIN INSERT INTO {written} VALUES (TG_TABLE_SCHEMA, TG_TABLE_NAME); "
        f"RETURN NULL; END $$"
    )
    for table in tables:
        name = _qualified(conn, table)
        conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {_TRIGGER} ON {name}")
        conn.exec_driver_sql(
            f"CREATE TRIGGER {_TRIGGER} AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {name} "
            f"FOR EACH STATEMENT EXECUTE PROCEDURE {schema}.{_TRIGGER}()"
        )


def _trigger_name(table: Table, event: str) -> str:
    key = hashlib.sha256(f"{table.schema}.{table.name}".encode()).hexdigest()[:12]
    return f"{_TRIGGER}_{event[0].lower()}_{key}"  # 64 characters at most on MySQL


def _literal(name: str) -> str:
    return "'" + name.replace("\\", "\\\\").replace("'", "''") + "'"


def _install_mysql(conn: Connection, tables: list[Table]) -> None:
    conn.exec_driver_sql(
        f"CREATE TABLE IF NOT EXISTS {WRITTEN_TABLE} (schema_name VARCHAR(64) NOT NULL, "
        f"table_name VARCHAR(64) NOT NULL) ENGINE=InnoDB"
    )
    _row_triggers(conn, tables, "FOR EACH ROW {note}")


def _install_sqlite(conn: Connection, tables: list[Table]) -> None:
    conn.exec_driver_sql(
        f"CREATE TABLE IF NOT EXISTS {WRITTEN_TABLE} (schema_name TEXT NOT NULL, "
        f"table_name TEXT NOT NULL)"
    )
    _row_triggers(conn, tables, "BEGIN {note}; END")


def _row_triggers(conn: Connection, tables: list[Table], body: str) -> None:
    """A trigger per table and kind of write (MySQL and SQLite have row triggers only), whose
    ``body`` wraps the ``{note}`` statement."""
    for table in tables:
        note = f"INSERT INTO {WRITTEN_TABLE} VALUES ('', {_literal(table.name)})"
        for event in ("INSERT", "UPDATE", "DELETE"):
            trigger = _trigger_name(table, event)
            conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {trigger}")
            conn.exec_driver_sql(
                f"CREATE TRIGGER {trigger} AFTER {event} ON {_qualified(conn, table)} "
                + body.format(note=note)
            )


def begin(conn: Connection) -> None:
    """Before a commit test: note that one runs (committed by the caller)."""
    conn.execute(sql(f"INSERT INTO {WRITTEN_TABLE} VALUES ('', '{RUNNING}')"))


def restore(conn: Connection, snapshot: Snapshot, also: Iterable[Table] = ()) -> list[str]:
    """After a commit test: put back the tables it wrote, and ``also`` these (in one
    transaction the caller commits, MySQL's counters after it); the names of the tables
    restored.

    Raises :class:`SchemaChanged` when the schema is not the snapshot's.
    """
    # A connection still in a transaction on a written table (a session the test left open,
    # a subprocess still running) would make the restore wait for ever: it fails instead.
    if snapshot.backend == "postgresql":
        conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT * 1000}ms'")
    elif snapshot.backend == "mysql":
        conn.exec_driver_sql(
            f"SET SESSION lock_wait_timeout = {LOCK_TIMEOUT}, "
            f"innodb_lock_wait_timeout = {LOCK_TIMEOUT}"
        )
    if digest(conn) != snapshot.digest:
        raise SchemaChanged
    tables = dict.fromkeys([*_noted(conn, snapshot), *also])
    if snapshot.backend == "mysql":  # a TRUNCATE fires no trigger: an emptied seed table
        for table, rows in snapshot.seeds.items():
            if table not in tables:
                count = conn.execute(select(func.count()).select_from(table)).scalar()
                if count != len(rows):
                    tables[table] = None
    if tables:
        _refill(conn, snapshot, list(tables))
    conn.execute(sql(f"DELETE FROM {WRITTEN_TABLE}"))
    return sorted(t.fullname for t in tables)


def _noted(conn: Connection, snapshot: Snapshot) -> list[Table]:
    """The tables the notes name; :class:`SchemaChanged` for one the snapshot does not know."""
    noted = conn.execute(sql(f"SELECT DISTINCT schema_name, table_name FROM {WRITTEN_TABLE}")).all()
    tables = []
    for schema, name in noted:
        if name == RUNNING:
            continue
        table = snapshot.table(schema or None, name)
        if table is None:  # not a table of the snapshot: the schema changed
            raise SchemaChanged
        tables.append(table)
    return tables


@dataclass
class _Layer:
    """What a layer changed in the snapshot, to put back when its scope ends."""

    tables: list[Table]
    seeds: dict[Table, list[dict[str, Any]] | None]
    counters: Counters
    sqlite_sequence: dict[str, int]


def push_layer(conn: Connection, snapshot: Snapshot) -> list[str]:
    """A layer fixture has committed its rows: the tables it wrote, as they are now, and the
    counters become what the tests of its scope (and commit tests there) are restored to.
    The names of those tables."""
    if digest(conn) != snapshot.digest:
        raise SchemaChanged
    tables = list(dict.fromkeys(_noted(conn, snapshot)))
    snapshot.layers.append(
        _Layer(
            tables,
            {t: snapshot.seeds.get(t) for t in tables},
            snapshot.counters,
            dict(snapshot.sqlite_sequence),
        )
    )
    for table in tables:
        rows = [dict(r) for r in conn.execute(select(table)).mappings()]
        if rows:
            snapshot.seeds[table] = rows
        else:
            snapshot.seeds.pop(table, None)
    snapshot.counters = Counters.read(conn)
    snapshot.sqlite_sequence = _sqlite_sequence(conn) if snapshot.backend == "sqlite" else {}
    conn.execute(sql(f"DELETE FROM {WRITTEN_TABLE} WHERE table_name <> '{RUNNING}'"))
    return sorted(t.fullname for t in tables)


def pop_layer(conn: Connection, snapshot: Snapshot) -> list[str]:
    """The scope of the last layer ended: its tables (and what was written since) go back to
    what they were before it; the names of the tables restored."""
    layer = snapshot.layers.pop()
    for table, rows in layer.seeds.items():
        if rows:
            snapshot.seeds[table] = rows
        else:
            snapshot.seeds.pop(table, None)
    snapshot.counters = layer.counters
    snapshot.sqlite_sequence = layer.sqlite_sequence
    return restore(conn, snapshot, also=layer.tables)


def _referencing(snapshot: Snapshot, tables: list[Table]) -> list[Table]:
    """``tables`` and every table whose foreign keys lead to one of them (what PostgreSQL's
    TRUNCATE ... CASCADE empties), in dependency order."""
    found = set(tables)
    grew = True
    while grew:
        grew = False
        for table in snapshot.metadata.tables.values():
            if table not in found and any(fk.column.table in found for fk in table.foreign_keys):
                found.add(table)
                grew = True
    return [t for t in snapshot.metadata.sorted_tables if t in found]


def _refill(conn: Connection, snapshot: Snapshot, tables: list[Table]) -> None:
    backend = snapshot.backend
    if backend == "postgresql":
        tables = _referencing(snapshot, tables)
        listed = ", ".join(_qualified(conn, t) for t in tables)
        conn.exec_driver_sql(f"TRUNCATE {listed} CASCADE")
    else:
        # Foreign keys are off on this connection (MySQL: FOREIGN_KEY_CHECKS; SQLite: off
        # unless asked for): the rows of other tables that point at these come back with them.
        if backend == "mysql":
            conn.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 0")
        tables = [t for t in snapshot.metadata.sorted_tables if t in set(tables)]
        for table in reversed(tables):
            conn.execute(table.delete())
    for table in tables:
        rows = snapshot.seeds.get(table)
        if rows:
            conn.execute(table.insert(), rows)
    if backend == "mysql":
        conn.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 1")
    names = {t.name.lower() for t in tables}
    if backend == "postgresql":
        for statement in snapshot.counters.reset_statements(names):
            conn.exec_driver_sql(statement)
    elif backend == "sqlite":
        _reset_sqlite_sequence(conn, snapshot, tables)


def reset_after(snapshot: Snapshot, restored: list[str]) -> list[str]:
    """MySQL/MariaDB: what sets the restored tables' AUTO_INCREMENT back (each statement
    commits: run after the restore's transaction)."""
    if snapshot.backend != "mysql":
        return []
    return snapshot.counters.reset_statements({t.rsplit(".", 1)[-1].lower() for t in restored})


def _reset_sqlite_sequence(conn: Connection, snapshot: Snapshot, tables: list[Table]) -> None:
    if not conn.exec_driver_sql(
        "SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'"
    ).first():
        return
    for table in tables:
        value = snapshot.sqlite_sequence.get(table.name)
        if value is None:
            conn.execute(sql("DELETE FROM sqlite_sequence WHERE name = :n"), {"n": table.name})
        else:
            conn.execute(
                sql("UPDATE sqlite_sequence SET seq = :v WHERE name = :n"),
                {"v": value, "n": table.name},
            )


class Committer:
    """Runs the strategy's work on the database at ``url`` (begin, restore), on a connection
    kept between tests: a new connection per test cost as much as the restore itself (MySQL's
    dialect reads the server's settings on each new engine). Through the URL's sync twin; a
    suite with only an async driver gets a connection of its own each time."""

    def __init__(self, url: URL) -> None:
        from sqlalchemy import create_engine

        from pytest_alchemy import dialects
        from pytest_alchemy.routing import OWN_ENGINES

        self.url = url
        self._engine: Engine | None = None
        sync, options = dialects.engine_options(dialects.sync_twin(url))
        if dialects.is_async(sync):
            return
        try:
            self._engine = create_engine(sync, **options)
        except Exception:  # the sync driver is not installed
            return
        OWN_ENGINES.add(self._engine)

    def run(self, fn: Callable[[Connection], T], *, autocommit: bool) -> T:
        if self._engine is None:
            return databases.run_with_connection(self.url, fn, autocommit=autocommit)
        with self._engine.connect() as conn:
            if autocommit:
                conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            result = fn(conn)
            if not autocommit:
                conn.commit()
            return result

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()


def restore_at(
    committer: Committer,
    snapshot: Snapshot,
    step: Callable[[Connection, Snapshot], list[str]] = restore,
) -> None:
    """:func:`restore` the database (or :func:`pop_layer`), then (MySQL) its counters.
    Raises :class:`SchemaChanged` when the schema is not the snapshot's."""
    restored = committer.run(lambda conn: step(conn, snapshot), autocommit=False)
    after = reset_after(snapshot, restored)
    if after:

        def reset(conn: Connection) -> None:
            for statement in after:
                conn.exec_driver_sql(statement)

        committer.run(reset, autocommit=True)
