"""The fixture layers under db_session (db_sessionmaker, db_connection, db_engine), and under
async_db_session (async_db_sessionmaker, async_db_connection, async_db_engine), stay
overridable, and cost nothing while they are the plugin's own: the session fixture then does their
work itself instead of pytest setting up three more fixtures per test."""

from __future__ import annotations

import pytest
from conftest import ASYNC_BACKENDS, SYNC_BACKENDS, Driver, Project, project_for

SHARED = """
from sqlalchemy import func, insert, select

from models import Item


def count(session):
    return session.scalar(select(func.count()).select_from(Item))


def test_session_first_then_the_connection(db_session, db_connection):
    assert db_session.connection() is db_connection
    db_connection.execute(insert(Item).values(name="core"))
    db_session.add(Item(name="orm"))
    db_session.commit()
    assert count(db_session) == 2


def test_a_fixture_wrote_through_the_connection(written, db_session):
    assert db_session.scalars(select(Item.name)).all() == ["fixture"]


def test_nothing_survives(db_session):
    assert count(db_session) == 0
"""

SHARED_CONFTEST = """
import pytest
from sqlalchemy import insert

from models import Item


@pytest.fixture
def written(db_connection):
    db_connection.execute(insert(Item).values(name="fixture"))
"""

OVERRIDES = """
import pytest
from layer_calls import CALLED
from sqlalchemy.orm import sessionmaker


@pytest.fixture
def db_sessionmaker(db_connection):
    CALLED.append("db_sessionmaker")
    return sessionmaker(
        bind=db_connection, info={"made": "by the user"}, join_transaction_mode="create_savepoint"
    )


@pytest.fixture
def db_connection(db_connection):
    CALLED.append("db_connection")
    return db_connection


@pytest.fixture(scope="session")
def db_engine(db_engine):
    CALLED.append("db_engine")
    return db_engine
"""

OVERRIDDEN_TESTS = """
from sqlalchemy import func, select

from layer_calls import CALLED
from models import Item


def test_the_users_layers_are_used(db_session):
    assert db_session.info == {"made": "by the user"}
    assert CALLED == ["db_engine", "db_connection", "db_sessionmaker"]
    db_session.add(Item(name="a"))
    db_session.commit()


def test_and_still_roll_back(db_session):
    assert db_session.scalar(select(func.count()).select_from(Item)) == 0
"""


def _project(driver: Driver, scratch: dict[str, str], pytester: pytest.Pytester) -> Project:
    project = project_for(driver, scratch, pytester)
    project.ini("asyncio_mode = auto\n" if driver.is_async else "")
    return project


@pytest.mark.parametrize("driver", SYNC_BACKENDS, ids=lambda d: d.id)
def test_db_session_and_db_connection_share_one_sandbox_in_any_order(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = _project(driver, scratch_databases, pytester)
    pytester.makeconftest(SHARED_CONFTEST)
    project.tests(SHARED)
    project.run().assert_outcomes(passed=3)


@pytest.mark.parametrize("driver", SYNC_BACKENDS, ids=lambda d: d.id)
def test_db_session_uses_the_layers_a_directory_overrides(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = _project(driver, scratch_databases, pytester)
    _override_in_a_directory(pytester, OVERRIDES, OVERRIDDEN_TESTS)
    pytester.makeconftest(SHARED_CONFTEST)
    project.tests(SHARED)  # beside it, the plugin's own layers
    project.run().assert_outcomes(passed=5)


def _override_in_a_directory(pytester: pytest.Pytester, conftest: str, tests: str) -> None:
    """A directory ``own`` whose conftest overrides layers (noting calls in layer_calls)."""
    own = pytester.mkdir("own")
    (own / "layer_calls.py").write_text("CALLED = []\n")
    (own / "conftest.py").write_text(conftest)
    (own / "test_own.py").write_text(tests)


def test_the_plugins_own_layers_are_not_set_up_one_by_one(pytester: pytest.Pytester) -> None:
    """What pytest sets up per test that asks for db_session: db_session alone, not
    db_sessionmaker, db_connection and db_engine (unless a layer is the user's), nor the
    routing fixture (unless something is routed)."""
    project = Project(pytester, None)
    project.ini()
    project.tests(
        "def test_one(db_session):\n    pass\n\n\ndef test_two(db_session):\n    pass\n\n\n"
        "def test_a_unit_test_gets_no_fixture_of_the_plugin():\n    pass\n"
    )
    shown = project.run("--setup-show")
    shown.assert_outcomes(passed=3)
    setups = [line.split()[-1] for line in shown.outlines if "SETUP    F" in line]
    assert setups == ["db_session", "db_session"], shown.outlines


ASYNC_SHARED = """
import pytest
from sqlalchemy import func, insert, select

from models import Item


async def count(session):
    return await session.scalar(select(func.count()).select_from(Item))


async def test_session_first_then_the_connection(async_db_session, async_db_connection):
    assert await async_db_session.connection() is async_db_connection
    await async_db_connection.execute(insert(Item).values(name="core"))
    async_db_session.add(Item(name="orm"))
    await async_db_session.commit()
    assert await count(async_db_session) == 2


async def test_a_fixture_wrote_through_the_connection(written, async_db_session):
    assert (await async_db_session.scalars(select(Item.name))).all() == ["fixture"]


async def test_the_sessionmaker_is_the_sessions(async_db_session, async_db_sessionmaker):
    async with async_db_sessionmaker() as other:
        other.add(Item(name="other"))
        await other.commit()
    assert await count(async_db_session) == 1


async def test_nothing_survives(async_db_session):
    assert await count(async_db_session) == 0
"""

ASYNC_SHARED_CONFTEST = """
import pytest_asyncio
from sqlalchemy import insert

from models import Item


@pytest_asyncio.fixture
async def written(async_db_connection):
    await async_db_connection.execute(insert(Item).values(name="fixture"))
"""

ASYNC_OVERRIDES = """
import pytest
import pytest_asyncio
from layer_calls import CALLED
from sqlalchemy.ext.asyncio import async_sessionmaker


@pytest.fixture
def async_db_sessionmaker(async_db_connection):
    CALLED.append("async_db_sessionmaker")
    return async_sessionmaker(
        bind=async_db_connection,
        info={"made": "by the user"},
        join_transaction_mode="create_savepoint",
    )


@pytest_asyncio.fixture
async def async_db_connection(async_db_connection):
    CALLED.append("async_db_connection")
    return async_db_connection


@pytest_asyncio.fixture
async def async_db_engine(async_db_engine):
    CALLED.append("async_db_engine")
    return async_db_engine
"""

ASYNC_OVERRIDDEN_TESTS = """
from sqlalchemy import func, select

from layer_calls import CALLED
from models import Item


async def test_the_users_layers_are_used(async_db_session):
    assert async_db_session.info == {"made": "by the user"}
    assert CALLED == ["async_db_engine", "async_db_connection", "async_db_sessionmaker"]
    async_db_session.add(Item(name="a"))
    await async_db_session.commit()


async def test_and_still_roll_back(async_db_session):
    assert await async_db_session.scalar(select(func.count()).select_from(Item)) == 0


async def test_the_sessionmaker_asked_for_after_the_session(
    async_db_session, async_db_sessionmaker
):
    assert async_db_sessionmaker.kw["info"] == async_db_session.info == {"made": "by the user"}
"""


@pytest.mark.parametrize("driver", ASYNC_BACKENDS, ids=lambda d: d.id)
def test_async_db_session_and_the_layers_below_share_one_sandbox_in_any_order(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = _project(driver, scratch_databases, pytester)
    pytester.makeconftest(ASYNC_SHARED_CONFTEST)
    project.tests(ASYNC_SHARED)
    project.run().assert_outcomes(passed=4)


@pytest.mark.parametrize("driver", ASYNC_BACKENDS, ids=lambda d: d.id)
def test_async_db_session_uses_the_layers_a_directory_overrides(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = _project(driver, scratch_databases, pytester)
    _override_in_a_directory(pytester, ASYNC_OVERRIDES, ASYNC_OVERRIDDEN_TESTS)
    pytester.makeconftest(ASYNC_SHARED_CONFTEST)
    project.tests(ASYNC_SHARED)  # beside it, the plugin's own layers
    project.run().assert_outcomes(passed=7)


def test_the_plugins_own_async_layers_are_not_set_up_one_by_one(
    pytester: pytest.Pytester,
) -> None:
    """The same for an async test: async_db_session alone, not async_db_sessionmaker,
    async_db_connection and async_db_engine."""
    project = Project(pytester, "sqlite+aiosqlite://")
    project.ini("asyncio_mode = auto\n")
    project.tests(
        "async def test_one(async_db_session):\n    pass\n\n\n"
        "async def test_two(async_db_session):\n    pass\n"
    )
    shown = project.run("--setup-show")
    shown.assert_outcomes(passed=2)
    setups = [line.split()[-1] for line in shown.outlines if "SETUP    F" in line]
    assert setups == ["async_db_session", "async_db_session"], shown.outlines
