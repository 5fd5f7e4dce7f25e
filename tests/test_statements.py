"""Which statements the sandbox may treat as reads: only those whose text proves it."""

from __future__ import annotations

import pytest

from pytest_alchemy.statements import proves_read_only

READS = [
    "SELECT users.id, users.name FROM users WHERE users.id = %(pk_1)s",
    "SELECT count(*) AS count_1 FROM (SELECT users.id FROM users) AS anon_1",
    "WITH x AS (SELECT 1) SELECT * FROM x",
    "SELECT * FROM t WHERE id = ANY (%(a)s) AND EXISTS (SELECT 1)",
    "SELECT row_number() OVER (PARTITION BY a ORDER BY b) FROM t",
    "SELECT CAST(x AS VARCHAR(20)), x::numeric(10,2) FROM t",
    "SELECT pg_catalog.pg_table_is_visible(c.oid), pg_catalog.format_type(a.atttypid, "
    "a.atttypmod) FROM pg_catalog.pg_class c",
    "SELECT 'it''s -- (not) f(' AS x",
    "SELECT $q$ f( $q$",
    "/* a comment */ SELECT 1",
    "SELECT @@in_transaction",
    "SHOW TABLES",
    "EXPLAIN SELECT 1",
    "PRAGMA user_version",
    'PRAGMA main.table_info("t")',
]

WRITES = [
    "SELECT create_user('a')",  # a function: it may insert
    "select public.f(1)",
    'SELECT "f"(1)',
    "SELECT `f`(1)",
    "-- a comment\nSELECT f(1)",
    "WITH x AS (INSERT INTO t (a) VALUES (1) RETURNING id) SELECT * FROM x",
    "SELECT setval('s', 1)",
    "select nextval('s')",
    "SELECT pg_advisory_xact_lock(1)",
    "SELECT pg_catalog.set_config('a', 'b', true)",
    "SELECT * INTO new_t FROM t",
    "SELECT * FROM t FOR UPDATE",
    "SELECT * FROM t FOR NO KEY UPDATE SKIP LOCKED",
    "SELECT * FROM t LOCK IN SHARE MODE",
    "SELECT 1; DELETE FROM t",
    "SELECT 'a\\'b', f(1)",  # a string the text alone cannot delimit
    "CALL p()",
    "DO $$ BEGIN END $$",
    "COPY t FROM STDIN",
    "NOTIFY c",
    "EXPLAIN ANALYZE INSERT INTO t VALUES (1)",
    "EXPLAIN (ANALYZE, BUFFERS) DELETE FROM t",
    "PRAGMA user_version = 7",
    "PRAGMA user_version(7)",
    "INSERT INTO t VALUES (1)",
    "",
]


@pytest.mark.parametrize("statement", READS)
def test_proven_reads(statement: str) -> None:
    assert proves_read_only(statement)


@pytest.mark.parametrize("statement", WRITES)
def test_anything_else_is_a_write(statement: str) -> None:
    assert not proves_read_only(statement)
