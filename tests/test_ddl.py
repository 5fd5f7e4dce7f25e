"""Suites that build their tables around every test (create_all / drop_all in a fixture):
with the schema in ``alchemy_metadata``, that DDL costs nothing and works on MySQL too, and a
test still sees what a real create_all / drop_all leaves."""

from __future__ import annotations

import pytest
from conftest import (
    ASYNC_BACKENDS,
    SYNC_BACKENDS,
    SYNC_DRIVERS,
    Driver,
    Project,
    project_for,
    subset,
)

APP = """
from sqlalchemy import create_engine, event, func, select
from sqlalchemy.orm import sessionmaker

from models import Item

engine = create_engine(APP_URL)
SessionLocal = sessionmaker(engine)
sent = []


@event.listens_for(engine, "before_cursor_execute")
def _sent(conn, cursor, statement, parameters, context, executemany):
    sent.append(statement)


def count():
    with SessionLocal() as session:
        return session.scalar(select(func.count()).select_from(Item))
"""

CONFTEST = """
import re

import pytest

import app
from models import Base

SCHEMA_WORK = re.compile(
    r"\\s*(CREATE|DROP)\\b|.*(information_schema|pg_catalog|sqlite_master|PRAGMA)", re.I | re.S
)


@pytest.fixture(autouse=True)
def tables():
    Base.metadata.create_all(app.engine)
    yield
    Base.metadata.drop_all(app.engine)


@pytest.fixture(scope="session", autouse=True)
def no_schema_work_reached_the_server():
    yield
    found = [s for s in app.sent if SCHEMA_WORK.match(s)]
    assert found == [], found
"""

TESTS = """
from sqlalchemy import select

import app
from models import Item


def test_with_db_session(db_session):
    db_session.add(Item(name="a"))
    db_session.commit()
    assert app.count() == 1


def test_through_the_app():
    with app.SessionLocal() as session:
        session.add(Item(name="b"))
        session.commit()
    assert app.count() == 1


def test_without_a_database_fixture():
    assert app.count() == 0
"""

DRIVERS = [*SYNC_BACKENDS, *subset(SYNC_DRIVERS, "sqlite-memory")]


def _project(
    driver: Driver, scratch: dict[str, str], pytester: pytest.Pytester, conftest: str
) -> Project:
    project = project_for(driver, scratch, pytester)
    pytester.makepyfile(app=APP.replace("APP_URL", repr(project.url or "sqlite://")))
    pytester.makeconftest(conftest)
    project.ini("alchemy_engines = app:engine\n")
    return project


@pytest.mark.parametrize("driver", DRIVERS, ids=lambda d: d.id)
def test_create_all_and_drop_all_of_the_built_schema_send_nothing(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    """No CREATE, DROP or catalog query reaches the server (on MySQL the DROP used to be
    refused: DDL commits there); each test still starts empty."""
    project = _project(driver, scratch_databases, pytester, CONFTEST)
    project.tests(TESTS)
    project.run().assert_outcomes(passed=3)
    assert project.leftover_tables() == []


FIDELITY_CONFTEST = """
import pytest

import app
from models import Base
"""

FIDELITY_TESTS = """
import pytest
from sqlalchemy import inspect, text
from sqlalchemy.exc import DBAPIError

import app
from models import Base, Item


def test_a_table_dropped_is_gone_when_the_test_goes_on(db_session):
    Base.metadata.drop_all(app.engine)
    with pytest.raises(DBAPIError):
        with app.engine.connect() as conn:
            conn.execute(text("SELECT count(*) FROM alchemy_item"))


def test_and_back_when_created_again(db_session):
    db_session.add(Item(name="a"))
    db_session.commit()
    Base.metadata.drop_all(app.engine)
    Base.metadata.create_all(app.engine)
    assert app.count() == 0
    with app.engine.connect() as conn:
        assert inspect(conn).has_table("alchemy_item")


def test_a_drop_rolled_back_leaves_the_tables(db_session):
    with app.engine.connect() as conn:
        Base.metadata.drop_all(conn)
        conn.rollback()
    assert app.count() == 0


def test_the_next_test_has_its_tables(db_session):
    assert app.count() == 0
"""


@pytest.mark.parametrize(
    "driver",
    [d for d in DRIVERS if d.backend != "mysql"],
    ids=lambda d: d.id,
)
def test_a_test_sees_what_a_real_drop_all_leaves(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = _project(driver, scratch_databases, pytester, FIDELITY_CONFTEST)
    project.tests(FIDELITY_TESTS)
    project.run().assert_outcomes(passed=4)


MYSQL_TESTS = """
from sqlalchemy import text

import app
from models import Base


def test_the_database_used_after_a_drop_all(db_session):
    Base.metadata.drop_all(app.engine)
    with app.engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def test_the_next_test_has_its_tables(db_session):
    assert app.count() == 0
"""


def test_on_mysql_a_drop_all_the_test_goes_on_after_is_refused_clearly(
    scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    driver = next(d for d in DRIVERS if d.backend == "mysql")
    project = _project(driver, scratch_databases, pytester, FIDELITY_CONFTEST)
    project.tests(MYSQL_TESTS)
    result = project.run()
    result.assert_outcomes(passed=1, failed=1, errors=1)
    result.stdout.fnmatch_lines(
        ["*refused the DROP TABLEs of a drop_all() that the test kept using the database after*"]
    )


ASYNC_APP = """
from sqlalchemy import event, func, select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from models import Item

engine = create_async_engine(APP_URL)
SessionLocal = async_sessionmaker(engine)
sent = []


@event.listens_for(engine.sync_engine, "before_cursor_execute")
def _sent(conn, cursor, statement, parameters, context, executemany):
    sent.append(statement)


async def count():
    async with SessionLocal() as session:
        return await session.scalar(select(func.count()).select_from(Item))
"""

ASYNC_CONFTEST = CONFTEST.replace(
    """@pytest.fixture(autouse=True)
def tables():
    Base.metadata.create_all(app.engine)
    yield
    Base.metadata.drop_all(app.engine)""",
    """@pytest_asyncio.fixture(autouse=True)
async def tables():
    async with app.engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    yield
    async with app.engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)""",
).replace("import pytest\n", "import pytest\nimport pytest_asyncio\n", 1)

ASYNC_TESTS = """
import pytest

import app
from models import Item


@pytest.mark.asyncio
async def test_with_db_session(async_db_session):
    async_db_session.add(Item(name="a"))
    await async_db_session.commit()
    assert await app.count() == 1


@pytest.mark.asyncio
async def test_through_the_app(async_db_session):
    async with app.SessionLocal() as session:
        session.add(Item(name="b"))
        await session.commit()
    assert await app.count() == 1


@pytest.mark.asyncio
async def test_starts_empty(async_db_session):
    assert await app.count() == 0
"""


@pytest.mark.parametrize(
    "driver",
    ASYNC_BACKENDS,
    ids=lambda d: d.id,
)
def test_async_create_all_and_drop_all_of_the_built_schema_send_nothing(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = project_for(driver, scratch_databases, pytester)
    pytester.makepyfile(app=ASYNC_APP.replace("APP_URL", repr(project.url)))
    pytester.makeconftest(ASYNC_CONFTEST)
    project.ini("alchemy_engines = app:engine\n")
    project.tests(ASYNC_TESTS)
    project.run().assert_outcomes(passed=3)
    assert project.leftover_tables() == []


def test_on_mysql_without_the_metadata_the_refusal_says_how_to_make_it_work(
    scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    driver = next(d for d in DRIVERS if d.backend == "mysql")
    project = project_for(driver, scratch_databases, pytester)
    pytester.makepyfile(app=APP.replace("APP_URL", repr(project.url)))
    pytester.makeconftest(FIDELITY_CONFTEST + "\n\n" + CONFTEST.split("\n\n\n")[1])
    project.ini("alchemy_engines = app:engine\n", metadata=False)
    project.tests("def test_x(db_session):\n    pass\n")
    result = project.run()
    result.assert_outcomes(errors=2)  # at setup, and at teardown for the refusal
    result.stdout.fnmatch_lines(
        [
            "*refused to run 'CREATE TABLE alchemy_item*Build tables once, through "
            "alchemy_metadata (a create_all/drop_all of them in a test then sends nothing)*"
        ]
    )


SCOPED_APP = (
    APP
    + """
from sqlalchemy.orm import scoped_session

Session = scoped_session(SessionLocal)
"""
)

SCOPED_TESTS = """
from sqlalchemy import text

import app


def test_a_session_left_open_when_the_tables_are_dropped():
    # Its transaction is still open when the fixture drops the tables (on tables it did not
    # touch: a real DROP would wait for its locks otherwise).
    assert app.Session.execute(text("SELECT 1")).scalar() == 1


def test_the_next_test_has_its_tables():
    assert app.count() == 0
"""


@pytest.mark.parametrize("driver", DRIVERS, ids=lambda d: d.id)
def test_a_scoped_session_removed_after_the_drop_leaves_it_unsent(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    """The scoped session is removed (rolled back) after the fixture's drop_all: that is
    another transaction ending, not a use of the tables, so the DROPs are never sent (on MySQL
    sending them would be refused)."""
    project = project_for(driver, scratch_databases, pytester)
    pytester.makepyfile(app=SCOPED_APP.replace("APP_URL", repr(project.url or "sqlite://")))
    pytester.makeconftest(CONFTEST)
    project.ini("alchemy_engines =\n    app:engine\n    app:Session\n")
    project.tests(SCOPED_TESTS)
    project.run().assert_outcomes(passed=2)


@pytest.mark.parametrize("driver", subset(SYNC_DRIVERS, "postgresql-psycopg"), ids=lambda d: d.id)
def test_create_all_and_drop_all_send_nothing_under_xdist(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    """Each worker's sandboxes know what was built into its clone (one backend: the shortcut
    does not depend on how the clone is made)."""
    project = _project(driver, scratch_databases, pytester, CONFTEST)
    project.tests(TESTS)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(passed=3)
