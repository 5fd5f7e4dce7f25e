"""alchemy_require_marker (tests that do not ask for the database may not use it) and lazy
routing (a test that never uses a routed engine costs no connection and no schema)."""

from __future__ import annotations

import pytest
from conftest import ASYNC_BACKENDS, SYNC_BACKENDS, Driver, Project, project_for


def _project(driver: Driver, scratch: dict[str, str], pytester: pytest.Pytester) -> Project:
    project = project_for(driver, scratch, pytester)
    base = project.url or ""
    if driver.is_async:
        engine = f"create_async_engine({base!r})"
        imports = "from sqlalchemy.ext.asyncio import create_async_engine"
    else:
        engine = f"create_engine({base!r})"
        imports = "from sqlalchemy import create_engine"
    pytester.makepyfile(app=f"{imports}\nBASE = {base!r}\nengine = {engine}\n")
    return project


SYNC_TESTS = """
import pytest
from sqlalchemy import create_engine, text

import app


def test_a_unit_test():
    assert 1 + 1 == 2


def test_the_applications_engine():
    with app.engine.connect() as connection:
        connection.execute(text("SELECT 1"))


def test_an_engine_of_its_own_on_the_base_database():
    create_engine(app.BASE).connect()


def test_an_error_the_code_swallowed():
    try:
        app.engine.connect()
    except Exception:
        pass


@pytest.mark.alchemy()
def test_marked(db_engine):
    with app.engine.begin() as connection:
        connection.execute(text("INSERT INTO alchemy_item (name) VALUES ('marked')"))
        count = connection.execute(text("SELECT COUNT(*) FROM alchemy_item")).scalar()
    assert count == 1


def test_with_a_fixture(db_session):
    assert db_session.execute(text("SELECT COUNT(*) FROM alchemy_item")).scalar() == 0
"""


@pytest.mark.parametrize("driver", SYNC_BACKENDS, ids=lambda d: d.id)
def test_tests_that_do_not_ask_may_not_use_the_database(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    """With alchemy_require_marker: a routed engine and an engine of the test's own on the
    base database are refused, naming the test and the fix, even when the code swallowed the
    error; marked tests and tests with a database fixture work (the marked one through the
    routed engine, opened at its first use)."""
    project = _project(driver, scratch_databases, pytester)
    project.ini("alchemy_engines = app:engine\nalchemy_require_marker = true\n")
    project.tests(SYNC_TESTS)
    result = project.run("-rfE")
    result.assert_outcomes(passed=4, failed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*DatabaseBlockedError: test_app.py::test_the_applications_engine used the "
            "database (*) without asking for it: alchemy_require_marker is on*",
        ]
    )
    for line in (
        "FAILED test_app.py::test_the_applications_engine - pytest_alchemy.errors.Data*",
        "FAILED test_app.py::test_an_engine_of_its_own_on_the_base_database - pytest_a*",
        "ERROR test_app.py::test_an_error_the_code_swallowed - Failed: DatabaseBlocked*",
    ):
        result.stdout.fnmatch_lines([line])
    assert "mark the test @pytest.mark.alchemy()" in result.stdout.str()


ASYNC_TESTS = """
import pytest
from sqlalchemy import text

import app


@pytest.mark.asyncio
async def test_the_applications_engine():
    async with app.engine.connect() as connection:
        await connection.execute(text("SELECT 1"))


@pytest.mark.asyncio
@pytest.mark.alchemy()
async def test_marked(async_db_engine):
    async with app.engine.connect() as connection:
        await connection.execute(text("SELECT 1"))
"""


@pytest.mark.parametrize("driver", ASYNC_BACKENDS[1:2], ids=lambda d: d.id)
def test_async_engines_are_blocked_too(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = _project(driver, scratch_databases, pytester)
    project.ini("alchemy_engines = app:engine\nalchemy_require_marker = true\n")
    project.tests(ASYNC_TESTS)
    result = project.run("-rf")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*DatabaseBlockedError: *test_the_applications_engine used*"])


def test_a_routed_engine_costs_nothing_until_used(pytester: pytest.Pytester) -> None:
    """Routing is lazy: with the server down, a test that never uses the routed engine passes
    (no connection, no schema build); the one that uses it fails, saying the server is down."""
    url = "postgresql+psycopg://postgres@127.0.0.1:9/app"  # nothing listens on port 9
    project = Project(pytester, url)
    pytester.makepyfile(
        app=f"from sqlalchemy import create_engine\nengine = create_engine({url!r})\n"
    )
    project.ini("alchemy_engines = app:engine\n")
    project.tests(
        """
        from sqlalchemy import text
        import app

        def test_a_unit_test():
            assert True

        def test_another_unit_test():
            assert True

        def test_the_database():
            with app.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        """
    )
    result = project.run("-rfE")
    result.assert_outcomes(passed=2, failed=1)
    assert "building the schema" not in result.stdout.str()
    result.stdout.fnmatch_lines(["*test_the_database*DatabaseUnavailableError*"])


CLEANUP_TESTS = """
import pytest
from sqlalchemy import text

import app


@pytest.fixture(autouse=True)
def cleanup():  # uses the application's engine only after the test
    yield
    with app.engine.begin() as connection:
        connection.execute(text("DELETE FROM alchemy_item"))


def test_a_unit_test_first():  # the run's first use of the database is the teardown above
    assert True


def test_the_engine_in_the_test():
    with app.engine.begin() as connection:
        connection.execute(text("INSERT INTO alchemy_item (name) VALUES ('x')"))


def test_and_nothing_survives():
    with app.engine.connect() as connection:
        assert connection.execute(text("SELECT COUNT(*) FROM alchemy_item")).scalar() == 0
"""


@pytest.mark.parametrize("driver", SYNC_BACKENDS, ids=lambda d: d.id)
def test_a_lazy_route_lives_through_the_tests_fixtures(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    """A fixture that uses a lazily routed engine in its teardown (the first use of the run
    there, or after the test opened the sandbox) runs inside the sandbox, as with the route
    started with the test: the sandbox ends after the test's other fixtures."""
    project = _project(driver, scratch_databases, pytester)
    project.ini("alchemy_engines = app:engine\n")
    project.tests(CLEANUP_TESTS)
    project.run().assert_outcomes(passed=3)
