"""Hypothesis: each example of a @given test that uses the sandbox runs in a savepoint of its
own and is rolled back, so examples never see each other's rows; the function-scoped
fixture health check is suppressed only where the plugin's fixtures are the only ones."""

from __future__ import annotations

import pytest
from conftest import ASYNC_BACKENDS, SYNC_BACKENDS, Driver, Project, project_for

#: Its health check for function-scoped fixtures lives in its pytest plugin.
pytestmark = pytest.mark.inner_plugins("hypothesispytest")

SYNC_TESTS = """
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from sqlalchemy import func, select, text

import app
from models import Item

names = st.text(alphabet="abc", min_size=1, max_size=8)
EXAMPLES = settings(max_examples=12, deadline=None, database=None)


def count(session):
    return session.scalar(select(func.count()).select_from(Item))


@EXAMPLES
@given(name=names)
def test_each_example_starts_clean(db_session, name):
    assert count(db_session) == 0
    db_session.add(Item(name=name))  # Item.name is unique: a leftover would collide
    db_session.commit()
    with db_session.begin_nested():
        db_session.add(Item(name=name + "x"))
    assert count(db_session) == 2


@EXAMPLES
@given(name=names)
def test_the_applications_commits_are_undone_too(db_connection, name):
    with app.Session() as session:
        session.add(Item(name=name))
        session.commit()
    assert db_connection.execute(text("SELECT COUNT(*) FROM alchemy_item")).scalar() == 1


@pytest.fixture
def ada(db_session):
    db_session.add(Item(name="ada"))
    db_session.flush()  # pending in the session: every example starts from it


@settings(
    max_examples=8,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(name=names)
def test_a_fixtures_rows_are_every_examples_baseline(ada, db_session, name):
    assert db_session.scalars(select(Item.name)).all() == ["ada"]
    db_session.add(Item(name=name))
    db_session.commit()


@EXAMPLES
@given(name=names)
def test_the_users_own_fixture_still_gets_the_health_check(ada, db_session, name):
    pass


def test_and_nothing_survives(db_session):
    assert count(db_session) == 0
"""


def _project(driver: Driver, scratch: dict[str, str], pytester: pytest.Pytester) -> Project:
    project = project_for(driver, scratch, pytester)
    pytester.makepyfile(
        app=f"""
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker
engine = create_engine({project.url!r})
Session = sessionmaker(engine)
"""
    )
    return project


@pytest.mark.parametrize("driver", SYNC_BACKENDS, ids=lambda d: d.id)
def test_each_hypothesis_example_is_rolled_back(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = _project(driver, scratch_databases, pytester)
    project.ini("alchemy_engines = app:engine\n")
    project.tests(SYNC_TESTS)
    result = project.run("-rf")
    result.assert_outcomes(passed=4, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*test_the_users_own_fixture_still_gets_the_health_check*",
            "*uses a function-scoped fixture 'ada'*",
        ]
    )


ASYNC_TESTS = """
import pytest
from hypothesis import given, settings, strategies as st
from sqlalchemy import func, select

from models import Item

EXAMPLES = settings(max_examples=10, deadline=None, database=None)


@pytest.mark.asyncio
@EXAMPLES
@given(name=st.text(alphabet="abc", min_size=1, max_size=8))
async def test_each_example_starts_clean(async_db_session, name):
    assert await async_db_session.scalar(select(func.count()).select_from(Item)) == 0
    async_db_session.add(Item(name=name))
    await async_db_session.commit()
    assert await async_db_session.scalar(select(func.count()).select_from(Item)) == 1
"""


@pytest.mark.parametrize("driver", ASYNC_BACKENDS, ids=lambda d: d.id)
def test_each_async_hypothesis_example_is_rolled_back(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = project_for(driver, scratch_databases, pytester)
    project.ini()
    project.tests(ASYNC_TESTS)
    project.run().assert_outcomes(passed=1)
