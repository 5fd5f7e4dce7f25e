"""The commit strategy: ``@pytest.mark.alchemy(strategy="commit")`` tests commit for real,
others (connections, processes) see it, and the next test finds the database as provisioned:
the tables written are restored, the id counters set back, a changed schema rebuilt."""

from __future__ import annotations

import pytest
from conftest import (
    ASYNC_BACKENDS,
    SYNC_BACKENDS,
    Driver,
    Project,
    project_for,
    subset,
)

SEEDS = """
from sqlalchemy import insert
from models import Item, Tag


def seed(conn):
    conn.execute(insert(Item).values(name="seed"))
    conn.execute(insert(Tag).values(item_id=1))
"""

#: What every test of the strategy finds: the seed rows, the id counters where they were.
SEED_ONLY = """
def seed_only(conn, sql):
    assert conn.execute(sql("SELECT name FROM alchemy_item")).scalars().all() == ["seed"]
    assert conn.execute(sql("SELECT id, item_id FROM alchemy_tag")).all() == [(1, 1)]
"""

SYNC_TESTS = (
    SEED_ONLY
    + """
import subprocess
import sys

import pytest
from sqlalchemy import create_engine, delete, func, insert, select, text, update
from sqlalchemy.pool import NullPool

from models import Item, Tag

commit = pytest.mark.alchemy(strategy="commit")


def other_connection(engine):
    return create_engine(engine.url, poolclass=NullPool).connect()


@commit
def test_engine_only_first(db_engine):
    # The first test of the run: its database is built during its set-up.
    with db_engine.begin() as conn:
        conn.execute(insert(Item).values(name="engine"))
        conn.execute(update(Item).where(Item.name == "seed").values(name="renamed"))
    url = db_engine.url.render_as_string(hide_password=False)
    code = (
        "from sqlalchemy import create_engine, text\\n"
        f"with create_engine({url!r}).begin() as c:\\n"
        "    c.execute(text(\\"INSERT INTO alchemy_item (name) VALUES ('subprocess')\\"))\\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    with other_connection(db_engine) as conn:
        assert conn.execute(select(func.count()).select_from(Item)).scalar() == 3


def test_sandboxed(db_session):
    seed_only(db_session.connection(), text)


@commit
def test_session_commits_are_seen_by_others(db_session, db_engine):
    seed_only(db_session.connection(), text)
    db_session.rollback()
    item = Item(name="a")
    db_session.add(item)
    db_session.flush()
    assert item.id == 2  # the counter where the seed left it
    db_session.add(Tag(item_id=item.id))
    db_session.execute(delete(Tag).where(Tag.id == 1))
    db_session.commit()
    with other_connection(db_engine) as conn:
        assert conn.execute(select(Item.name).order_by(Item.id)).scalars().all() == ["seed", "a"]


@commit
def test_finds_the_seed_only(db_connection):
    seed_only(db_connection, text)
    db_connection.execute(insert(Item).values(name="b"))
    db_connection.commit()
    assert db_connection.execute(select(Item.id).where(Item.name == "b")).scalar() == 2
"""
)

ASYNC_TESTS = (
    SEED_ONLY
    + """
import pytest
from sqlalchemy import delete, func, insert, select, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from models import Item, Tag

pytestmark = pytest.mark.asyncio


@pytest.mark.alchemy(strategy="commit")
async def test_session_commits_are_seen_by_others(async_db_session, async_db_engine):
    item = Item(name="a")
    async_db_session.add(item)
    await async_db_session.flush()
    assert item.id == 2
    async_db_session.add(Tag(item_id=item.id))
    await async_db_session.execute(delete(Tag).where(Tag.id == 1))
    await async_db_session.commit()
    other = create_async_engine(async_db_engine.url, poolclass=NullPool)
    async with other.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(Item))).scalar() == 2
    await other.dispose()


async def test_sandboxed(async_db_connection):
    await async_db_connection.run_sync(seed_only, text)


@pytest.mark.alchemy(strategy="commit")
async def test_finds_the_seed_only(async_db_connection):
    await async_db_connection.run_sync(seed_only, text)
    await async_db_connection.execute(insert(Item).values(name="b"))
    await async_db_connection.commit()
    found = await async_db_connection.execute(select(Item.id).where(Item.name == "b"))
    assert found.scalar() == 2
"""
)


def _project(driver: Driver, scratch: dict[str, str], pytester: pytest.Pytester) -> Project:
    """A project with the seed rows of SEEDS."""
    project = project_for(driver, scratch, pytester)
    pytester.makepyfile(seeds=SEEDS)
    project.ini("alchemy_seed = seeds:seed\n")
    return project


def routed_project(driver: Driver, scratch: dict[str, str], pytester: pytest.Pytester) -> Project:
    """A project with the seed rows of SEEDS and an application module ``app`` whose engine
    (on the project's own URL) and sessionmaker are in alchemy_engines."""
    project = project_for(driver, scratch, pytester)
    pytester.makepyfile(
        seeds=SEEDS,
        app=f"""
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker
engine = create_engine({project.url!r})
Session = sessionmaker(engine)
""",
    )
    project.ini("alchemy_seed = seeds:seed\nalchemy_engines = app:engine\n")
    return project


@pytest.mark.parametrize("driver", SYNC_BACKENDS, ids=lambda d: d.id)
def test_commits_are_real_and_the_next_test_finds_the_database_as_provisioned(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    """Inserts, updates and deletes through db_engine, db_session, db_connection and another
    process are committed for real (another connection sees them), then undone: rows, and id
    counters. The commit tests run after the sandboxed one."""
    project = _project(driver, scratch_databases, pytester)
    project.tests(SYNC_TESTS)
    result = project.run("-v")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(
        [
            "*::test_sandboxed PASSED*",
            "*::test_engine_only_first PASSED*",
            "*::test_session_commits_are_seen_by_others PASSED*",
            "*::test_finds_the_seed_only PASSED*",
        ]
    )
    assert project.leftover_tables() == []


@pytest.mark.parametrize("driver", ASYNC_BACKENDS, ids=lambda d: d.id)
def test_async_commits_are_real_and_undone(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = _project(driver, scratch_databases, pytester)
    project.tests(ASYNC_TESTS)
    result = project.run("-v")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(
        [
            "*::test_sandboxed PASSED*",
            "*::test_session_commits_are_seen_by_others PASSED*",
            "*::test_finds_the_seed_only PASSED*",
        ]
    )


ROUTED = """
from sqlalchemy import select, text
from models import Item
import app

import pytest

pytestmark = pytest.mark.alchemy(strategy="commit")


def test_app_commits():
    with app.Session() as session:
        session.add(Item(name="from the app"))
        session.commit()
    with app.engine.connect() as conn:  # a connection of its own: committed for real
        assert conn.execute(text("SELECT count(*) FROM alchemy_item")).scalar() == 2


def test_then_finds_the_seed_only():
    with app.Session() as session:
        assert session.scalars(select(Item.name)).all() == ["seed"]
"""


@pytest.mark.parametrize("driver", SYNC_BACKENDS, ids=lambda d: d.id)
def test_the_applications_engines_commit_to_the_test_database(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    """An engine of alchemy_engines, made on the application's own URL, reaches the test
    database with real commits in a commit test: never the database its URL names."""
    project = routed_project(driver, scratch_databases, pytester)
    project.tests(ROUTED)
    project.run().assert_outcomes(passed=2)
    if driver.backend != "sqlite":
        assert "alchemy_item" not in project.base_tables()
    else:
        assert not (pytester.path / "test.sqlite3").exists()


SCHEMA_CHANGE = (
    SEED_ONLY
    + """
import pytest
from sqlalchemy import text

commit = pytest.mark.alchemy(strategy="commit")


@commit
def test_changes_the_schema(db_connection):
    db_connection.execute(text("CREATE TABLE made_here (id INTEGER PRIMARY KEY)"))
    db_connection.execute(text("ALTER TABLE alchemy_item ADD COLUMN extra INTEGER"))
    db_connection.execute(text("INSERT INTO alchemy_item (name) VALUES ('more')"))
    db_connection.commit()


@pytest.fixture
def fresh_tables(db_engine):
    from models import Base

    Base.metadata.drop_all(db_engine)  # their note triggers go with them
    Base.metadata.create_all(db_engine)


@commit
def test_builds_the_tables_anew_in_a_fixture(fresh_tables, db_connection):
    db_connection.execute(text("INSERT INTO alchemy_item (name) VALUES ('unnoted')"))
    db_connection.commit()


@commit
def test_finds_the_schema_as_built(db_connection):
    from sqlalchemy import inspect

    tables = set(inspect(db_connection).get_table_names())
    assert "made_here" not in tables
    columns = {c["name"] for c in inspect(db_connection).get_columns("alchemy_item")}
    assert columns == {"id", "name"}
    seed_only(db_connection, text)
"""
)


@pytest.mark.parametrize("driver", SYNC_BACKENDS, ids=lambda d: d.id)
def test_a_schema_changed_by_a_commit_test_is_built_again(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    """A table or column created, a column added, or tables dropped and created again (which
    loses their note triggers) by a commit test: the next finds the database as built."""
    project = _project(driver, scratch_databases, pytester)
    project.tests(SCHEMA_CHANGE)
    project.run().assert_outcomes(passed=3)


STUCK = (
    SEED_ONLY
    + """
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

commit = pytest.mark.alchemy(strategy="commit")
LEAKED = []


@commit
def test_leaves_a_transaction_open(db_connection):
    db_connection.execute(text("INSERT INTO alchemy_item (name) VALUES ('committed')"))
    db_connection.commit()
    # A connection the test forgets, in a transaction on a table it wrote: it holds locks.
    other = create_engine(db_connection.engine.url, poolclass=NullPool).connect()
    other.execute(text("UPDATE alchemy_item SET name = 'held' WHERE name = 'committed'"))
    LEAKED.append(other)


@commit
def test_next_finds_the_seed_only(db_connection):
    seed_only(db_connection, text)


def teardown_module():
    for other in LEAKED:  # ended by the restore: let go without a ROLLBACK on a dead link
        other.invalidate()
"""
)


@pytest.mark.parametrize(
    "driver", subset(SYNC_BACKENDS, "postgresql-psycopg", "mysql-pymysql"), ids=lambda d: d.id
)
def test_a_restore_that_fails_fails_its_test_and_not_the_next(
    driver: Driver,
    scratch_databases: dict[str, str],
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A connection left in a transaction on a written table keeps the restore from its
    locks: the restore gives up (after alchemy's lock timeout, 1 s here), the test that left
    it fails at teardown saying so, and the database is made anew for the next."""
    project = _project(driver, scratch_databases, pytester)
    from pytest_alchemy import commits

    monkeypatch.setattr(commits, "LOCK_TIMEOUT", 1)  # the run is in this process
    project.tests(STUCK)
    result = project.run()
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaves_a_transaction_open*",
            "*Restoring * after the test failed: *",
            "*was built again, so no later test sees it*",
        ]
    )


def test_commit_tests_keep_their_place_when_told(pytester: pytest.Pytester) -> None:
    """alchemy_commit_tests_last = false: the collection order stands."""
    project = Project(pytester, None)
    project.ini("alchemy_commit_tests_last = false\n")
    project.tests(
        """
import pytest

@pytest.mark.alchemy(strategy="commit")
def test_first(db_session):
    pass

def test_second(db_session):
    pass
"""
    )
    result = project.run("-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*::test_first PASSED*", "*::test_second PASSED*"])


def test_an_unknown_strategy_is_a_usage_error(pytester: pytest.Pytester) -> None:
    project = Project(pytester, None)
    project.ini()
    project.tests(
        """
import pytest

@pytest.mark.alchemy(strategy="truncate")
def test_x(db_session):
    pass
"""
    )
    result = project.run()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "*@pytest.mark.alchemy on test_app.py::test_x: strategy must be one of "
            "'rollback', 'commit', got 'truncate'."
        ]
    )


def test_a_commit_test_on_sqlite_in_memory_is_refused(pytester: pytest.Pytester) -> None:
    project = Project(pytester, "sqlite+pysqlite://")
    project.ini()
    project.tests(
        """
import pytest

@pytest.mark.alchemy(strategy="commit")
def test_x(db_session):
    pass
"""
    )
    result = project.run()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*other connections cannot see it*Give alchemy_url a file*"])


@pytest.mark.parametrize(
    "driver", subset(SYNC_BACKENDS, "sqlite-pysqlite", "postgresql-psycopg"), ids=lambda d: d.id
)
def test_a_kept_database_a_killed_commit_test_left_is_not_reused(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    """--alchemy-reuse keeps the database; a commit test whose run dies before the restore
    leaves its writes there, and the mark that it ran: the next run builds it again."""
    project = _project(driver, scratch_databases, pytester)
    project.tests(
        SEED_ONLY
        + """
import os
import pytest
from sqlalchemy import text

@pytest.mark.alchemy(strategy="commit")
def test_dies(db_connection):
    db_connection.execute(text("INSERT INTO alchemy_item (name) VALUES ('left')"))
    db_connection.commit()
    if os.environ.get("DIE"):
        os._exit(1)  # killed: no teardown, no restore
"""
    )
    project.tests(
        SEED_ONLY
        + """
from sqlalchemy import text

def test_finds_the_seed_only(db_connection):
    seed_only(db_connection, text)
""",
        name="test_after",
    )
    project.run("--alchemy-reuse", "test_app.py").assert_outcomes(passed=1)  # kept
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("DIE", "1")
    try:
        died = project.run("--alchemy-reuse", "test_app.py", subprocess=True)
    finally:
        monkeypatch.undo()
    assert died.ret != 0
    result = project.run("--alchemy-reuse", "test_after.py")
    result.assert_outcomes(passed=1)
    assert "reusing" not in result.stdout.str()
    project.run("test_after.py").assert_outcomes(passed=1)  # without reuse: dropped at the end


XDIST = (
    SEED_ONLY
    + """
import pytest
from sqlalchemy import text

commit = pytest.mark.alchemy(strategy="commit")


@pytest.mark.parametrize("n", range(6))
@commit
def test_commits(db_connection, n):
    seed_only(db_connection, text)
    db_connection.execute(text(f"INSERT INTO alchemy_item (name) VALUES ('w{n}')"))
    db_connection.commit()


@pytest.mark.parametrize("n", range(4))
def test_sandboxed(db_connection, n):
    seed_only(db_connection, text)
    db_connection.execute(text(f"INSERT INTO alchemy_item (name) VALUES ('s{n}')"))
"""
)


@pytest.mark.parametrize(
    "driver", subset(SYNC_BACKENDS, "postgresql-psycopg", "mysql-pymysql"), ids=lambda d: d.id
)
def test_commit_tests_under_xdist_restore_each_workers_database(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    """Under ``-n 2`` each worker restores its own database after each commit test: every
    test finds the seed only, whichever worker ran the ones before it."""
    project = _project(driver, scratch_databases, pytester)
    project.tests(XDIST)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:randomly", "-n", "2")
    result.assert_outcomes(passed=10)
    assert project.leftover_tables() == []


ASYNC_ROUTED = """
import pytest
from sqlalchemy import text

import app

pytestmark = [pytest.mark.asyncio, pytest.mark.alchemy(strategy="commit")]


async def test_app_commits():
    async with app.engine.begin() as conn:
        await conn.execute(text("INSERT INTO alchemy_item (name) VALUES ('from the app')"))
    async with app.engine.connect() as conn:
        found = await conn.execute(text("SELECT count(*) FROM alchemy_item"))
        assert found.scalar() == 2


async def test_then_finds_the_seed_only():
    async with app.engine.connect() as conn:
        found = await conn.execute(text("SELECT name FROM alchemy_item"))
        assert found.scalars().all() == ["seed"]
"""


@pytest.mark.parametrize("driver", ASYNC_BACKENDS, ids=lambda d: d.id)
def test_the_applications_async_engines_commit_to_the_test_database(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = project_for(driver, scratch_databases, pytester)
    pytester.makepyfile(
        seeds=SEEDS,
        app=f"""
from sqlalchemy.ext.asyncio import create_async_engine
engine = create_async_engine({project.url!r})
""",
    )
    project.ini("alchemy_seed = seeds:seed\nalchemy_engines = app:engine\n")
    project.tests(ASYNC_ROUTED)
    project.run().assert_outcomes(passed=2)
    if driver.backend != "sqlite":
        assert "alchemy_item" not in project.base_tables()
    else:
        assert not (pytester.path / "test.sqlite3").exists()
