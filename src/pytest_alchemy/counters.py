"""Id counters that a rollback does not undo, and how to put them back.

PostgreSQL sequences and MySQL/MariaDB AUTO_INCREMENT counters keep what a rolled-back
transaction took from them, so a test asserting a literal id (``/members/1``) passes alone and
fails after another test inserted. With ``alchemy_reset_sequences`` (or the marker option
``reset_sequences``) the counters of the tables a test inserted into are set back, after the
test, to the values they had when the database was first used in the run: the template's.
SQLite needs nothing: its counters live in the transaction.

Cost: one query per database per run to read the counters; then, per test that inserted, one
statement on PostgreSQL (every ``setval`` in one ``SELECT``) and one ``ALTER TABLE`` per table
inserted into on MySQL/MariaDB (where it commits implicitly, so it runs after the rollback).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

_PG_SEQUENCES = """
SELECT c.oid::regclass::text, s.seqstart, pg_catalog.pg_sequence_last_value(c.oid),
       lower(t.relname)
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_sequence s ON s.seqrelid = c.oid
LEFT JOIN pg_catalog.pg_depend d ON d.objid = c.oid AND d.deptype IN ('a', 'i')
    AND d.classid = 'pg_catalog.pg_class'::regclass
    AND d.refclassid = 'pg_catalog.pg_class'::regclass
LEFT JOIN pg_catalog.pg_depend ad ON ad.refobjid = c.oid
    AND ad.classid = 'pg_catalog.pg_attrdef'::regclass
LEFT JOIN pg_catalog.pg_attrdef a ON a.oid = ad.objid
LEFT JOIN pg_catalog.pg_class t ON t.oid = coalesce(d.refobjid, a.adrelid)
WHERE c.relkind = 'S'
  AND c.relnamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
"""

_MYSQL_COUNTERS = """
SELECT TABLE_NAME, AUTO_INCREMENT FROM information_schema.TABLES
WHERE TABLE_SCHEMA = DATABASE() AND AUTO_INCREMENT IS NOT NULL
"""


class Counters:
    """The counters of one database as first seen in the run, by table."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        #: PostgreSQL: sequence -> the setval() arguments that restore it.
        self.sequences: dict[str, tuple[int, bool]] = {}
        #: PostgreSQL: table (lower-cased) -> its sequences.
        self.tables: dict[str, list[str]] = {}
        #: MySQL/MariaDB: table (lower-cased) -> (its name as written, its AUTO_INCREMENT).
        self.auto_increment: dict[str, tuple[str, int]] = {}

    @classmethod
    def read(cls, connection: Connection) -> Counters:
        """Read the counters now (one query), inside whatever transaction is open."""
        counters = cls(connection.dialect.name)
        if counters.backend == "postgresql":
            for sequence, start, last, table in connection.exec_driver_sql(_PG_SEQUENCES):
                # Never used: back to its start, not yet called; else to where it was.
                counters.sequences[sequence] = (start, False) if last is None else (last, True)
                if table is not None:
                    counters.tables.setdefault(table, []).append(sequence)
        elif counters.backend in {"mysql", "mariadb"}:
            for table, value in connection.exec_driver_sql(_MYSQL_COUNTERS):
                counters.auto_increment[str(table).lower()] = (str(table), int(value))
        return counters

    @property
    def resets_inside(self) -> bool:
        """Whether the reset can run inside the outer transaction (setval is not undone by
        a rollback; MySQL's ALTER TABLE would commit it)."""
        return self.backend == "postgresql"

    def reset_statements(self, tables: set[str] | None) -> list[str]:
        """What puts back the counters of ``tables`` (None: of every table)."""
        if self.backend == "postgresql":
            if tables is None:
                sequences = list(self.sequences)
            else:
                sequences = sorted({s for t in tables for s in self.tables.get(t, ())})
            calls = []
            for sequence in sequences:
                value, called = self.sequences[sequence]
                quoted = sequence.replace("'", "''")
                calls.append(f"setval('{quoted}'::regclass, {int(value)}, {str(called).lower()})")
            return [f"SELECT {', '.join(calls)}"] if calls else []
        found = self.auto_increment
        names = sorted(found) if tables is None else sorted(t for t in tables if t in found)
        return [
            f"ALTER TABLE `{found[t][0].replace('`', '``')}` AUTO_INCREMENT = {found[t][1]}"
            for t in names
        ]
