"""Sessions shaped like the application's: SQLModel's classes with SQLModel metadata, the
class and options the ini names, and a sessionmaker a test may configure."""

from __future__ import annotations

import pytest
from conftest import ASYNC_DRIVERS, SYNC_DRIVERS, Driver, Project, project_for

HEROES = """
from sqlmodel import Field, SQLModel


class Hero(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=50)
"""

SYNC_SQLMODEL = """
from sqlmodel import Session, select

from heroes import Hero


def test_db_session_is_sqlmodels(db_session):
    assert isinstance(db_session, Session)
    db_session.add(Hero(name="Deadpond"))
    db_session.commit()
    assert [hero.name for hero in db_session.exec(select(Hero))] == ["Deadpond"]


def test_the_ini_options_apply(db_session, db_sessionmaker):
    hero = Hero(name="Rusty-Man")
    db_session.add(hero)
    db_session.commit()
    assert "name" in hero.__dict__  # expire_on_commit = false: nothing was expired
    assert db_sessionmaker().expire_on_commit is False
"""

ASYNC_SQLMODEL = """
import pytest
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from heroes import Hero

pytestmark = pytest.mark.asyncio


async def test_async_db_session_is_sqlmodels(async_db_session):
    assert isinstance(async_db_session, AsyncSession)
    hero = Hero(name="Deadpond")
    async_db_session.add(hero)
    await async_db_session.commit()
    assert hero.name == "Deadpond"  # expire_on_commit = false: no lazy load after commit
    heroes = await async_db_session.exec(select(Hero))
    assert [h.name for h in heroes.all()] == ["Deadpond"]


async def test_configure_inside_an_async_test(async_db_sessionmaker):
    async_db_sessionmaker.configure(expire_on_commit=True)
    async with async_db_sessionmaker() as session:
        assert session.sync_session.expire_on_commit is True
        session.add(Hero(name="Rusty-Man"))
        await session.commit()


async def test_configure_is_undone_for_the_next_test(async_db_session):
    assert async_db_session.sync_session.expire_on_commit is False
    assert (await async_db_session.exec(select(Hero))).all() == []
"""

BACKENDS = {"sqlite-pysqlite", "postgresql-psycopg", "mysql-pymysql"}
ASYNC_BACKENDS = {"sqlite-aiosqlite", "postgresql-asyncpg", "mysql-asyncmy"}
DRIVERS = [d for d in SYNC_DRIVERS if d.id in BACKENDS] + [
    d for d in ASYNC_DRIVERS if d.id in ASYNC_BACKENDS
]


@pytest.mark.parametrize("driver", DRIVERS, ids=lambda d: d.id)
def test_sqlmodel_metadata_gives_sqlmodel_sessions_with_the_ini_options(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = project_for(driver, scratch_databases, pytester)
    pytester.makepyfile(heroes=HEROES)
    project.ini(
        "alchemy_metadata = heroes:SQLModel\n"
        "alchemy_session_options =\n    expire_on_commit = false\n    autoflush = True\n",
        metadata=False,
    )
    project.tests(ASYNC_SQLMODEL if driver.is_async else SYNC_SQLMODEL)
    # A process of its own: SQLModel's one registry would otherwise keep another run's Hero.
    project.run(subprocess=True).assert_outcomes(passed=3 if driver.is_async else 2)


SESSION_CLASSES = """
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session


class AppSession(Session):
    pass


class AppAsyncSession(AsyncSession):
    sync_session_class = AppSession
"""


def test_the_session_class_is_the_one_the_ini_names(
    scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    driver = next(d for d in SYNC_DRIVERS if d.id == "sqlite-pysqlite")
    project = project_for(driver, scratch_databases, pytester)
    pytester.makepyfile(appsessions=SESSION_CLASSES)
    project.ini(
        "alchemy_session_class = appsessions:AppSession\n"
        "alchemy_async_session_class = appsessions:AppAsyncSession\n"
    )
    project.tests(
        """
import pytest

from appsessions import AppAsyncSession, AppSession


def test_sync(db_session):
    assert isinstance(db_session, AppSession)  # sessionmaker makes a subclass


@pytest.mark.asyncio
async def test_async(async_db_session):
    assert isinstance(async_db_session, AppAsyncSession)
    assert isinstance(async_db_session.sync_session, AppSession)
"""
    )
    project.run().assert_outcomes(passed=2)


@pytest.mark.parametrize(
    ("ini", "message"),
    [
        (
            "alchemy_session_options = expire_on_comit = false",
            "*alchemy_session_options: 'expire_on_comit' is not a Session option. Valid: *"
            "expire_on_commit*",
        ),
        (
            "alchemy_session_options = join_transaction_mode = rollback_only",
            "*alchemy_session_options: join_transaction_mode is how the session joins the "
            "test's sandbox*",
        ),
        (
            "alchemy_session_options = autoflush = maybe",
            "*the value of autoflush ('maybe') is not a literal*",
        ),
        (
            "alchemy_session_class = appsessions:AppAsyncSession",
            "*alchemy_session_class = 'appsessions:AppAsyncSession' is not a subclass of "
            "sqlalchemy.orm.session.Session*",
        ),
    ],
    ids=["unknown", "reserved", "value", "class"],
)
def test_bad_session_settings_are_usage_errors(
    ini: str, message: str, pytester: pytest.Pytester
) -> None:
    project = Project(pytester, None)
    pytester.makepyfile(appsessions=SESSION_CLASSES)
    project.ini(ini + "\n")
    project.tests("def test_x(db_session):\n    pass\n")
    result = project.run()
    assert result.ret != pytest.ExitCode.OK
    output = pytest.LineMatcher(result.stdout.lines + result.stderr.lines)
    output.fnmatch_lines([message])
    assert "Traceback" not in result.stdout.str()
