"""What a database holds: every user object, of any kind, in any schema.

"Empty" must mean empty: a database with no table in its default schema may still hold other
schemas, views, sequences, functions, types, extensions, triggers or events. The plugin adopts
an existing database only when this inventory finds nothing at all, and records what it then
created there, so that it later removes exactly that and nothing else.

An object is a ``(kind, schema, name, arguments)`` tuple; ``schema`` is None where the backend
has none per database, ``arguments`` only for PostgreSQL routines (their identity).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from sqlalchemy import text as sql

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

Object = tuple[str, "str | None", str, "str | None"]

# Objects of extensions are the extension's, and a serial or identity column's sequence is its
# table's (each dropped with its owner); system schemas are not counted.
_PG_USER_SCHEMA = "left(n.nspname, 3) <> 'pg_' AND n.nspname <> 'information_schema'"
_PG_NOT_EXTENSION = (
    "NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = {catalog}::regclass "
    "AND d.objid = {oid} AND d.deptype = 'e')"
)
_PG_INVENTORY = f"""
SELECT 'schema', NULL, n.nspname, NULL FROM pg_namespace n
 WHERE {_PG_USER_SCHEMA} AND n.nspname <> 'public'
   AND {_PG_NOT_EXTENSION.format(catalog="'pg_namespace'", oid="n.oid")}
UNION ALL
SELECT CASE c.relkind WHEN 'v' THEN 'view' WHEN 'm' THEN 'materialized view'
         WHEN 'S' THEN 'sequence' WHEN 'f' THEN 'foreign table' WHEN 'c' THEN 'type'
         ELSE 'table' END,
       n.nspname, c.relname, NULL
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f', 'c') AND {_PG_USER_SCHEMA}
   AND {_PG_NOT_EXTENSION.format(catalog="'pg_class'", oid="c.oid")}
   AND NOT (c.relkind = 'S' AND EXISTS (SELECT 1 FROM pg_depend d
        WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype IN ('a', 'i')))
UNION ALL
SELECT 'routine', n.nspname, p.proname, pg_get_function_identity_arguments(p.oid)
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE {_PG_USER_SCHEMA} AND {_PG_NOT_EXTENSION.format(catalog="'pg_proc'", oid="p.oid")}
UNION ALL
SELECT CASE t.typtype WHEN 'd' THEN 'domain' ELSE 'type' END, n.nspname, t.typname, NULL
  FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
 WHERE t.typrelid = 0 AND t.typcategory <> 'A' AND t.typtype IN ('b', 'd', 'e', 'r')
   AND {_PG_USER_SCHEMA} AND {_PG_NOT_EXTENSION.format(catalog="'pg_type'", oid="t.oid")}
UNION ALL
SELECT 'extension', NULL, e.extname, NULL FROM pg_extension e WHERE e.extname <> 'plpgsql'
"""
_MYSQL_INVENTORY = """
SELECT CASE TABLE_TYPE WHEN 'VIEW' THEN 'view' WHEN 'SEQUENCE' THEN 'sequence'
         ELSE 'table' END, NULL, TABLE_NAME, NULL
  FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE()
UNION ALL
SELECT LOWER(ROUTINE_TYPE), NULL, ROUTINE_NAME, NULL
  FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = DATABASE()
UNION ALL
SELECT 'trigger', NULL, TRIGGER_NAME, NULL
  FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = DATABASE()
UNION ALL
SELECT 'event', NULL, EVENT_NAME, NULL
  FROM information_schema.EVENTS WHERE EVENT_SCHEMA = DATABASE()
"""
_SQLITE_INVENTORY = (
    "SELECT type, NULL, name, NULL FROM sqlite_master "
    "WHERE type IN ('table', 'view', 'trigger') AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'"
)


def _family(connection: Connection) -> str:
    name = connection.dialect.name
    return "mysql" if name == "mariadb" else name


def objects(connection: Connection, *, skip: str | None = None) -> list[Object]:
    """Every user object in the connection's database (``skip``: a table name to leave out)."""
    query = {"postgresql": _PG_INVENTORY, "mysql": _MYSQL_INVENTORY}.get(
        _family(connection), _SQLITE_INVENTORY
    )
    found: list[Object] = [
        (str(kind), schema, str(name), arguments)
        for kind, schema, name, arguments in connection.execute(sql(query)).all()
    ]
    return sorted(o for o in found if not (o[0] == "table" and o[2] == skip))


def describe(found: list[Object], limit: int = 5) -> str:
    """A short list for a message: "table other.users, view report, ..."."""
    shown = [f"{kind} {schema + '.' if schema else ''}{name}" for kind, schema, name, _ in found]
    return ", ".join(shown[:limit]) + (", ..." if len(shown) > limit else "")


def dumps(found: list[Object]) -> str:
    return json.dumps([list(o) for o in found])


def loads(recorded: str | None) -> list[Object]:
    if not recorded:
        return []
    return [(str(k), s, str(n), a) for k, s, n, a in json.loads(recorded)]


# Dropped in this order, so nothing is still needed by what comes later.
_ORDER = (
    "view",
    "materialized view",
    "trigger",
    "event",
    "foreign table",
    "table",
    "sequence",
    "routine",
    "procedure",
    "function",
    "domain",
    "type",
    "schema",
    "extension",
)


def drop(connection: Connection, recorded: list[Object]) -> None:
    """Drop the recorded objects that still exist, and nothing else."""
    quote = connection.dialect.identifier_preparer.quote_identifier
    family = _family(connection)
    present = set(objects(connection))
    doomed = sorted((o for o in recorded if o in present), key=lambda o: _ORDER.index(o[0]))

    def name(o: Object) -> str:
        qualified = f"{quote(o[1])}.{quote(o[2])}" if o[1] else quote(o[2])
        return f"{qualified}({o[3]})" if o[3] is not None else qualified

    def statement(o: Object) -> str:
        kind = {"routine": "ROUTINE"}.get(o[0], o[0].upper())
        return f"DROP {kind} IF EXISTS {name(o)}"

    # Tables all at once, so foreign keys between them need no order (SQLite takes one at a
    # time, and enforces no foreign key on DROP unless asked to). SQLite's indexes and
    # triggers go with their tables.
    tables = [name(o) for o in doomed if o[0] == "table"]
    batches = [[t] for t in tables] if family == "sqlite" else [tables] if tables else []
    first = _ORDER.index("table")
    statements = [
        *(statement(o) for o in doomed if _ORDER.index(o[0]) < first),
        *(f"DROP TABLE IF EXISTS {', '.join(batch)}" for batch in batches),
        *(statement(o) for o in doomed if _ORDER.index(o[0]) > first),
    ]
    if family == "mysql":
        connection.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 0")
    try:
        for each in statements:
            connection.exec_driver_sql(each)
    finally:
        if family == "mysql":
            connection.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 1")
