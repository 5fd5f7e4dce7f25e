"""What passes in the sandbox passes in production: effects that production has only at a
real commit happen where the application commits."""

from __future__ import annotations

import pytest
from conftest import ASYNC_DRIVERS, SYNC_DRIVERS, Driver, Project, project_for

DEFERRED_MODELS = """
from sqlalchemy import ForeignKey
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Parent(Base):
    __tablename__ = "alchemy_parent"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)


class Child(Base):
    __tablename__ = "alchemy_child"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    parent_id: Mapped[int] = mapped_column(
        ForeignKey("alchemy_parent.id", deferrable=True, initially="DEFERRED")
    )
"""

SYNC_DEFERRED = """
import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from models import Child, Parent


def test_a_violation_fails_at_the_commit_as_in_production(db_session):
    db_session.add(Child(id=1, parent_id=999))
    db_session.flush()  # deferred: nothing is checked yet, as in production
    with pytest.raises(IntegrityError, match="foreign key"):
        db_session.commit()
    db_session.rollback()
    assert db_session.scalars(select(Child)).all() == []
    db_session.add_all([Parent(id=1), Child(id=1, parent_id=1)])
    db_session.commit()


def test_deferred_still_means_deferred_in_every_transaction(db_session):
    for n in (5, 6):  # the constraint is deferred again after each checked commit
        db_session.add(Child(id=n, parent_id=n))
        db_session.flush()
        db_session.add(Parent(id=n))
        db_session.commit()
    assert sorted(db_session.scalars(select(Child.id))) == [5, 6]


def test_a_released_nested_savepoint_is_not_a_commit(db_session):
    db_session.add(Parent(id=7))
    db_session.commit()
    with db_session.begin():
        with db_session.begin_nested():
            db_session.add(Child(id=7, parent_id=8))  # no error yet: not the outermost commit
        db_session.add(Parent(id=8))
"""

ASYNC_DEFERRED = """
import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from models import Child, Parent

pytestmark = pytest.mark.asyncio


async def test_a_violation_fails_at_the_commit_as_in_production(async_db_session):
    async_db_session.add(Child(id=1, parent_id=999))
    await async_db_session.flush()
    with pytest.raises(IntegrityError, match="foreign key"):
        await async_db_session.commit()
    await async_db_session.rollback()
    assert (await async_db_session.scalars(select(Child))).all() == []


async def test_deferred_still_means_deferred_in_every_transaction(async_db_session):
    for n in (5, 6):
        async_db_session.add(Child(id=n, parent_id=n))
        await async_db_session.flush()
        async_db_session.add(Parent(id=n))
        await async_db_session.commit()
"""

POSTGRESQL = [d for d in SYNC_DRIVERS + ASYNC_DRIVERS if d.backend == "postgresql"]


@pytest.mark.parametrize("driver", POSTGRESQL, ids=lambda d: d.id)
def test_deferred_constraints_are_checked_at_the_applications_commit(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = project_for(driver, scratch_databases, pytester)
    pytester.makepyfile(models=DEFERRED_MODELS)
    project.ini()
    project.tests(ASYNC_DEFERRED if driver.is_async else SYNC_DEFERRED)
    project.run().assert_outcomes(passed=2 if driver.is_async else 3)


ROUTED_APP = """
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from models import Child

engine = create_engine(APP_URL)
SessionLocal = sessionmaker(engine)


def adopt_orphan():
    with SessionLocal() as session:
        session.add(Child(id=1, parent_id=404))
        session.commit()
"""


def test_deferred_constraints_are_checked_at_a_routed_engines_commit(
    scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    driver = next(d for d in SYNC_DRIVERS if d.id == "postgresql-psycopg")
    project = project_for(driver, scratch_databases, pytester)
    pytester.makepyfile(models=DEFERRED_MODELS)
    pytester.makepyfile(app=ROUTED_APP.replace("APP_URL", repr(project.url)))
    project.ini("alchemy_engines = app:engine\n")
    project.tests(
        """
import pytest
from sqlalchemy.exc import IntegrityError

import app


def test_the_applications_commit_raises(db_session):
    with pytest.raises(IntegrityError, match="foreign key"):
        app.adopt_orphan()
"""
    )
    project.run().assert_outcomes(passed=1)


# A statement that writes although it reads like a query. PostgreSQL and MariaDB: a function
# that inserts; SQLite (no SQL functions): a PRAGMA that sets the file's user_version, which
# SQLite keeps in the transaction.
WRITING_QUERY = {
    "postgresql": (
        "CREATE FUNCTION alchemy_create_item(n text) RETURNS integer LANGUAGE sql AS "
        "$$ INSERT INTO alchemy_item (name) VALUES (n) RETURNING id $$",
        "SELECT alchemy_create_item('{name}')",
        "SELECT count(*) FROM alchemy_item",
    ),
    "mysql": (
        "CREATE FUNCTION alchemy_create_item(n VARCHAR(50)) RETURNS INTEGER MODIFIES SQL DATA "
        "BEGIN INSERT INTO alchemy_item (name) VALUES (n); RETURN LAST_INSERT_ID(); END",
        "SELECT alchemy_create_item('{name}')",
        "SELECT count(*) FROM alchemy_item",
    ),
    "sqlite": (None, "PRAGMA user_version = {number}", "PRAGMA user_version"),
}

WRITING_MODELS = """
from sqlalchemy import DDL, event

from models_base import Base, Item

if CREATE:
    event.listen(Base.metadata, "after_create", DDL(CREATE))
"""

SYNC_WRITING_QUERY = """
from sqlalchemy import text

WRITE, COUNT = {write!r}, {count!r}


def test_a_rollback_undoes_a_query_that_wrote(db_session):
    db_session.execute(text(WRITE.format(name="a", number=1)))
    db_session.rollback()
    assert db_session.scalar(text(COUNT)) == 0


def test_a_commit_keeps_it_and_a_later_rollback_leaves_it(db_session):
    db_session.execute(text(WRITE.format(name="b", number=1)))
    db_session.commit()
    db_session.execute(text("SELECT 1"))
    db_session.rollback()
    assert db_session.scalar(text(COUNT)) == 1


def test_the_next_test_starts_clean(db_session):
    assert db_session.scalar(text(COUNT)) == 0
"""

ASYNC_WRITING_QUERY = """
import pytest
from sqlalchemy import text

pytestmark = pytest.mark.asyncio
WRITE, COUNT = {write!r}, {count!r}


async def test_a_rollback_undoes_a_query_that_wrote(async_db_session):
    await async_db_session.execute(text(WRITE.format(name="a", number=1)))
    await async_db_session.rollback()
    assert await async_db_session.scalar(text(COUNT)) == 0


async def test_a_commit_keeps_it_and_a_later_rollback_leaves_it(async_db_session):
    await async_db_session.execute(text(WRITE.format(name="b", number=1)))
    await async_db_session.commit()
    await async_db_session.execute(text("SELECT 1"))
    await async_db_session.rollback()
    assert await async_db_session.scalar(text(COUNT)) == 1


async def test_the_next_test_starts_clean(async_db_session):
    assert await async_db_session.scalar(text(COUNT)) == 0
"""


def _writing_query_project(
    driver: Driver, scratch: dict[str, str], pytester: pytest.Pytester
) -> tuple[Project, str, str]:
    project = project_for(driver, scratch, pytester)
    create, write, count = WRITING_QUERY[driver.backend]
    models = (pytester.path / "models.py").read_text()
    pytester.makepyfile(models_base=models)
    pytester.makepyfile(models=f"CREATE = {create!r}\n" + WRITING_MODELS)
    project.ini()
    return project, write, count


WRITING_DRIVERS = [
    d
    for d in SYNC_DRIVERS + ASYNC_DRIVERS
    if d.id in {"sqlite-pysqlite", "postgresql-psycopg", "mysql-pymysql", "postgresql-asyncpg"}
]


@pytest.mark.parametrize("driver", WRITING_DRIVERS, ids=lambda d: d.id)
def test_a_query_that_writes_is_rolled_back_as_in_production(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project, write, count = _writing_query_project(driver, scratch_databases, pytester)
    source = ASYNC_WRITING_QUERY if driver.is_async else SYNC_WRITING_QUERY
    project.tests(source.format(write=write, count=count))
    project.run().assert_outcomes(passed=3)


def test_a_rollback_that_would_undo_a_committed_query_is_reported(
    scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    """Two sessions of the application overlap on the test's one connection: the first one's
    rollback undoes what the second committed with a query that wrote. Production keeps it;
    the sandbox cannot, so the test fails saying why instead of passing on a lost write."""
    driver = next(d for d in SYNC_DRIVERS if d.id == "postgresql-psycopg")
    project, write, _ = _writing_query_project(driver, scratch_databases, pytester)
    pytester.makepyfile(
        app=f"""
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

engine = create_engine({project.url!r})
SessionLocal = sessionmaker(engine)
"""
    )
    project.ini("alchemy_engines = app:engine\n")
    project.tests(
        f"""
from sqlalchemy import text

from app import SessionLocal
from models import Item


def test_overlapping_sessions(db_session):
    first = SessionLocal()
    first.add(Item(name="first"))
    first.flush()
    with SessionLocal() as second:
        second.execute(text({write.format(name="second")!r}))
        second.commit()
    first.rollback()
"""
    )
    result = project.run()
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*Two transactions were open at once*"])


# Ids: counters that a rollback does not undo, put back after each test that asks.
SEED_TWO_ITEMS = """
from sqlalchemy import text


def seed(connection):
    connection.execute(text("INSERT INTO alchemy_item (name) VALUES ('seed-1'), ('seed-2')"))
"""

SYNC_LITERAL_IDS = """
import pytest
from sqlalchemy import text

from models import Item, Tag

{mark}


def test_the_app_commits_and_gets_the_next_id(db_session):
    item = Item(name="a")
    db_session.add(item)
    db_session.commit()
    db_session.add(Tag(item_id=item.id))
    db_session.commit()
    assert item.id == 3


def test_raw_sql_gets_the_same_id_again(db_connection):
    db_connection.execute(text("INSERT INTO alchemy_item (name) VALUES ('b')"))
    new_id = db_connection.execute(text("SELECT max(id) FROM alchemy_item")).scalar()
    assert new_id == 3


def test_and_so_does_the_next_flush(db_session):
    for name in ("c", "d"):
        db_session.add(Item(name=name))
    db_session.flush()
    assert sorted(db_session.query(Item.id).filter(Item.name != "seed-1")) == [(2,), (3,), (4,)]
"""

ASYNC_LITERAL_IDS = """
import pytest

from models import Item

{mark}


@pytest.mark.asyncio
@pytest.mark.parametrize("name", ["a", "b"])
async def test_every_test_gets_the_same_id(async_db_session, name):
    item = Item(name=name)
    async_db_session.add(item)
    await async_db_session.flush()
    new_id = item.id
    await async_db_session.commit()
    assert new_id == 3
"""

COUNTER_DRIVERS = [
    d
    for d in SYNC_DRIVERS + ASYNC_DRIVERS
    if d.id
    in {
        "sqlite-pysqlite",
        "postgresql-psycopg",
        "mysql-pymysql",
        "postgresql-asyncpg",
        "mysql-asyncmy",
    }
]


@pytest.mark.parametrize("how", ["ini", "marker"])
@pytest.mark.parametrize("driver", COUNTER_DRIVERS, ids=lambda d: d.id)
def test_reset_sequences_gives_every_test_the_templates_ids(
    driver: Driver, how: str, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = project_for(driver, scratch_databases, pytester)
    pytester.makepyfile(seeding=SEED_TWO_ITEMS)
    ini = "alchemy_seed = seeding:seed\n"
    mark = "pytestmark = pytest.mark.alchemy(reset_sequences=True)"
    if how == "ini":
        ini += "alchemy_reset_sequences = true\n"
        mark = ""
    project.ini(ini)
    project.tests((ASYNC_LITERAL_IDS if driver.is_async else SYNC_LITERAL_IDS).format(mark=mark))
    project.run().assert_outcomes(passed=2 if driver.is_async else 3)


def test_a_test_can_opt_out_of_the_ini(
    scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    driver = next(d for d in SYNC_DRIVERS if d.id == "postgresql-psycopg")
    project = project_for(driver, scratch_databases, pytester)
    project.ini("alchemy_reset_sequences = true\n")
    project.tests(
        """
import pytest

from models import Item


@pytest.mark.alchemy(reset_sequences=False)
class TestKeepsCounting:
    def test_one(self, db_session):
        db_session.add(Item(name="a"))
        db_session.flush()

    @pytest.mark.parametrize("expected", [2, 3])
    def test_two(self, db_session, expected):
        item = Item(name="b")
        db_session.add(item)
        db_session.flush()
        assert item.id == expected


def test_reset_again(db_session):
    item = Item(name="c")
    db_session.add(item)
    db_session.flush()
    assert item.id == 4  # the ini's reset puts it back after this test, not before


def test_back_at_the_start(db_session):
    item = Item(name="d")
    db_session.add(item)
    db_session.flush()
    assert item.id == 1
"""
    )
    project.run().assert_outcomes(passed=5)


def test_the_alchemy_marker_is_registered_and_checked(pytester: pytest.Pytester) -> None:
    project = Project(pytester, None)
    project.ini("", metadata=False)
    project.tests(
        """
import pytest


@pytest.mark.alchemy(reset_sequence=True)
def test_typo():
    pass
"""
    )
    result = project.run("--strict-markers")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "*@pytest.mark.alchemy on test_app.py::test_typo: unknown option 'reset_sequence'. "
            "Valid options: strategy, reset_sequences, nplusone.*"
        ]
    )
    markers = project.run("--markers")
    markers.stdout.fnmatch_lines(["@pytest.mark.alchemy(**options): per-test options*"])


# -- a query that fails before anything was written -------------------------------------------
# The sandbox sends a session's SAVEPOINT only before its first write; a query that fails
# before that (PostgreSQL then refuses everything until a rollback) is recovered from by the
# session's rollback, as in production, and what was written outside the sandbox's sight (a raw
# DBAPI cursor) before the session began is not undone by it.

SYNC_FAILED_QUERY = """
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError

from models import Item

BAD = "SELECT name FROM alchemy_no_such_table"


def test_a_failed_query_then_the_rollback(db_session):
    with pytest.raises(DBAPIError):
        db_session.execute(text(BAD))
    db_session.rollback()
    db_session.add(Item(name="after"))
    db_session.commit()
    assert db_session.scalar(select(func.count()).select_from(Item)) == 1


def test_a_failed_query_after_a_read(db_session):
    assert db_session.scalar(select(func.count()).select_from(Item)) == 0
    with pytest.raises(DBAPIError):
        db_session.execute(text(BAD))
    db_session.rollback()
    assert db_session.scalar(select(func.count()).select_from(Item)) == 0


@pytest.fixture
def raw_row(db_connection):
    cursor = db_connection.connection.dbapi_connection.cursor()
    cursor.execute("INSERT INTO alchemy_item (name) VALUES ('raw')")
    cursor.close()


def test_a_raw_write_before_survives_the_rollback(raw_row, db_session):
    with pytest.raises(DBAPIError):
        db_session.execute(text(BAD))
    db_session.rollback()
    assert db_session.scalars(select(Item.name)).all() == ["raw"]


def test_a_raw_write_alone(raw_row):  # no statement SQLAlchemy saw: undone all the same
    pass


def test_the_next_test_starts_clean(db_session):
    assert db_session.scalar(select(func.count()).select_from(Item)) == 0
"""

ASYNC_FAILED_QUERY = """
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError

from models import Item

pytestmark = pytest.mark.asyncio
BAD = "SELECT name FROM alchemy_no_such_table"


async def test_a_failed_query_then_the_rollback(async_db_session):
    with pytest.raises(DBAPIError):
        await async_db_session.execute(text(BAD))
    await async_db_session.rollback()
    async_db_session.add(Item(name="after"))
    await async_db_session.commit()
    assert await async_db_session.scalar(select(func.count()).select_from(Item)) == 1


async def test_a_failed_query_after_a_read(async_db_session):
    assert await async_db_session.scalar(select(func.count()).select_from(Item)) == 0
    with pytest.raises(DBAPIError):
        await async_db_session.execute(text(BAD))
    await async_db_session.rollback()
    assert await async_db_session.scalar(select(func.count()).select_from(Item)) == 0


def _raw_insert(connection):
    cursor = connection.connection.dbapi_connection.cursor()
    cursor.execute("INSERT INTO alchemy_item (name) VALUES ('raw')")
    cursor.close()


async def test_a_raw_write_alone(async_db_connection):  # no statement SQLAlchemy saw
    await async_db_connection.run_sync(_raw_insert)


async def test_the_next_test_starts_clean(async_db_session):
    assert await async_db_session.scalar(select(func.count()).select_from(Item)) == 0
"""


@pytest.mark.parametrize("driver", SYNC_DRIVERS + ASYNC_DRIVERS, ids=lambda d: d.id)
def test_a_failed_query_before_any_write_is_recovered_as_in_production(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = project_for(driver, scratch_databases, pytester)
    project.ini()
    project.tests(ASYNC_FAILED_QUERY if driver.is_async else SYNC_FAILED_QUERY)
    project.run("-p", "no:randomly").assert_outcomes(passed=4 if driver.is_async else 5)
