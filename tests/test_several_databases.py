"""Several databases in one test (``alchemy_databases``): each gets a test database and a
sandbox of its own, the application's engines join the sandbox of the database they name, and
a read replica's engine sees its primary's sandbox, read-only."""

from __future__ import annotations

import pytest
from conftest import ASYNC_BACKENDS, SYNC_BACKENDS, Driver, Project, project_for
from sqlalchemy.engine import make_url

ANALYTICS_MODELS = """
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Event(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(50))
"""

APP = """
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import sessionmaker

from analytics_models import Event
from models import Item

engine = create_engine(MAIN)
analytics = create_engine(ANALYTICS)
reader = create_engine(REPLICA)
Main = sessionmaker(engine)
Analytics = sessionmaker(analytics)
Reader = sessionmaker(reader)


def signup(name):
    with Main() as session:
        session.add(Item(name=name))
        session.commit()
    with Analytics() as session:
        session.add(Event(kind="signup"))
        session.commit()


def counts():
    with Main() as main, Analytics() as stats:
        return (
            main.scalar(select(func.count()).select_from(Item)),
            stats.scalar(select(func.count()).select_from(Event)),
        )
"""

TESTS = """
import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

import app
from analytics_models import Event
from models import Item
from pytest_alchemy import ReadOnlyReplicaError


def test_the_app_writes_both_databases():
    app.signup("ada")
    assert app.counts() == (1, 1)


def test_both_are_rolled_back():
    assert app.counts() == (0, 0)


def test_the_replica_reads_the_primarys_sandbox(db_session):
    db_session.add(Item(name="ada"))
    db_session.commit()
    with app.Reader() as session:
        assert session.scalars(select(Item.name)).all() == ["ada"]


def test_the_replica_refuses_writes():
    with app.reader.connect() as conn, pytest.raises(ReadOnlyReplicaError, match="read replica"):
        conn.execute(insert(Item).values(name="nope"))


def test_db_connections_by_name(db_connections):
    assert sorted(db_connections) == ["analytics", "default"]
    with Session(db_connections["analytics"], join_transaction_mode="create_savepoint") as s:
        s.add(Event(kind="visit"))
        s.commit()
    assert app.counts() == (0, 1)
    with pytest.raises(KeyError, match="not a database of alchemy_databases"):
        db_connections["nowhere"]
"""


def _urls(project: Project, driver: Driver) -> tuple[str, str, str]:
    main = make_url(project.url or "")
    if driver.backend == "sqlite":
        folder = project.pytester.path
        analytics = main.set(database=str(folder / "analytics.sqlite3")).render_as_string()
        replica = main.set(database=str(folder / "replica.sqlite3")).render_as_string()
    else:
        analytics = main.set(database=f"{main.database}_analytics").render_as_string(False)
        replica = main.set(database=f"{main.database}_replica").render_as_string(False)
    return main.render_as_string(hide_password=False), analytics, replica


def _several(project: Project, driver: Driver) -> None:
    main, analytics, replica = _urls(project, driver)
    app = APP.replace("MAIN", repr(main)).replace("ANALYTICS", repr(analytics))
    project.pytester.makepyfile(
        analytics_models=ANALYTICS_MODELS, app=app.replace("REPLICA", repr(replica))
    )
    project.ini(
        "alchemy_engines =\n    app:engine\n    app:analytics\n    app:reader\n"
        f"alchemy_databases =\n    analytics = {analytics} analytics_models:Base\n"
        f"    reader = {replica} replica of default\n"
    )
    project.tests(TESTS)


@pytest.mark.parametrize("driver", SYNC_BACKENDS, ids=lambda d: d.id)
def test_two_databases_and_a_replica(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = project_for(driver, scratch_databases, pytester)
    _several(project, driver)
    project.run().assert_outcomes(passed=5)
    assert project.leftover_tables() == []
    leftovers = [p.name for p in pytester.path.glob("test_*.sqlite3")]
    assert leftovers == []


@pytest.mark.parametrize("driver", SYNC_BACKENDS, ids=lambda d: d.id)
def test_two_databases_under_xdist(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = project_for(driver, scratch_databases, pytester)
    _several(project, driver)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(passed=5)


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ("analytics", "*alchemy_databases: 'analytics' is not 'name = URL ?module:Base ...?'*"),
        ("default = sqlite://", "*the name 'default' is given twice*"),
        ("x = sqlite:// replica of nowhere", "*'replica of nowhere' names no database*"),
        ("x = notaurl", "*alchemy_databases (x) (ini): not a SQLAlchemy URL*"),
        ("x = sqlite:// pkg.models", "*'pkg.models' is not an import path*"),
        (
            "x = sqlite:///a.db\n    y = sqlite:///a.db replica of x",
            "*alchemy_databases: y (sqlite:///a.db) is the database of x as well*",
        ),
    ],
)
def test_bad_databases_are_usage_errors(
    lines: str, expected: str, pytester: pytest.Pytester
) -> None:
    project = Project(pytester, None)
    project.ini(f"alchemy_databases =\n    {lines}\n")
    project.tests("def test_x():\n    pass\n")
    result = project.run()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([expected])


ASYNC_APP = """
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from analytics_models import Event
from models import Item

engine = create_async_engine(MAIN)
analytics = create_async_engine(ANALYTICS)
reader = create_async_engine(REPLICA)
Main = async_sessionmaker(engine)
Analytics = async_sessionmaker(analytics)
Reader = async_sessionmaker(reader)


async def signup(name):
    async with Main() as session:
        session.add(Item(name=name))
        await session.commit()
    async with Analytics() as session:
        session.add(Event(kind="signup"))
        await session.commit()


async def counts():
    async with Main() as main, Analytics() as stats:
        return (
            await main.scalar(select(func.count()).select_from(Item)),
            await stats.scalar(select(func.count()).select_from(Event)),
        )
"""

ASYNC_TESTS = """
import pytest
from sqlalchemy import insert, select

import app
from models import Item
from pytest_alchemy import ReadOnlyReplicaError


@pytest.mark.asyncio
async def test_the_app_writes_both_databases():
    await app.signup("ada")
    assert await app.counts() == (1, 1)


@pytest.mark.asyncio
async def test_both_are_rolled_back():
    assert await app.counts() == (0, 0)


@pytest.mark.asyncio
async def test_the_replica_reads_the_primary_and_refuses_writes():
    await app.signup("ada")
    async with app.Reader() as session:
        assert (await session.scalars(select(Item.name))).all() == ["ada"]
    async with app.reader.connect() as conn:
        with pytest.raises(ReadOnlyReplicaError, match="read replica"):
            await conn.execute(insert(Item).values(name="nope"))
"""


@pytest.mark.parametrize("driver", ASYNC_BACKENDS, ids=lambda d: d.id)
def test_async_engines_on_two_databases_and_a_replica(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = project_for(driver, scratch_databases, pytester)
    main, analytics, replica = _urls(project, driver)
    source = ASYNC_APP.replace("MAIN", repr(main)).replace("ANALYTICS", repr(analytics))
    pytester.makepyfile(
        analytics_models=ANALYTICS_MODELS, app=source.replace("REPLICA", repr(replica))
    )
    project.ini(
        "alchemy_engines =\n    app:engine\n    app:analytics\n    app:reader\n"
        f"alchemy_databases =\n    analytics = {analytics} analytics_models:Base\n"
        f"    reader = {replica} replica of default\n"
    )
    project.tests(ASYNC_TESTS)
    project.run().assert_outcomes(passed=3)
    assert project.leftover_tables() == []


def test_a_named_database_whose_server_is_down_is_a_clear_error(pytester: pytest.Pytester) -> None:
    project = Project(pytester, None)
    pytester.makepyfile(
        analytics_models=ANALYTICS_MODELS,
        app="from sqlalchemy import create_engine\n"
        "analytics = create_engine('postgresql+psycopg://postgres@127.0.0.1:1/analytics')\n",
    )
    project.ini(
        "alchemy_engines = app:analytics\nalchemy_databases =\n"
        "    analytics = postgresql+psycopg://postgres@127.0.0.1:1/analytics "
        "analytics_models:Base\n"
    )
    project.tests("def test_x():\n    pass\n")
    result = project.run()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*DatabaseUnavailableError: Cannot connect to the test database "
            "postgresql+psycopg://postgres@127.0.0.1:1/test_analytics (derived from "
            "alchemy_databases (analytics) (ini))*Start the server, or point "
            "alchemy_databases (analytics) at a reachable database."
        ]
    )
    assert "None" not in result.stdout.str()
    assert "During handling" not in result.stdout.str()  # one message, not two
