"""Several schemas in one run: a directory, module or class overrides the ``alchemy_metadata``
fixture, and its tests get a test database of their own built from that schema."""

from __future__ import annotations

import textwrap

import pytest
from conftest import (
    ASYNC_BACKENDS,
    SYNC_BACKENDS,
    SYNC_DRIVERS,
    Driver,
    Project,
    admin,
    project_for,
    subset,
)
from sqlalchemy import text

# Two declarative bases, each with a table "users", with different columns.
USERS = """
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    {column}: Mapped[str] = mapped_column(String(50))
"""

HEROES = """
from sqlmodel import Field, SQLModel


class Hero(SQLModel, table=True):
    __tablename__ = "users"
    id: int | None = Field(default=None, primary_key=True)
    alias: str
"""

ROOT_CONFTEST = """
import pytest
from sqlalchemy import inspect


@pytest.fixture(scope="session")
def columns(db_engine):
    # A session fixture built on db_engine: made again for each schema.
    return sorted(c["name"] for c in inspect(db_engine).get_columns("users"))
"""

OVERRIDE = """
import pytest


@pytest.fixture(scope="session")
def alchemy_metadata():
    return {value}
"""

SYNC_TESTS = """
from sqlalchemy import func, select

from {module} import User


def test_commits_in_its_own_schema(db_session, columns):
    assert columns == ["id", "{column}"]
    db_session.add(User({column}="a"))
    db_session.commit()
    assert db_session.scalar(select(func.count()).select_from(User)) == 1


def test_sees_nothing_of_the_last_test(db_session):
    assert db_session.scalar(select(func.count()).select_from(User)) == 0
"""

ASYNC_TESTS = """
import pytest
from sqlalchemy import func, select

from {module} import User


@pytest.mark.asyncio
async def test_commits_in_its_own_schema(async_db_session):
    async_db_session.add(User({column}="a"))
    await async_db_session.commit()
    assert await async_db_session.scalar(select(func.count()).select_from(User)) == 1
    names = await async_db_session.execute(select(User.{column}))
    assert names.scalars().all() == ["a"]


@pytest.mark.asyncio
async def test_sees_nothing_of_the_last_test(async_db_session):
    assert await async_db_session.scalar(select(func.count()).select_from(User)) == 0
"""

MODULE_OVERRIDE_TESTS = """
import pytest
from sqlalchemy import func, select

from legacy import User


@pytest.fixture(scope="session")
def alchemy_metadata():
    return "legacy:Base"


def test_a_module_gives_itself_a_schema(db_session, columns):
    assert columns == ["id", "login"]
    db_session.add(User(login="a"))
    db_session.commit()
    assert db_session.scalar(select(func.count()).select_from(User)) == 1


class TestAClassOfItsOwn:
    @pytest.fixture(scope="session")
    @classmethod
    def alchemy_metadata(cls):
        return "modern:Base"

    def test_a_class_gives_itself_a_schema(self, db_session, columns):
        assert columns == ["id", "mail"]
"""


def _layout(project: Project, *, is_async: bool) -> None:
    """tests/legacy (the ini's schema), tests/modern (its conftest overrides the fixture),
    tests/again (the ini's once more, after a switch), and a module and a class of their own."""
    pytester = project.pytester
    pytester.makepyfile(
        legacy=USERS.format(column="login"),
        modern=USERS.format(column="mail"),
    )
    project.ini("alchemy_metadata = legacy:Base\n", metadata=False)
    pytester.makeconftest(ROOT_CONFTEST)
    tests = ASYNC_TESTS if is_async else SYNC_TESTS
    for folder, module, column in (
        ("t1_legacy", "legacy", "login"),
        ("t2_modern", "modern", "mail"),
        ("t3_again", "legacy", "login"),
    ):
        path = pytester.mkdir(folder)
        (path / f"test_{folder}.py").write_text(
            textwrap.dedent(tests.format(module=module, column=column))
        )
        if module == "modern":
            (path / "conftest.py").write_text(OVERRIDE.format(value="'modern:Base'"))
    if not is_async:
        (pytester.mkdir("t4_module") / "test_module.py").write_text(MODULE_OVERRIDE_TESTS)


def _databases_left(project: Project) -> list[str]:
    url = project.sync_url()
    if url is None or url.get_backend_name() == "sqlite":
        return []
    engine = admin(url)
    query = (
        "SELECT datname FROM pg_database"
        if url.get_backend_name() == "postgresql"
        else "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA"
    )
    try:
        with engine.connect() as conn:
            names = conn.execute(text(query)).scalars().all()
    finally:
        engine.dispose()
    return [n for n in names if n.startswith(f"test_{url.database}")]


SCHEMA_DRIVERS = [*SYNC_BACKENDS, *subset(SYNC_DRIVERS, "sqlite-memory")]


@pytest.mark.parametrize("driver", SCHEMA_DRIVERS, ids=lambda d: d.id)
def test_directories_with_colliding_tables_run_as_one_suite(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = project_for(driver, scratch_databases, pytester)
    _layout(project, is_async=False)
    result = project.run("-v")
    result.assert_outcomes(passed=8)
    assert _databases_left(project) == []
    if project.sync_url() is not None:
        assert project.base_tables() == []


@pytest.mark.parametrize(
    "driver",
    ASYNC_BACKENDS,
    ids=lambda d: d.id,
)
def test_async_directories_with_colliding_tables_run_as_one_suite(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = project_for(driver, scratch_databases, pytester)
    _layout(project, is_async=True)
    project.run("-v").assert_outcomes(passed=6)
    assert _databases_left(project) == []


@pytest.mark.parametrize(
    "driver",
    SYNC_BACKENDS,
    ids=lambda d: d.id,
)
def test_several_schemas_under_xdist(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = project_for(driver, scratch_databases, pytester)
    _layout(project, is_async=False)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(passed=8)
    assert _databases_left(project) == []


def test_a_sqlmodel_directory_beside_a_sqlalchemy_one(pytester: pytest.Pytester) -> None:
    """SQLModel's tests get SQLModel's Session (``.exec``) in their own database."""
    project = Project(pytester, None)
    pytester.makepyfile(legacy=USERS.format(column="login"), heroes=HEROES)
    project.ini("alchemy_metadata = legacy:Base\n", metadata=False)
    (pytester.mkdir("t1_orm") / "test_orm.py").write_text(
        SYNC_TESTS.format(module="legacy", column="login")
    )
    pytester.makeconftest(ROOT_CONFTEST)
    heroes = pytester.mkdir("t2_heroes")
    (heroes / "conftest.py").write_text(OVERRIDE.format(value="__import__('heroes').SQLModel"))
    (heroes / "test_heroes.py").write_text(
        textwrap.dedent(
            """
            from sqlmodel import Session, select

            from heroes import Hero


            def test_sqlmodel_session(db_session):
                assert isinstance(db_session, Session)
                db_session.add(Hero(alias="Deadpond"))
                db_session.commit()
                assert db_session.exec(select(Hero.alias)).all() == ["Deadpond"]
            """
        )
    )
    project.run().assert_outcomes(passed=3)


def test_colliding_tables_in_one_fixture_are_a_usage_error(pytester: pytest.Pytester) -> None:
    project = Project(pytester, None)
    pytester.makepyfile(legacy=USERS.format(column="login"), modern=USERS.format(column="mail"))
    project.ini(metadata=False)
    pytester.makeconftest(OVERRIDE.format(value="['legacy:Base', 'modern:Base']"))
    project.tests("def test_x(db_session):\n    pass\n")
    result = project.run()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*the alchemy_metadata fixture: 'legacy:Base' and 'modern:Base' both define the "
            "table 'users', and they are built into one test database*"
        ]
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("42", "*the alchemy_metadata fixture = '42' is a int, not a MetaData*"),
        ("'nowhere'", "*the alchemy_metadata fixture = 'nowhere' is not an import path*"),
        ("'legacy:Missing'", "*has no attribute 'Missing'*"),
        ("[]", "*the alchemy_metadata fixture returned an empty list*"),
    ],
)
def test_a_bad_fixture_value_is_a_clear_error(
    value: str, expected: str, pytester: pytest.Pytester
) -> None:
    project = Project(pytester, None)
    pytester.makepyfile(legacy=USERS.format(column="login"))
    project.ini(metadata=False)
    pytester.makeconftest(OVERRIDE.format(value=value))
    project.tests("def test_x(db_session):\n    pass\n")
    result = project.run()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([expected])


def test_the_ini_schema_by_another_name_shares_its_database(pytester: pytest.Pytester) -> None:
    project = Project(pytester, "sqlite:///" + str(pytester.path / "app.sqlite3"))
    project.ini()
    (pytester.mkdir("other") / "conftest.py").write_text(
        OVERRIDE.format(value="__import__('models').Base")
    )
    test = (
        "def test_x(db_session):\n"
        "    assert db_session.get_bind().engine.url.database.endswith({!r})\n"
    )
    project.tests(test.format("/test_app.sqlite3"))
    (pytester.path / "other" / "test_other.py").write_text(test.format("/test_app.sqlite3"))
    project.run().assert_outcomes(passed=2)


def test_a_fixture_of_a_narrower_scope_is_a_usage_error(pytester: pytest.Pytester) -> None:
    project = Project(pytester, None)
    pytester.makepyfile(legacy=USERS.format(column="login"))
    project.ini(metadata=False)
    sub = pytester.mkdir("sub")
    (sub / "conftest.py").write_text(
        "import pytest\n\n\n@pytest.fixture\ndef alchemy_metadata():\n    return 'legacy:Base'\n"
    )
    (sub / "test_x.py").write_text("def test_x(db_session):\n    pass\n")
    result = project.run()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "*The alchemy_metadata fixture of sub is function-scoped; it chooses the schema of "
            "db_engine, which is session-scoped, so it must be too*"
        ]
    )


ESCAPING_TESTS = """
from sqlalchemy import func, insert, select

from modern import User


def test_escapes_through_db_engine(db_engine):
    with db_engine.begin() as conn:
        conn.execute(insert(User).values(mail="escaped"))


def test_after_the_escape(db_session):
    assert db_session.scalar(select(func.count()).select_from(User)) == 0
"""


@pytest.mark.parametrize(
    "driver",
    SYNC_BACKENDS,
    ids=lambda d: d.id,
)
def test_an_escape_in_a_schema_of_its_own_restores_that_database(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = project_for(driver, scratch_databases, pytester)
    pytester.makepyfile(legacy=USERS.format(column="login"), modern=USERS.format(column="mail"))
    project.ini("alchemy_metadata = legacy:Base\n", metadata=False)
    modern = pytester.mkdir("modern_tests")
    (modern / "conftest.py").write_text(OVERRIDE.format(value="'modern:Base'"))
    (modern / "test_escape.py").write_text(ESCAPING_TESTS)
    # Under xdist, where the worker's database is cloned from a template, and is again
    # (a run in one process builds it again: test_commit's failed restore). One worker runs
    # the file in order, so the test after the escape checks the restored database.
    result = pytester.runpytest_inprocess(
        "-p", "no:cacheprovider", "-p", "no:randomly", "-n", "2", "--dist", "loadfile"
    )
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*_s*committed to the test database outside the test's sandbox*"
            "The test database *_s* was cloned from the template again*"
        ]
    )
    assert _databases_left(project) == []


@pytest.mark.parametrize(
    "driver",
    [d for d in SYNC_DRIVERS if d.id in ("postgresql-psycopg", "mysql-pymysql")],
    ids=lambda d: d.id,
)
def test_a_schema_of_its_own_is_reused_by_fingerprint(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = project_for(driver, scratch_databases, pytester)
    _layout(project, is_async=False)
    first = project.run("--alchemy-reuse")
    first.assert_outcomes(passed=8)
    first.stdout.fnmatch_lines(["*built the schema of modern:Base (1 table) into *_s*_template*"])
    kept = _databases_left(project)
    assert len([name for name in kept if "_s" in name.rpartition("selftest")[2]]) == 2, kept
    second = project.run("--alchemy-reuse")
    second.assert_outcomes(passed=8)
    assert "built the schema" not in second.stdout.str()


APP = """
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

engine = create_engine(APP_URL)
SessionLocal = sessionmaker(engine)
"""

ROUTED_TESTS = """
from sqlalchemy import func, select

import app
from {module} import User


def test_the_app_writes_in_the_tests_schema():
    with app.SessionLocal() as session:
        session.add(User({column}="a"))
        session.commit()
    with app.SessionLocal() as session:
        assert session.scalars(select(User.{column})).all() == ["a"]


def test_and_leaves_nothing():
    with app.SessionLocal() as session:
        assert session.scalar(select(func.count()).select_from(User)) == 0
"""


@pytest.mark.parametrize("driver", SCHEMA_DRIVERS, ids=lambda d: d.id)
def test_the_applications_engines_follow_the_tests_schema(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    """Tests that use no fixture of the plugin's, only the app's routed engine."""
    project = project_for(driver, scratch_databases, pytester)
    pytester.makepyfile(
        legacy=USERS.format(column="login"),
        modern=USERS.format(column="mail"),
        app=APP.replace("APP_URL", repr(project.url or "sqlite://")),
    )
    project.ini("alchemy_metadata = legacy:Base\nalchemy_engines = app:engine\n", metadata=False)
    for folder, module, column in (
        ("t1_legacy", "legacy", "login"),
        ("t2_modern", "modern", "mail"),
        ("t3_again", "legacy", "login"),
    ):
        path = pytester.mkdir(folder)
        source = ROUTED_TESTS.format(module=module, column=column)
        (path / f"test_{folder}.py").write_text(source)
        if module == "modern":
            (path / "conftest.py").write_text(OVERRIDE.format(value="'modern:Base'"))
    project.run().assert_outcomes(passed=6)
    assert _databases_left(project) == []
    if project.sync_url() is not None:
        assert project.base_tables() == []
