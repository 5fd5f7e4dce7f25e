"""Per-backend quirks, checked directly against the drivers."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from sqlalchemy import create_engine, insert, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from pytest_alchemy import dialects
from pytest_alchemy.sandbox import JOIN_MODE

if TYPE_CHECKING:
    from pathlib import Path


def _rows_left_after_a_sandboxed_commit(path: Path, *, fixed: bool) -> int:
    from sqlalchemy import Column, Integer, MetaData, Table

    engine = create_engine(f"sqlite:///{path}")
    if fixed:
        dialects.prepare_engine(engine)
    table = Table("t", MetaData(), Column("id", Integer, primary_key=True))
    table.metadata.create_all(engine)
    with engine.connect() as conn:
        outer = conn.begin()
        session = Session(bind=conn, join_transaction_mode=JOIN_MODE)
        session.execute(insert(table).values(id=1))
        session.commit()  # releases the savepoint; the outer transaction must still hold it
        session.close()
        outer.rollback()
    with engine.connect() as conn:
        left = len(conn.execute(select(table)).all())
    engine.dispose()
    return left


def test_pysqlite_leaks_a_released_savepoint_unless_the_plugin_takes_over_begin(
    tmp_path: Path,
) -> None:
    assert _rows_left_after_a_sandboxed_commit(tmp_path / "plain.db", fixed=False) == 1
    assert _rows_left_after_a_sandboxed_commit(tmp_path / "fixed.db", fixed=True) == 0


@pytest.mark.parametrize(
    ("sync", "asynchronous"),
    [
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg_async://u@h/db"),
        ("postgresql://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("postgresql+psycopg2://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("sqlite:///x.db", "sqlite+aiosqlite:///x.db"),
        ("mysql+pymysql://u@h/db", "mysql+asyncmy://u@h/db"),
        ("mariadb+pymysql://u@h/db", "mariadb+asyncmy://u@h/db"),
    ],
)
def test_async_url_derivation(sync: str, asynchronous: str) -> None:
    assert dialects.async_twin(make_url(sync)).render_as_string() == asynchronous
    assert dialects.is_async(make_url(asynchronous))
    assert not dialects.is_async(make_url(sync))


@pytest.mark.parametrize(
    ("asynchronous", "sync"),
    [
        ("postgresql+asyncpg://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql+psycopg_async://u@h/db", "postgresql+psycopg://u@h/db"),
        ("sqlite+aiosqlite:///x.db", "sqlite+pysqlite:///x.db"),
        ("mysql+aiomysql://u@h/db", "mysql+pymysql://u@h/db"),
    ],
)
def test_sync_url_derivation(asynchronous: str, sync: str) -> None:
    assert dialects.sync_twin(make_url(asynchronous)).render_as_string() == sync


@pytest.mark.parametrize(
    ("dialect", "statement", "refused"),
    [
        ("postgresql", "COMMIT", True),
        ("postgresql", "  commit work", True),
        ("postgresql", "END", True),
        ("postgresql", "ROLLBACK", True),
        ("postgresql", "ROLLBACK TO SAVEPOINT sa_savepoint_1", False),
        ("postgresql", "RELEASE SAVEPOINT sa_savepoint_1", False),
        ("postgresql", "CREATE TABLE t (id int)", False),
        ("postgresql", "SELECT 'COMMIT'", False),
        ("mysql", "CREATE TABLE t (id int)", True),
        ("mysql", "CREATE TEMPORARY TABLE t (id int)", False),
        ("mysql", "DROP TEMPORARY TABLE t", False),
        ("mysql", "TRUNCATE t", True),
        ("mysql", "SET autocommit=1", True),
        ("mariadb", "ALTER TABLE t ADD c int", True),
        ("mysql", "INSERT INTO created (x) VALUES (1)", False),
        ("sqlite", "BEGIN", True),
    ],
)
def test_statement_guard(dialect: str, statement: str, refused: bool) -> None:
    assert bool(dialects.statement_guard(dialect).match(statement)) is refused
