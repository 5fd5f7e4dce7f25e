"""db_queries (what a test sent, with assertions) and N+1 detection, on every backend.

The counts are the statements the code asked for: the sandbox's BEGIN and savepoints, a
commit's RELEASE, the plugin's own statements and schema introspection are never in them, so
one inner module gives the same counts in the sandbox and with real commits.
"""

from __future__ import annotations

import textwrap

import pytest
from conftest import (
    ASYNC_BACKENDS,
    SYNC_BACKENDS,
    Driver,
    Project,
    project_for,
)

MODELS = """
from sqlalchemy import ForeignKey, String
from sqlalchemy.ext.asyncio import AsyncAttrs
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(AsyncAttrs, DeclarativeBase):
    pass


class Owner(Base):
    __tablename__ = "alchemy_owner"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    pets: Mapped[list["Pet"]] = relationship(back_populates="owner")


class Pet(Base):
    __tablename__ = "alchemy_pet"
    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("alchemy_owner.id"))
    owner: Mapped[Owner] = relationship(back_populates="pets")
"""

SEEDS = """
from sqlalchemy import insert
from models import Owner, Pet


def seed(connection):
    connection.execute(insert(Owner), [{"name": f"owner {n}"} for n in (1, 2, 3)])
    connection.execute(insert(Pet), [{"owner_id": n} for n in (1, 1, 2, 2, 3, 3)])
"""


def _project(
    driver: Driver, scratch: dict[str, str], pytester: pytest.Pytester, ini: str = ""
) -> Project:
    project = project_for(driver, scratch, pytester)
    pytester.makepyfile(
        models=MODELS,
        seeds=SEEDS,
        app=f"""
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker
engine = create_engine({project.url!r})
Session = sessionmaker(engine)
""",
    )
    engines = "alchemy_engines = app:engine\n" if not driver.is_async else ""
    project.ini(f"alchemy_seed = seeds:seed\n{engines}{ini}")
    return project


#: The marker each strategy adds to a module's pytestmark list.
STRATEGIES = {"rollback": "", "commit": 'pytest.mark.alchemy(strategy="commit")'}


def _line(source: str, text: str) -> int:
    """The line number of the first line of ``source`` (as the project writes it) that
    holds ``text``."""
    lines = textwrap.dedent(source).lstrip("\n").splitlines()
    return next(n for n, line in enumerate(lines, 1) if text in line)


SYNC_TESTS = """
import threading

import pytest
from sqlalchemy import func, select, text

import app
from models import Owner

pytestmark = [{mark}]


@pytest.fixture
def ada(db_session):
    db_session.add(Owner(name="ada"))
    db_session.commit()


def test_counts_what_the_code_sent(db_session, db_queries):
    db_session.add(Owner(name="bob"))
    db_session.commit()  # in the sandbox: RELEASE and SAVEPOINT, not counted
    with db_session.begin_nested():
        db_session.add(Owner(name="cy"))
    db_session.rollback()
    assert db_session.scalar(select(func.count()).select_from(Owner)) >= 3
    assert [q.kind for q in db_queries] == ["insert", "insert", "select"]
    db_queries.assert_count(2, kind="insert", table="alchemy_owner")
    db_queries.assert_count(at_most=3)
    assert db_queries.count("count") == 1
    assert {{q.where.rpartition(":")[0] for q in db_queries}} == {{"test_app.py"}}
    assert {{q.function for q in db_queries}} == {{"test_counts_what_the_code_sent"}}
    assert "bob" in str(db_queries[0].parameters)
    assert all(q.duration is not None and q.duration >= 0 for q in db_queries)
    db_queries.clear()
    assert len(db_queries) == 0


def test_a_block(db_session, db_queries):
    with db_queries.expect(1) as sent:
        db_session.execute(select(Owner)).all()
    assert [q.function for q in sent] == ["test_a_block"]
    with db_queries.expect(at_most=1, kind="select", table="alchemy_owner"):
        db_session.execute(text("SELECT 1")).all()
        db_session.get(Owner, 1)


def test_routed_engines_and_threads(db_queries):
    def work():
        with app.Session() as session:
            session.execute(select(Owner)).all()

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    with app.engine.connect() as connection:
        connection.execute(text("SELECT 2")).all()
    assert [q.function for q in db_queries] == ["work", "test_routed_engines_and_threads"]


def test_fixture_set_up_is_not_counted(ada, db_queries):
    assert len(db_queries) == 0


def test_a_failure_lists_the_statements(db_session, db_queries):
    db_session.execute(select(Owner.name)).all()
    db_session.execute(text("SELECT 42")).all()
    db_queries.assert_count(1)
"""

ASYNC_TESTS = """
import pytest
from sqlalchemy import func, select, text

from models import Owner

pytestmark = [pytest.mark.asyncio, {mark}]


async def test_counts_what_the_code_sent(async_db_session, db_queries):
    async_db_session.add(Owner(name="bob"))
    await async_db_session.commit()
    await async_db_session.scalar(select(func.count()).select_from(Owner))
    assert [q.kind for q in db_queries] == ["insert", "select"]
    assert {{q.function for q in db_queries}} == {{"test_counts_what_the_code_sent"}}
    with db_queries.expect(1, kind="select"):
        await async_db_session.execute(select(Owner))


async def test_a_failure_lists_the_statements(async_db_session, db_queries):
    with db_queries.expect(at_most=1):
        await async_db_session.execute(select(Owner.name))
        await async_db_session.execute(text("SELECT 42"))
"""

FAILURE_LINES = [
    "*Expected * statement(s), the * sent 2:",
    "*  1. SELECT alchemy_owner.name FROM alchemy_owner * -- test_app.py:* in "
    "test_a_failure_lists_the_statements, * ms",
    "*  2. SELECT 42 * -- test_app.py:* in test_a_failure_lists_the_statements, * ms",
]


def _marked(source: str, strategy: str) -> str:
    return source.format(mark=STRATEGIES[strategy])


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("driver", SYNC_BACKENDS, ids=lambda d: d.id)
def test_db_queries_counts_the_statements_the_code_sent(
    driver: Driver, strategy: str, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    """Sessions, routed engines, threads; transaction control and the sandbox's savepoints
    are not counted; the counts are the same in the sandbox and with real commits; a failed
    assertion lists the statements, numbered, with their call sites."""
    project = _project(driver, scratch_databases, pytester)
    project.tests(_marked(SYNC_TESTS, strategy))
    result = project.run()
    result.assert_outcomes(passed=4, failed=1)
    result.stdout.fnmatch_lines(FAILURE_LINES)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("driver", ASYNC_BACKENDS, ids=lambda d: d.id)
def test_db_queries_async(
    driver: Driver, strategy: str, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    """AsyncSession statements are recorded with the coroutine that awaited them."""
    project = _project(driver, scratch_databases, pytester)
    project.tests(_marked(ASYNC_TESTS, strategy))
    result = project.run()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(FAILURE_LINES)


NPLUSONE_TESTS = """
import pytest
from sqlalchemy import select
from sqlalchemy.orm import joinedload, selectinload

from models import Owner, Pet


def test_lazy_loads_in_a_loop(db_session):
    for owner in db_session.scalars(select(Owner)):
        assert owner.pets


def test_many_to_one_in_a_loop(db_session):
    for pet in db_session.scalars(select(Pet)):
        assert pet.owner


def test_eager_loads(db_session):
    for owner in db_session.scalars(select(Owner).options(selectinload(Owner.pets))):
        assert owner.pets
    for pet in db_session.scalars(select(Pet).options(joinedload(Pet.owner))):
        assert pet.owner


def test_one_lazy_load_per_place(db_session):
    first, second = db_session.get(Owner, 1), db_session.get(Owner, 2)
    assert first.pets
    assert second.pets


def test_a_loop_over_explicit_queries(db_session, db_queries):
    for number in (1, 2, 3):
        db_session.scalars(select(Pet).where(Pet.owner_id == number)).all()
    assert db_queries.repeats() == []
    db_queries.assert_no_repeats(explicit=True)


@pytest.mark.alchemy(nplusone="off")
def test_turned_off(db_session):
    for owner in db_session.scalars(select(Owner)):
        assert owner.pets
"""

ASYNC_NPLUSONE_TESTS = """
import pytest
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from models import Owner

pytestmark = [pytest.mark.asyncio, pytest.mark.alchemy(nplusone="warn")]


async def test_lazy_loads_in_a_loop(async_db_session):
    for owner in (await async_db_session.scalars(select(Owner))).all():
        assert await owner.awaitable_attrs.pets


async def test_eager_loads(async_db_session):
    query = select(Owner).options(selectinload(Owner.pets))
    for owner in (await async_db_session.scalars(query)).all():
        assert owner.pets
"""


@pytest.mark.parametrize("driver", SYNC_BACKENDS, ids=lambda d: d.id)
def test_nplusone_fails_a_test_that_lazy_loads_in_a_loop(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    """ini alchemy_nplusone = fail: lazy loads of one relationship from one place fail the
    test with the relationship, the count, the call site and the fix; eager loads, one lazy
    load per place and loops over explicit queries do not (unless asked for); the marker
    turns it off per test."""
    project = _project(driver, scratch_databases, pytester, "alchemy_nplusone = fail\n")
    project.tests(NPLUSONE_TESTS)
    result = project.run("-rf")
    result.assert_outcomes(passed=3, failed=3)
    pets = _line(NPLUSONE_TESTS, "assert owner.pets")
    result.stdout.fnmatch_lines(
        [
            "*N+1 queries:",
            f"- Owner.pets was lazy-loaded 3 times from test_app.py:{pets} in "
            "test_lazy_loads_in_a_loop (N+1 queries: SELECT * FROM alchemy_pet WHERE *). Load "
            "it with the query that fetched the Owner rows: .options(selectinload(Owner.pets))*",
        ]
    )
    # Pet.owner: three owners, each loaded once; a many-to-one gets joinedload.
    owner = _line(NPLUSONE_TESTS, "assert pet.owner")
    result.stdout.fnmatch_lines(
        [f"- Pet.owner was lazy-loaded 3 times from test_app.py:{owner} in *joinedload(Pet.owner)*"]
    )
    loop = _line(NPLUSONE_TESTS, "where(Pet.owner_id == number)")
    result.stdout.fnmatch_lines(
        [f"*the same statement ran 3 times from test_app.py:{loop} in test_a_loop_over_explicit*"]
    )
    assert "test_eager_loads FAILED" not in result.stdout.str()


@pytest.mark.parametrize("driver", ASYNC_BACKENDS, ids=lambda d: d.id)
def test_nplusone_warns_about_async_lazy_loads(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    """The marker's nplusone='warn': an NPlusOneWarning at the application's line, for lazy
    loads through AsyncAttrs.awaitable_attrs."""
    project = _project(driver, scratch_databases, pytester)
    project.tests(ASYNC_NPLUSONE_TESTS)
    result = project.run("-W", "default::pytest_alchemy.NPlusOneWarning")
    result.assert_outcomes(passed=2, warnings=1)
    line = _line(ASYNC_NPLUSONE_TESTS, "awaitable_attrs.pets")
    result.stdout.fnmatch_lines(
        [
            f"*test_app.py:{line}: NPlusOneWarning: N+1 queries:",
            f"*- Owner.pets was lazy-loaded 3 times from test_app.py:{line} in "
            "test_lazy_loads_in_a_loop*",
        ]
    )


def test_recording_costs_nothing_unless_asked(pytester: pytest.Pytester) -> None:
    """No listener is installed for a test that neither requests db_queries nor has N+1
    detection on; one is while a test that does runs, and removed after it."""
    project = Project(pytester, None)
    project.ini()
    project.tests(
        """
        from pytest_alchemy import queries

        def listening():
            return bool(queries._listening)

        def test_without(db_session):
            assert not listening()

        def test_with(db_session, db_queries):
            assert listening()

        def test_after(db_session):
            assert not listening()
        """
    )
    project.run().assert_outcomes(passed=3)


def test_bad_nplusone_settings_are_usage_errors(pytester: pytest.Pytester) -> None:
    project = Project(pytester, None)
    project.ini("alchemy_nplusone = loud\n")
    project.tests("def test_one():\n    pass\n")
    result = project.run()
    result.stderr.fnmatch_lines(["*ini alchemy_nplusone = 'loud': must be one of off, warn, fail*"])
    project.ini()
    project.tests(
        """
        import pytest

        @pytest.mark.alchemy(nplusone=True)
        def test_one():
            pass
        """
    )
    result = project.run()
    result.stderr.fnmatch_lines(["*nplusone must be a str, got True*"])
