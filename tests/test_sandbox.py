"""The sync sandbox's semantics, run through the plugin on every sync driver."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from conftest import collected_ids
from sqlalchemy import text

if TYPE_CHECKING:
    from conftest import Project
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Session

# Every test starts by asserting the table is empty, and runs twice: a leak from any test
# (or from the first round of the same test) fails the next one.
SEMANTICS = """
import pytest
from sqlalchemy import insert, select, text
from sqlalchemy.exc import IntegrityError

from models import Item

ROUNDS = pytest.mark.parametrize("round", [1, 2])


def names(session):
    return sorted(session.scalars(select(Item.name)))


@pytest.fixture(autouse=True)
def starts_empty(db_session):
    assert names(db_session) == []


@pytest.fixture
def seeded(db_session):
    db_session.add(Item(name="seed"))
    db_session.commit()


@ROUNDS
def test_commit_once_and_twice(db_session, round):
    db_session.add(Item(name="a"))
    db_session.commit()
    db_session.add(Item(name="b"))
    db_session.commit()
    assert names(db_session) == ["a", "b"]


@ROUNDS
def test_rollback_keeps_what_was_committed(db_session, round):
    db_session.add(Item(name="a"))
    db_session.commit()
    db_session.add(Item(name="b"))
    db_session.flush()
    db_session.rollback()
    assert names(db_session) == ["a"]


@ROUNDS
def test_rollback_keeps_what_a_fixture_committed(seeded, db_session, round):
    db_session.add(Item(name="a"))
    db_session.flush()
    db_session.rollback()
    assert names(db_session) == ["seed"]


@ROUNDS
def test_with_begin_on_fresh_session_and_after_commit(db_sessionmaker, round):
    session = db_sessionmaker()
    with session.begin():
        session.add(Item(name="a"))
    with session.begin():
        session.add(Item(name="b"))
    assert names(session) == ["a", "b"]
    session.close()


@ROUNDS
def test_begin_nested_rolled_back(db_session, round):
    db_session.add(Item(name="a"))
    nested = db_session.begin_nested()
    db_session.add(Item(name="b"))
    db_session.flush()
    nested.rollback()
    db_session.commit()
    assert names(db_session) == ["a"]


@ROUNDS
def test_begin_nested_committed(db_session, round):
    with db_session.begin_nested():
        db_session.add(Item(name="a"))
    db_session.commit()
    assert names(db_session) == ["a"]


@ROUNDS
def test_integrity_error_then_rollback_then_carry_on(db_session, round):
    db_session.add(Item(name="a"))
    db_session.commit()
    db_session.add(Item(name="a"))
    with pytest.raises(IntegrityError):
        db_session.commit()
    db_session.rollback()
    db_session.add(Item(name="c"))
    db_session.commit()
    assert names(db_session) == ["a", "c"]


@ROUNDS
def test_integrity_error_inside_begin_nested(db_session, round):
    db_session.add(Item(name="a"))
    db_session.commit()
    with pytest.raises(IntegrityError):
        with db_session.begin_nested():
            db_session.add(Item(name="a"))
    db_session.add(Item(name="c"))
    db_session.commit()
    assert names(db_session) == ["a", "c"]


@ROUNDS
def test_close_then_reuse(db_session, round):
    db_session.add(Item(name="a"))
    db_session.commit()
    db_session.close()
    assert names(db_session) == ["a"]
    db_session.add(Item(name="b"))
    db_session.commit()
    assert names(db_session) == ["a", "b"]


@ROUNDS
def test_second_session_shares_the_connection(db_session, db_sessionmaker, round):
    db_session.add(Item(name="a"))
    db_session.commit()
    other = db_sessionmaker()
    assert names(other) == ["a"]
    other.add(Item(name="b"))
    other.commit()
    other.close()
    assert names(db_session) == ["a", "b"]


@ROUNDS
def test_sessionmaker_settings_do_not_outlive_the_test(db_sessionmaker, round):
    assert db_sessionmaker.kw.get("expire_on_commit", True) is True
    db_sessionmaker.configure(expire_on_commit=False)
    assert db_sessionmaker().expire_on_commit is False


@ROUNDS
def test_core_work_on_the_connection(db_connection, db_session, round):
    with db_connection.begin_nested():
        db_connection.execute(insert(Item).values(name="core"))
    assert names(db_session) == ["core"]


@ROUNDS
def test_the_first_writes_rolled_back(db_session, round):
    # The test's first savepoint is never sent: rolling back to it rolls the driver back.
    db_session.add(Item(name="a"))
    db_session.flush()
    db_session.rollback()
    assert names(db_session) == []
    db_session.add(Item(name="b"))
    db_session.flush()
    db_session.rollback()
    db_session.add(Item(name="c"))
    db_session.commit()
    db_session.add(Item(name="d"))
    db_session.flush()
    db_session.rollback()
    assert names(db_session) == ["c"]


@ROUNDS
def test_integrity_error_on_the_first_write(db_session, round):
    db_session.add_all([Item(name="a"), Item(name="a")])
    with pytest.raises(IntegrityError):
        db_session.flush()
    db_session.rollback()
    assert names(db_session) == []
    db_session.add(Item(name="c"))
    db_session.commit()
    assert names(db_session) == ["c"]
"""


def test_sync_semantics_hold_in_any_order(sync_project: Project) -> None:
    sync_project.ini()
    sync_project.tests(SEMANTICS)
    result = sync_project.run()
    result.assert_outcomes(passed=28)
    again = sync_project.run(*reversed(collected_ids(sync_project)))
    again.assert_outcomes(passed=28)
    assert sync_project.leftover_tables() == []


BREAKERS = """
import pytest
from sqlalchemy import select, text

from models import Item
from pytest_alchemy import SandboxBrokenError


@pytest.fixture(autouse=True)
def starts_empty(db_session):
    assert db_session.scalars(select(Item.name)).all() == []


def test_connection_commit_is_refused(db_connection, db_session):
    db_session.add(Item(name="leak"))
    db_session.flush()
    with pytest.raises(SandboxBrokenError, match="Connection.commit"):
        db_connection.commit()


def test_raw_commit_is_refused_even_when_swallowed(db_session):
    db_session.add(Item(name="leak"))
    db_session.flush()
    try:
        db_session.execute(text("COMMIT"))
    except Exception:
        pass  # application code that hides the error must still fail the test


def test_outer_rollback_fails_at_teardown(db_connection, db_session):
    db_session.add(Item(name="x"))
    db_session.commit()
    db_connection.rollback()


def test_next_test_starts_clean(db_session):
    db_session.add(Item(name="leak"))
    db_session.commit()
"""


def test_breaking_the_sandbox_fails_that_test_and_leaks_nothing(sync_project: Project) -> None:
    sync_project.ini()
    sync_project.tests(BREAKERS)
    result = sync_project.run()
    result.assert_outcomes(passed=4, errors=3)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_connection_commit_is_refused*",
            "*SandboxBrokenError: pytest-alchemy refused Connection.commit()*",
            "*ERROR at teardown of test_raw_commit_is_refused_even_when_swallowed*",
            "*SandboxBrokenError: pytest-alchemy refused to run 'COMMIT'*",
            "*ERROR at teardown of test_outer_rollback_fails_at_teardown*",
            "*rolled back the sandbox's outer transaction*",
        ]
    )
    assert sync_project.leftover_tables() == []


DDL = """
from sqlalchemy import inspect, select, text

from models import Item


def test_create_table_in_a_test(db_session):
    db_session.add(Item(name="x"))
    db_session.execute(text("CREATE TABLE alchemy_scratch (id INTEGER)"))
    db_session.commit()


def test_the_table_and_the_row_are_gone(db_session):
    assert not inspect(db_session.connection()).has_table("alchemy_scratch")
    assert db_session.scalars(select(Item.name)).all() == []
"""

MYSQL_DDL = """
import pytest
from sqlalchemy import select, text

from models import Item
from pytest_alchemy import SandboxBrokenError


@pytest.mark.parametrize("statement", [
    "CREATE TABLE alchemy_scratch (id INTEGER)",
    "TRUNCATE TABLE alchemy_item",
    "ALTER TABLE alchemy_item ADD COLUMN extra INTEGER",
])
def test_implicit_commit_is_refused(db_session, statement):
    db_session.add(Item(name="x"))
    db_session.flush()
    with pytest.raises(SandboxBrokenError, match="commit implicitly"):
        db_session.execute(text(statement))


def test_temporary_tables_are_fine(db_session):
    db_session.execute(text("CREATE TEMPORARY TABLE alchemy_tmp (id INTEGER)"))
    db_session.execute(text("INSERT INTO alchemy_tmp VALUES (1)"))
    db_session.add(Item(name="x"))
    db_session.commit()
    assert db_session.scalar(text("SELECT COUNT(*) FROM alchemy_tmp")) == 1
    db_session.execute(text("DROP TEMPORARY TABLE alchemy_tmp"))


def test_nothing_leaked(db_session):
    assert db_session.scalars(select(Item.name)).all() == []


def test_session_settings_change(db_session):
    db_session.execute(text("SET SESSION sql_mode = 'ANSI_QUOTES'"))
    db_session.execute(text("SET @alchemy_marker = 5"))


def test_session_settings_do_not_reach_the_next_test(db_session):
    assert "ANSI_QUOTES" not in db_session.scalar(text("SELECT @@SESSION.sql_mode"))
    assert db_session.scalar(text("SELECT @alchemy_marker")) is None
"""


def test_ddl_in_a_test_is_rolled_back_or_refused(sync_project: Project) -> None:
    sync_project.ini()
    if sync_project.url and sync_project.url.startswith("mysql"):
        sync_project.tests(MYSQL_DDL)
        result = sync_project.run()
        result.assert_outcomes(passed=7, errors=3)
        result.stdout.fnmatch_lines(["*MySQL and MariaDB commit implicitly on DDL*"])
    else:
        sync_project.tests(DDL)
        sync_project.run().assert_outcomes(passed=2)
    assert sync_project.leftover_tables() == []


def test_a_read_only_commit_keeps_its_savepoint_for_the_next_transaction(
    db_session: Session, db_connection: Connection
) -> None:
    from sqlalchemy import event, select

    sent: list[str] = []

    def record(conn: Connection, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(statement)

    event.listen(db_connection, "before_cursor_execute", record)
    try:
        for _ in range(3):
            db_session.execute(select(1))
            db_session.commit()
        db_session.execute(text("CREATE TEMPORARY TABLE alchemy_scratch (n INTEGER)"))
        db_session.commit()  # wrote something: released for real
        db_session.execute(select(1))
    finally:
        event.remove(db_connection, "before_cursor_execute", record)
    savepoints = [s for s in sent if "SAVEPOINT" in s]
    assert savepoints == [
        "SAVEPOINT sa_savepoint_1",
        "RELEASE SAVEPOINT sa_savepoint_1",
        "SAVEPOINT sa_savepoint_1",
    ]
