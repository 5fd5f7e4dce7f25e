"""The application's own engines, routed into the test's sandbox without changing the app.

Each scenario is a small application written the ordinary way (an engine and a sessionmaker
at module level, a FastAPI or Flask app), run through the plugin. Each proves its point the hard
way: the app commits, the test sees the rows, and a later test sees an empty table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from conftest import (
    ASYNC_BACKENDS,
    ASYNC_DRIVERS,
    LOOP_TROUBLE,
    SYNC_BACKENDS,
    SYNC_DRIVERS,
    Driver,
    project_for,
    run_in_one_process,
    subset,
)
from sqlalchemy.engine import make_url

if TYPE_CHECKING:
    from conftest import Project


def _project(
    request: pytest.FixtureRequest,
    scratch: dict[str, str],
    pytester: pytest.Pytester,
) -> Project:
    driver: Driver = request.param
    return project_for(driver, scratch, pytester)


@pytest.fixture(params=SYNC_BACKENDS, ids=lambda d: d.id)
def sync_backend(
    request: pytest.FixtureRequest, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> Project:
    return _project(request, scratch_databases, pytester)


@pytest.fixture(params=ASYNC_BACKENDS, ids=lambda d: d.id)
def async_backend(
    request: pytest.FixtureRequest, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> Project:
    return _project(request, scratch_databases, pytester)


def _app(project: Project, source: str, name: str = "app") -> None:
    """The application module, its engine on the database the project's URL names.

    That is the app's own database (the test database is derived from it), as an app's
    settings would name it; routing must keep the app away from it.
    """
    url = project.url or "sqlite://"
    project.pytester.makepyfile(**{name: source.replace("APP_URL", repr(url))})


SYNC_APP = """
from sqlalchemy import create_engine, func, insert, select
from sqlalchemy.orm import sessionmaker

from models import Item

engine = create_engine(APP_URL)
SessionLocal = sessionmaker(engine)


def add_with_session(name):
    with SessionLocal() as session:
        session.add(Item(name=name))
        session.commit()


def add_with_begin(name):
    with engine.begin() as conn:
        conn.execute(insert(Item).values(name=name))


def add_with_connect(name):
    with engine.connect() as conn:
        conn.execute(insert(Item).values(name=name))
        conn.commit()


def names():
    with SessionLocal() as session:
        return sorted(session.scalars(select(Item.name)))
"""

SYNC_TESTS = """
import pytest
from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

import app
from models import Item


def test_app_commits_through_sessionmaker_begin_and_connect():
    app.add_with_session("a")
    app.add_with_begin("b")
    app.add_with_connect("c")
    assert app.names() == ["a", "b", "c"]


def test_a_later_test_sees_none_of_it():
    assert app.names() == []


def test_app_rollbacks_return_to_the_app_savepoint():
    app.add_with_session("kept")
    with app.SessionLocal() as session:
        session.add(Item(name="kept"))
        with pytest.raises(IntegrityError):
            session.commit()
        session.rollback()
        session.add(Item(name="after"))
        session.commit()
    with app.engine.connect() as conn:
        nested = conn.begin_nested()
        conn.execute(insert(Item).values(name="undone"))
        nested.rollback()
        conn.execute(insert(Item).values(name="nested"))
        conn.commit()
    assert app.names() == ["after", "kept", "nested"]


def test_app_and_db_session_see_each_other(db_session):
    db_session.add(Item(name="fixture"))
    db_session.commit()
    app.add_with_session("app")
    assert sorted(db_session.scalars(select(Item.name))) == ["app", "fixture"]
    assert app.names() == ["app", "fixture"]


def test_sessions_that_finish_out_of_order(db_session):
    db_session.add(Item(name="mine"))
    db_session.flush()  # the test's savepoint first
    held = app.SessionLocal()
    held.add(Item(name="held"))
    held.flush()  # the app's savepoint above it
    db_session.commit()  # released once the app's is done
    held.commit()
    held.close()
    assert app.names() == ["held", "mine"]


def test_raw_dbapi_connection_commits_and_rolls_back_in_the_sandbox():
    raw = app.engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("INSERT INTO alchemy_item (name) VALUES ('raw')")
        cursor.close()
        raw.commit()
        cursor = raw.cursor()
        cursor.execute("INSERT INTO alchemy_item (name) VALUES ('undone')")
        cursor.close()
        raw.rollback()
        cursor = raw.cursor()
        cursor.execute("INSERT INTO alchemy_item (name) VALUES ('closed')")
        cursor.close()
    finally:
        raw.close()  # without commit: discarded
    assert app.names() == ["raw"]


def test_an_isolation_level_is_moot_but_autocommit_is_refused():
    from pytest_alchemy import UnsandboxedEngineError

    with app.engine.connect().execution_options(isolation_level="SERIALIZABLE") as conn:
        conn.execute(insert(Item).values(name="serializable"))
        conn.commit()
    assert app.names() == ["serializable"]
    with app.engine.connect() as conn:
        with pytest.raises(UnsandboxedEngineError, match="AUTOCOMMIT"):
            conn.execution_options(isolation_level="AUTOCOMMIT")
    assert app.names() == ["serializable"]


def test_raw_commit_through_the_app_engine_is_refused():
    from pytest_alchemy import SandboxBrokenError

    with app.engine.connect() as conn:
        with pytest.raises(SandboxBrokenError, match="refused"):
            conn.exec_driver_sql("COMMIT")


@pytest.mark.parametrize("n", range(2))
def test_what_the_app_notes_on_a_connection_lasts_the_test(n):
    with app.engine.connect() as conn:
        assert "noted" not in conn.info
        conn.info["noted"] = n


def test_the_driver_committing_ends_the_sandbox_and_the_database_is_restored():
    app.add_with_session("escaped")
    with app.engine.connect() as conn:
        conn.connection.dbapi_connection.commit()


def test_and_nothing_survives(db_session):
    assert db_session.scalars(select(Item.name)).all() == []
    assert app.names() == []
"""


@pytest.mark.parametrize("driver", SYNC_DRIVERS, ids=lambda d: d.id)
def test_module_level_engine_and_sessionmaker_join_the_sandbox(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = project_for(driver, scratch_databases, pytester)
    _app(project, SYNC_APP)
    project.ini("alchemy_engines = app:SessionLocal\n")
    project.tests(SYNC_TESTS)
    result = project.run("-v")
    # The raw COMMIT is refused in the test, and the refusal fails that test at teardown; the
    # driver's own commit ends the sandbox, which fails that test, and the next test's routed
    # engine works on the connection made for it after the restore.
    result.assert_outcomes(passed=12, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*test_raw_commit_through_the_app_engine_is_refused ERROR*",
            "*test_the_driver_committing_ends_the_sandbox_and_the_database_is_restored ERROR*",
        ]
    )
    result.stdout.fnmatch_lines(["*SandboxBrokenError: The test's outer transaction ended*"])
    assert project.leftover_tables() == []


ASYNC_APP = """
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from models import Item

engine = create_async_engine(APP_URL)
SessionLocal = async_sessionmaker(engine, expire_on_commit=False)


async def add_with_session(name):
    async with SessionLocal() as session:
        session.add(Item(name=name))
        await session.commit()


async def add_with_begin(name):
    async with engine.begin() as conn:
        await conn.execute(insert(Item).values(name=name))


async def add_with_connect(name):
    async with engine.connect() as conn:
        await conn.execute(insert(Item).values(name=name))
        await conn.commit()


async def names():
    async with SessionLocal() as session:
        return sorted(await session.scalars(select(Item.name)))
"""

ASYNC_TESTS = """
import asyncio

import pytest
from sqlalchemy import select

import app
from models import Item

pytestmark = pytest.mark.asyncio


async def test_app_commits_through_sessionmaker_begin_and_connect():
    await app.add_with_session("a")
    await app.add_with_begin("b")
    await app.add_with_connect("c")
    assert await app.names() == ["a", "b", "c"]


async def test_a_later_test_sees_none_of_it():
    assert await app.names() == []


async def test_tasks_the_test_spawns_land_in_the_sandbox():
    tasks = [asyncio.create_task(app.add_with_session(f"task{i}")) for i in range(4)]
    await asyncio.gather(*tasks, app.add_with_begin("begin"))
    assert await app.names() == ["begin", "task0", "task1", "task2", "task3"]


async def test_app_and_async_db_session_see_each_other(async_db_session):
    async_db_session.add(Item(name="fixture"))
    await async_db_session.commit()
    await app.add_with_session("app")
    assert sorted(await async_db_session.scalars(select(Item.name))) == ["app", "fixture"]


@pytest.mark.parametrize("n", range(2))
async def test_what_the_app_notes_on_a_connection_lasts_the_test(n):
    async with app.engine.connect() as conn:
        assert "noted" not in conn.info
        conn.info["noted"] = n


async def test_and_nothing_survives(async_db_session):
    assert (await async_db_session.scalars(select(Item.name))).all() == []
    assert await app.names() == []
"""


@pytest.mark.parametrize("driver", ASYNC_DRIVERS, ids=lambda d: d.id)
def test_async_engine_and_sessionmaker_join_the_sandbox(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = project_for(driver, scratch_databases, pytester)
    _app(project, ASYNC_APP)
    project.ini("alchemy_engines = app:SessionLocal\n")
    project.tests(ASYNC_TESTS)
    project.run().assert_outcomes(passed=7)
    assert project.leftover_tables() == []


FASTAPI_ASYNC = """
from fastapi import Depends, FastAPI
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from models import Item

engine = create_async_engine(APP_URL)
SessionLocal = async_sessionmaker(engine, expire_on_commit=False)
api = FastAPI()


async def get_session():
    async with SessionLocal() as session:
        yield session


@api.post("/items/{name}")
async def create(name: str, session: AsyncSession = Depends(get_session)):
    session.add(Item(name=name))
    await session.commit()
    return {"count": await session.scalar(select(func.count(Item.id)))}
"""

FASTAPI_ASYNC_TESTS = """
import httpx
import pytest
from sqlalchemy import func, select

import app
from models import Item

pytestmark = pytest.mark.asyncio


async def post(name):
    transport = httpx.ASGITransport(app=app.api)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        response = await client.post(f"/items/{name}")
        response.raise_for_status()
        return response.json()


async def test_the_endpoint_commits_into_the_sandbox(async_db_session):
    assert await post("a") == {"count": 1}
    assert await post("b") == {"count": 2}
    assert await async_db_session.scalar(select(func.count(Item.id))) == 2


async def test_a_later_request_sees_an_empty_table():
    assert await post("c") == {"count": 1}


async def test_and_nothing_survives(async_db_session):
    assert await async_db_session.scalar(select(func.count(Item.id))) == 0
"""


def test_fastapi_async_app_through_asgi_transport(async_backend: Project) -> None:
    _app(async_backend, FASTAPI_ASYNC)
    async_backend.ini("alchemy_engines = app:engine\n")
    async_backend.tests(FASTAPI_ASYNC_TESTS)
    async_backend.run().assert_outcomes(passed=3)


FASTAPI_SYNC = """
from fastapi import Depends, FastAPI
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from models import Item

engine = create_engine(APP_URL)
SessionLocal = sessionmaker(engine)
api = FastAPI()


def get_session():
    with SessionLocal() as session:
        yield session


@api.post("/items/{name}")
def create(name: str, session: Session = Depends(get_session)):
    session.add(Item(name=name))
    session.commit()
    return {"count": session.scalar(select(func.count(Item.id)))}
"""

FASTAPI_SYNC_TESTS = """
from concurrent.futures import ThreadPoolExecutor

from fastapi.testclient import TestClient
from sqlalchemy import func, select

import app
from models import Item


def test_the_endpoint_commits_into_the_sandbox(db_session):
    with TestClient(app.api) as client:
        assert client.post("/items/a").json() == {"count": 1}
        assert client.post("/items/b").json() == {"count": 2}
    assert db_session.scalar(select(func.count(Item.id))) == 2


def test_concurrent_requests_take_turns_on_the_connection():
    with TestClient(app.api) as client, ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda i: client.post(f"/items/t{i}"), range(8)))
    assert all(response.status_code == 200 for response in responses)
    # Requests interleave between their commit and their count, as on a real database; the
    # one that committed last counts all eight.
    assert max(response.json()["count"] for response in responses) == 8
    with app.SessionLocal() as session:
        assert session.scalar(select(func.count(Item.id))) == 8


def test_and_nothing_survives(db_session):
    assert db_session.scalar(select(func.count(Item.id))) == 0
"""


@pytest.mark.parametrize("driver", SYNC_DRIVERS, ids=lambda d: d.id)
def test_sync_fastapi_app_through_testclient(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = project_for(driver, scratch_databases, pytester)
    _app(project, FASTAPI_SYNC)
    project.ini("alchemy_engines = app:SessionLocal\n")
    project.tests(FASTAPI_SYNC_TESTS)
    # Starlette 1.x asks for httpx2, which needs Python 3.11+.
    project.run("-W", "ignore:Using `httpx`:UserWarning").assert_outcomes(passed=3)


FLASK_APP = """
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import func, select

from models import Base, Item

db = SQLAlchemy(model_class=Base)
app = Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = APP_URL
db.init_app(app)


@app.post("/items/<name>")
def create(name):
    db.session.add(Item(name=name))
    db.session.commit()
    return {"count": db.session.scalar(select(func.count(Item.id)))}
"""

FLASK_TESTS = """
from sqlalchemy import func, select

from flaskapp import app, db
from models import Item


def test_the_view_commits_into_the_sandbox(db_session):
    client = app.test_client()
    assert client.post("/items/a").json == {"count": 1}
    assert client.post("/items/b").json == {"count": 2}
    assert db_session.scalar(select(func.count(Item.id))) == 2
    with app.app_context():
        assert db.session.scalar(select(func.count(Item.id))) == 2


def test_and_nothing_survives(db_session):
    assert db_session.scalar(select(func.count(Item.id))) == 0
    with app.app_context():
        assert db.session.scalar(select(func.count(Item.id))) == 0
"""


def test_flask_sqlalchemy_db_session_joins_the_sandbox(sync_backend: Project) -> None:
    _app(sync_backend, FLASK_APP, "flaskapp")
    sync_backend.ini("alchemy_engines = flaskapp:db\n")
    sync_backend.tests(FLASK_TESTS)
    sync_backend.run().assert_outcomes(passed=2)


# The app context pushed for the whole run (what Flask-Migrate's env.py needs while the schema
# is built): db.session then lives across tests unless something removes it.
FLASK_RUN_CONTEXT_TESTS = """
import pytest
from sqlalchemy import func, select

from flaskapp import app, db
from models import Item


@pytest.fixture(scope="session", autouse=True)
def app_context():
    with app.app_context():
        yield


@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_each_test_gets_a_session_in_its_own_sandbox(name):
    assert app.test_client().post(f"/items/{name}").json == {"count": 1}
    db.session.add(Item(name=name + "2"))  # left pending: the test's end discards it
    assert db.session.scalar(select(func.count(Item.id))) == 2


def test_and_nothing_survives(db_session):
    assert db_session.scalar(select(func.count(Item.id))) == 0
    assert db.session.scalar(select(func.count(Item.id))) == 0
"""


def test_a_flask_app_context_pushed_for_the_run_gets_a_fresh_db_session_per_test(
    sync_backend: Project,
) -> None:
    """Flask removes db.session when a request's app context ends; with one context for the
    run, the plugin removes it when each test ends, with the sandbox it used."""
    _app(sync_backend, FLASK_APP, "flaskapp")
    sync_backend.ini("alchemy_engines = flaskapp:db\n")
    sync_backend.tests(FLASK_RUN_CONTEXT_TESTS)
    sync_backend.run().assert_outcomes(passed=4)
    assert sync_backend.leftover_tables() == []


SQLMODEL_APP = """
from sqlmodel import Field, Session, SQLModel, create_engine, select


class Hero(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=50)


engine = create_engine(APP_URL)


def create_hero(name):
    with Session(engine) as session:
        session.add(Hero(name=name))
        session.commit()


def hero_names():
    with Session(engine) as session:
        return sorted(hero.name for hero in session.exec(select(Hero)))
"""

SQLMODEL_TESTS = """
from heroes import create_hero, hero_names


def test_the_app_commits_into_the_sandbox():
    create_hero("Deadpond")
    create_hero("Rusty-Man")
    assert hero_names() == ["Deadpond", "Rusty-Man"]


def test_and_nothing_survives():
    assert hero_names() == []
"""


def test_sqlmodel_app_joins_the_sandbox(sync_backend: Project) -> None:
    _app(sync_backend, SQLMODEL_APP, "heroes")
    sync_backend.ini(
        "alchemy_metadata = heroes:SQLModel.metadata\nalchemy_engines = heroes:engine\n",
        metadata=False,
    )
    sync_backend.tests(SQLMODEL_TESTS)
    sync_backend.run().assert_outcomes(passed=2)


TWO_ENGINES_APP = """
from sqlalchemy import create_engine, select
from sqlalchemy.orm import sessionmaker

from models import Item, Tag

items_engine = create_engine(APP_URL)
tags_engine = create_engine(APP_URL, pool_size=2)
SessionLocal = sessionmaker(binds={Item: items_engine, Tag: tags_engine})


def add(name):
    with SessionLocal() as session:
        item = Item(name=name)
        session.add(item)
        session.flush()
        session.add(Tag(item_id=item.id))
        session.commit()


def counts():
    with items_engine.connect() as items, tags_engine.connect() as tags:
        return (
            len(items.execute(select(Item.id)).all()),
            len(tags.execute(select(Tag.id)).all()),
        )
"""

TWO_ENGINES_TESTS = """
import app


def test_both_binds_commit_into_the_sandbox():
    app.add("a")
    app.add("b")
    assert app.counts() == (2, 2)


def test_and_nothing_survives():
    assert app.counts() == (0, 0)
"""


def test_a_binds_session_over_two_engines_joins_the_sandbox(sync_backend: Project) -> None:
    _app(sync_backend, TWO_ENGINES_APP)
    sync_backend.ini("alchemy_engines = app:SessionLocal\n")
    sync_backend.tests(TWO_ENGINES_TESTS)
    sync_backend.run().assert_outcomes(passed=2)


THREADS_TESTS = """
import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

import app


def test_a_thread_pool_lands_in_the_sandbox():
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(app.add_with_session, [f"t{i}" for i in range(8)]))
    assert app.names() == [f"t{i}" for i in range(8)]


@pytest.mark.asyncio
async def test_to_thread_lands_in_the_sandbox():
    await asyncio.to_thread(app.add_with_begin, "threaded")
    assert app.names() == ["threaded"]


def test_and_nothing_survives():
    assert app.names() == []
"""


def test_threads_the_test_spawns_land_in_the_sandbox(sync_backend: Project) -> None:
    _app(sync_backend, SYNC_APP)
    sync_backend.ini("alchemy_engines = app:engine\n")
    sync_backend.tests(THREADS_TESTS)
    sync_backend.run().assert_outcomes(passed=3)


RUNTIME_TESTS = """
from sqlalchemy import create_engine

import app

ORIGINAL_POOL = app.engine.pool
HOOKS = {"do_begin", "do_commit", "do_rollback", "do_savepoint", "do_execute"}


def test_db_route_routes_an_engine_for_one_test(db_route):
    db_route(app.engine)
    assert app.engine.pool is not ORIGINAL_POOL
    app.add_with_begin("routed")
    assert app.names() == ["routed"]


def test_afterwards_the_engine_is_as_it_was():
    assert app.engine.pool is ORIGINAL_POOL
    assert not HOOKS & set(vars(app.engine.dialect))


def test_an_app_factory_engine_made_in_the_test(db_route, db_engine):
    engine = create_engine(db_engine.url.set(database=app.engine.url.database))
    db_route(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO alchemy_item (name) VALUES ('factory')")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT name FROM alchemy_item").scalars().all() == [
            "factory"
        ]
    engine.dispose()


def test_and_nothing_survives(db_session):
    from sqlalchemy import select
    from models import Item

    assert db_session.scalars(select(Item.name)).all() == []
"""


def test_db_route_routes_for_one_test_and_restores_the_engine(sync_backend: Project) -> None:
    _app(sync_backend, SYNC_APP)
    sync_backend.ini()
    sync_backend.tests(RUNTIME_TESTS)
    sync_backend.run().assert_outcomes(passed=4)


ROUTE_ENGINES_TESTS = """
import pytest
import pytest_alchemy
from sqlalchemy import create_engine, insert, select

from models import Item


@pytest.fixture(scope="session")
def factory_engine(db_engine):
    engine = create_engine(db_engine.url)
    pytest_alchemy.route_engines(engine)
    yield engine
    engine.dispose()


def test_commits_land_in_the_sandbox(factory_engine):
    with factory_engine.begin() as conn:
        conn.execute(insert(Item).values(name="a"))
    with factory_engine.connect() as conn:
        assert conn.execute(select(Item.name)).scalars().all() == ["a"]


def test_and_nothing_survives(factory_engine):
    with factory_engine.connect() as conn:
        assert conn.execute(select(Item.name)).scalars().all() == []
"""


def test_route_engines_routes_an_engine_for_every_later_test(sync_backend: Project) -> None:
    sync_backend.ini()
    sync_backend.tests(ROUTE_ENGINES_TESTS)
    sync_backend.run().assert_outcomes(passed=2)


# -- escapes and misuse -----------------------------------------------------------------------

ESCAPE_APP = """
from sqlalchemy import create_engine

rogue = None


def connect(url):
    global rogue
    rogue = create_engine(url)
    return rogue
"""

ESCAPE_TESTS = """
from sqlalchemy import insert, select

import escape
from models import Item


def test_a_commit_around_the_sandbox_fails_the_test(db_engine):
    engine = escape.connect(db_engine.url)
    with engine.begin() as conn:
        conn.execute(insert(Item).values(name="escaped"))
    engine.dispose()


def test_the_next_test_does_not_see_it(db_session):
    assert db_session.scalars(select(Item.name)).all() == []
"""


def test_a_commit_through_an_unrouted_engine_fails_with_the_fix(sync_backend: Project) -> None:
    _app(sync_backend, ESCAPE_APP, "escape")
    sync_backend.ini()
    sync_backend.tests(ESCAPE_TESTS)
    result = sync_backend.run("-v", "-p", "no:randomly")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*UnsandboxedEngineError: * committed to the test database outside the test's "
            "sandbox, so what it wrote survived the test. Route it into the sandbox: add "
            "`alchemy_engines = escape:rogue` to your pytest ini*so no later test sees it.",
        ]
    )


STRICT_TESTS = """
import pytest
from sqlalchemy import create_engine, select

import app
from models import Item
from pytest_alchemy import UnsandboxedEngineError


def test_an_unrouted_engine_cannot_connect(db_engine):
    engine = create_engine(db_engine.url)
    with pytest.raises(UnsandboxedEngineError, match="alchemy_block_unsandboxed"):
        engine.connect()
    engine.dispose()


def test_routed_engines_still_work():
    app.add_with_session("a")
    assert app.names() == ["a"]
"""


def test_strict_mode_refuses_unrouted_engines(sync_backend: Project) -> None:
    _app(sync_backend, SYNC_APP)
    sync_backend.ini("alchemy_engines = app:engine\nalchemy_block_unsandboxed = true\n")
    sync_backend.tests(STRICT_TESTS)
    result = sync_backend.run("-v")
    # The refused connection also fails its test at teardown, even though it was caught.
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*test_an_unrouted_engine_cannot_connect ERROR*"])


def test_an_engine_with_another_driver_gets_a_clear_error(
    scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    driver = subset(SYNC_DRIVERS, "postgresql-psycopg")[0]
    project = project_for(driver, scratch_databases, pytester)
    assert project.url is not None
    other = make_url(project.url).set(drivername="postgresql+psycopg2")
    _app(project, SYNC_APP.replace("APP_URL", repr(other.render_as_string(False))))
    project.ini("alchemy_engines = app:engine\n")
    project.tests(
        """
        import app

        def test_not_using_it():  # routing is lazy: the mismatch shows at the first use
            pass

        def test_using_it():
            app.engine.connect()

        def test_with_the_sandbox(db_session):  # routed at once: the error comes at set-up
            pass
        """
    )
    result = project.run()
    result.assert_outcomes(passed=1, failed=1, errors=1)
    result.stdout.fnmatch_lines(
        ["*cannot join the test's sandbox: it uses postgresql+psycopg2*point alchemy_url*"]
    )


SYNC_TEST_ASYNC_APP = """
import asyncio

import app


def test_a_sync_test_driving_an_async_engine():
    asyncio.run(app.names())
"""


@pytest.mark.parametrize(
    "driver", subset(ASYNC_DRIVERS, "sqlite-aiosqlite", "postgresql-asyncpg"), ids=lambda d: d.id
)
def test_an_async_engine_in_a_sync_test_joins_where_the_driver_allows(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = project_for(driver, scratch_databases, pytester)
    _app(project, ASYNC_APP)
    project.ini("alchemy_engines = app:engine\n")
    project.tests(SYNC_TEST_ASYNC_APP)
    result = project.run()
    if driver.backend == "sqlite":  # aiosqlite serves the loop asyncio.run() makes
        result.assert_outcomes(passed=1)
    else:  # asyncpg's connection would belong to that loop alone: refused, saying why
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines(["*UnsandboxedEngineError*TestClient*ASGITransport*"])


def test_an_unimportable_engine_path_is_a_usage_error(pytester: pytest.Pytester) -> None:
    from conftest import Project

    project = Project(pytester, None)
    project.ini("alchemy_engines = nowhere:engine\n")
    project.tests("def test_it():\n    pass\n")
    result = project.run()
    assert result.ret != 0
    result.stdout.fnmatch_lines(
        ["*alchemy_engines: cannot import 'nowhere:engine': ModuleNotFoundError*"]
    )


OVERLAP_TESTS = """
from sqlalchemy import insert

import app
from models import Item


def test_a_rollback_that_undoes_another_sessions_writes_fails_the_test(db_connection):
    held = app.SessionLocal()
    held.add(Item(name="app"))
    held.flush()  # the app's savepoint is on top now
    db_connection.execute(insert(Item).values(name="test"))  # lands inside it
    held.rollback()  # undoes both
    held.close()


def test_a_late_read_only_session_undoes_nothing(db_session):
    reader = app.SessionLocal()
    assert app.names() == []
    reader.connection()  # its savepoint opens first
    app.add_with_session("committed")  # commits inside the reader's savepoint
    reader.close()  # rolls back: nothing of its own to undo
    assert app.names() == ["committed"]
"""


def test_overlapping_transactions_keep_what_they_can_and_report_what_they_cannot(
    sync_backend: Project,
) -> None:
    _app(sync_backend, SYNC_APP)
    sync_backend.ini("alchemy_engines = app:engine\n")
    sync_backend.tests(OVERLAP_TESTS)
    result = sync_backend.run("-v")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        ["*test_a_rollback_that_undoes*ERROR*", "*Two transactions were open at once*"]
    )


FLASK_FACTORY = """
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import func, select

from models import Base, Item

db = SQLAlchemy(model_class=Base)


def create_app():
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = APP_URL

    @app.post("/items/<name>")
    def create(name):
        db.session.add(Item(name=name))
        db.session.commit()
        return {"count": db.session.scalar(select(func.count(Item.id)))}

    db.init_app(app)
    return app
"""

FLASK_FACTORY_TESTS = """
import pytest
import pytest_alchemy

from appfactory import create_app, db


@pytest.fixture(scope="session")
def app():
    app = create_app()
    pytest_alchemy.route_engines(db)
    return app


def test_the_view_commits_into_the_sandbox(app):
    client = app.test_client()
    assert client.post("/items/a").json == {"count": 1}
    assert client.post("/items/b").json == {"count": 2}


def test_and_nothing_survives(app):
    assert app.test_client().post("/items/c").json == {"count": 1}
"""


def test_a_flask_app_factory_routed_with_route_engines(sync_backend: Project) -> None:
    _app(sync_backend, FLASK_FACTORY, "appfactory")
    sync_backend.ini()
    sync_backend.tests(FLASK_FACTORY_TESTS)
    sync_backend.run().assert_outcomes(passed=2)


# The usual Flask pattern: a new app (and, with Flask-SQLAlchemy 3, new engines) per test, from
# a factory that looks at the database while it builds the app.
FLASK_FACTORY_PER_TEST = FLASK_FACTORY.replace(
    "    db.init_app(app)\n    return app\n",
    "    db.init_app(app)\n"
    "    with app.app_context():\n"
    "        app.config['HAS_ITEMS'] = inspect(db.engine).has_table('alchemy_item')\n"
    "    return app\n",
).replace("from sqlalchemy import func, select", "from sqlalchemy import func, inspect, select")

FLASK_FACTORY_PER_TEST_TESTS = """
import pytest
from sqlalchemy import func, select

from appfactory import create_app
from models import Item


@pytest.fixture
def app():
    return create_app()


def test_the_factory_looked_at_the_test_database(app):
    assert app.config["HAS_ITEMS"]


def test_the_view_commits_into_the_sandbox(app, db_session):
    client = app.test_client()
    assert client.post("/items/a").json == {"count": 1}
    assert client.post("/items/b").json == {"count": 2}
    assert db_session.scalar(select(func.count(Item.id))) == 2


def test_and_nothing_survives(app):
    assert app.test_client().post("/items/c").json == {"count": 1}
"""


def test_an_app_made_per_test_joins_the_sandbox_as_its_engines_are_made(
    sync_backend: Project,
) -> None:
    _app(sync_backend, FLASK_FACTORY_PER_TEST, "appfactory")
    sync_backend.ini("alchemy_engines = appfactory:db\n")
    sync_backend.tests(FLASK_FACTORY_PER_TEST_TESTS)
    sync_backend.run().assert_outcomes(passed=3)
    assert sync_backend.leftover_tables() == []


# A factory that builds its tables as it makes the app, made once for the run.
FLASK_FACTORY_CREATE_ALL = FLASK_FACTORY.replace(
    "    db.init_app(app)\n    return app\n",
    "    db.init_app(app)\n    with app.app_context():\n        db.create_all()\n    return app\n",
)

FLASK_SESSION_FACTORY_TESTS = """
import pytest

from appfactory import create_app


@pytest.fixture(scope="session")
def app():
    return create_app()


def test_uses_the_app(app):
    pass
"""


def test_an_app_made_outside_tests_never_reaches_its_own_database(sync_backend: Project) -> None:
    """Its engines are guarded as they are made: the factory's use of the database is refused,
    saying why, instead of reaching the database its settings name."""
    _app(sync_backend, FLASK_FACTORY_CREATE_ALL, "appfactory")
    sync_backend.ini("alchemy_engines = appfactory:db\n")
    sync_backend.tests(FLASK_SESSION_FACTORY_TESTS)
    result = sync_backend.run()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*UnsandboxedEngineError: The application engine * (listed in alchemy_engines) "
            "was used outside a test*"
        ]
    )
    assert "alchemy_item" not in sync_backend.base_tables()


REBOUND_TESTS = """
import pytest
from sqlalchemy import create_engine

import app


@pytest.fixture
def rebound():
    engine = create_engine(app.engine.url)  # a new engine, as a settings reload makes one
    app.SessionLocal.configure(bind=engine)
    yield
    app.SessionLocal.configure(bind=app.engine)
    engine.dispose()


def test_a_rebound_sessionmaker_commits_into_the_sandbox(rebound):
    app.add_with_session("a")
    assert app.names() == ["a"]


def test_and_nothing_survives(rebound):
    assert app.names() == []
"""


def test_a_configured_sessionmaker_bound_anew_during_a_test_joins_the_sandbox(
    sync_backend: Project,
) -> None:
    _app(sync_backend, SYNC_APP)
    sync_backend.ini("alchemy_engines = app:SessionLocal\n")
    sync_backend.tests(REBOUND_TESTS)
    sync_backend.run().assert_outcomes(passed=2)
    assert sync_backend.leftover_tables() == []


UNSEEN_BIND_TESTS = """
from sqlalchemy import create_engine

import app


def test_a_bind_set_behind_the_plugins_back_escapes(db_connection):
    engine = create_engine(db_connection.engine.url)  # the test database
    app.SessionLocal.kw["bind"] = engine  # not configure(): nothing tells the plugin
    try:
        app.add_with_session("escaped")
    finally:
        app.SessionLocal.kw["bind"] = app.engine
        engine.dispose()


def test_the_next_test_does_not_see_it():
    assert app.names() == []
"""


def test_an_engine_bound_unseen_gets_advice_that_is_not_circular(sync_backend: Project) -> None:
    _app(sync_backend, SYNC_APP)
    sync_backend.ini("alchemy_engines = app:SessionLocal\n")
    sync_backend.tests(UNSEEN_BIND_TESTS)
    result = sync_backend.run("-p", "no:randomly")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*UnsandboxedEngineError: * committed to the test database outside the test's "
            "sandbox*It belongs to app:SessionLocal, which alchemy_engines lists, but it was "
            "made or bound during the test*db_route(SessionLocal)*"
        ]
    )
    assert sync_backend.leftover_tables() == []


ASYNC_REBOUND_TESTS = """
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

import app

pytestmark = pytest.mark.asyncio


async def test_a_rebound_async_sessionmaker_joins_the_open_sandbox():
    engine = create_async_engine(app.engine.url)  # a new engine, as a settings reload makes
    app.SessionLocal.configure(bind=engine)
    try:
        await app.add_with_session("a")
        assert await app.names() == ["a"]
    finally:
        app.SessionLocal.configure(bind=app.engine)
        await engine.dispose()


async def test_and_nothing_survives():
    assert await app.names() == []
"""

# Bound only inside the test: no async sandbox was opened for it before the test started.
LATER_APP = """
from sqlalchemy.ext.asyncio import async_sessionmaker

Later = async_sessionmaker()
"""

LATER_TESTS = """
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

import app
import later
from pytest_alchemy import UnsandboxedEngineError


@pytest.mark.asyncio
async def test_binding_it_says_what_to_request():
    with pytest.raises(UnsandboxedEngineError, match="Request async_db_connection"):
        later.Later.configure(bind=app.engine)
"""


def test_an_async_sessionmaker_bound_anew_during_a_test_joins_or_says_why(
    async_backend: Project,
) -> None:
    _app(async_backend, ASYNC_APP)
    _app(async_backend, LATER_APP, "later")
    async_backend.ini("alchemy_engines = app:SessionLocal\n")
    async_backend.tests(ASYNC_REBOUND_TESTS)
    async_backend.run().assert_outcomes(passed=2)
    async_backend.ini("alchemy_engines = later:Later\n")
    async_backend.tests(LATER_TESTS)
    result = async_backend.run(subprocess=True)  # a coroutine left behind shows at its exit
    result.assert_outcomes(passed=1)
    assert "never awaited" not in result.stdout.str() + result.stderr.str()
    assert async_backend.leftover_tables() == []


ROUTED_LOOP_CONFIGS = [
    ("pytest-asyncio-function-loops", "function", "pytestmark = pytest.mark.asyncio", ()),
    ("pytest-asyncio-auto", "session", "", ("-o", "asyncio_mode=auto")),
    (
        "anyio",
        "",
        "pytestmark = pytest.mark.anyio\n\n\n"
        '@pytest.fixture(scope="session")\ndef anyio_backend():\n    return "asyncio"\n',
        ("-p", "no:asyncio"),
    ),
]


def test_async_engines_are_routed_under_every_loop_configuration(
    scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    driver = subset(ASYNC_DRIVERS, "postgresql-asyncpg")[0]
    project = project_for(driver, scratch_databases, pytester)
    runs: dict[str, list[str]] = {}
    for name, scopes, marks, args in ROUTED_LOOP_CONFIGS:  # one interpreter for them all
        _app(project, ASYNC_APP)
        project.ini("alchemy_engines = app:SessionLocal\n", loop_scopes=scopes)
        project.tests(ASYNC_TESTS.replace("pytestmark = pytest.mark.asyncio", marks))
        project.into_folder(name)
        runs[name] = list(args)
    results, at_exit = run_in_one_process(pytester, runs)
    for name, result in results.items():
        output = "\n".join(result.outlines)
        assert result.parseoutcomes() == {"passed": 7}, f"{name}:\n{output}"
        assert not [t for t in LOOP_TROUBLE if t in output], f"{name}:\n{output}"
    assert not [t for t in LOOP_TROUBLE if t in at_exit], at_exit


ASYNC_ESCAPE_TESTS = """
import pytest
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import create_async_engine

from models import Item

pytestmark = pytest.mark.asyncio


async def test_an_async_commit_around_the_sandbox_fails_the_test(async_db_engine):
    engine = create_async_engine(async_db_engine.url)
    async with engine.begin() as conn:
        await conn.execute(insert(Item).values(name="escaped"))
    await engine.dispose()


async def test_the_next_test_does_not_see_it(async_db_session):
    assert (await async_db_session.scalars(select(Item.name))).all() == []
"""


def test_an_async_commit_through_an_unrouted_engine_fails(async_backend: Project) -> None:
    async_backend.ini()
    async_backend.tests(ASYNC_ESCAPE_TESTS)
    result = async_backend.run("-p", "no:randomly")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*UnsandboxedEngineError: * committed to the test database outside the test's "
            "sandbox*so no later test sees it."
        ]
    )


WIDER_SCOPES = """
import pytest

import app


@pytest.fixture(scope="{scope}")
def logged_in_once():
    app.add_with_session("{scope}-fixture")


def test_uses_a_wider_fixture(logged_in_once):
    pass


def test_routing_still_works_in_tests():
    app.add_with_session("in-test")
    assert app.names() == ["in-test"]
"""


@pytest.mark.parametrize("scope", ["session", "module", "class"])
def test_a_configured_engine_never_reaches_its_own_url_from_wider_fixtures(
    sync_backend: Project, scope: str
) -> None:
    from sqlalchemy import create_engine, inspect, text

    _app(sync_backend, SYNC_APP)
    sync_backend.ini("alchemy_engines = app:engine\n")
    sync_backend.tests(WIDER_SCOPES.format(scope=scope))
    base = create_engine(sync_backend.url or "")
    with base.begin() as conn:  # the developer's database, with the app's table in it
        conn.execute(text("CREATE TABLE alchemy_item (id INTEGER PRIMARY KEY, name VARCHAR(50))"))
    try:
        result = sync_backend.run("-p", "no:randomly")
        result.assert_outcomes(passed=1, errors=1)
        result.stdout.fnmatch_lines(
            [
                "*UnsandboxedEngineError: The application engine * (listed in alchemy_engines) "
                "was used outside a test: in a module-, class- or session-scoped fixture*"
            ]
        )
        with base.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM alchemy_item")).scalar() == 0
    finally:
        with base.begin() as conn:
            conn.execute(text("DROP TABLE alchemy_item"))
        assert "alchemy_item" not in inspect(base).get_table_names()
        base.dispose()


THREAD_TURNS_APP = """
from fastapi import FastAPI
from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import sessionmaker

from models import Item

engine = create_engine(APP_URL)
SessionLocal = sessionmaker(engine)
api = FastAPI()


@api.post("/items/{name}", status_code=201)
def create(name: str):
    with SessionLocal() as session:
        session.add(Item(name=name))
        session.commit()
    return {"name": name}


def names():
    with SessionLocal() as session:
        return sorted(session.scalars(select(Item.name)))


def run(sql):
    with engine.connect() as conn:
        conn.execute(text(sql))


def counts(times):
    with engine.connect() as conn:
        return [conn.execute(COUNT).scalar() for _ in range(times)]


COUNT = text("SELECT count(*) FROM alchemy_item")
"""

THREAD_TURNS_TESTS = """
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

import app
from models import Item
from pytest_alchemy import SandboxBrokenError


def test_a_session_held_open_does_not_block_a_request_in_another_thread():
    started = time.monotonic()
    with app.SessionLocal() as held, TestClient(app.api) as client:
        assert held.scalars(select(Item)).all() == []  # a read transaction stays open
        assert client.post("/items/from-request").status_code == 201
        held.add(Item(name="from-test"))
        held.commit()
    assert time.monotonic() - started < 5  # it used to wait 30 s, then fail
    assert app.names() == ["from-request", "from-test"]


def test_a_thread_that_must_wait_fails_quickly_saying_why(db_connection):
    if db_connection.dialect.name == "sqlite":
        db_connection.connection.dbapi_connection.create_function("sleep", 1, time.sleep)
    slow = threading.Thread(target=app.run, args=(SLEEP,))
    slow.start()
    time.sleep(0.3)
    try:
        with pytest.raises(SandboxBrokenError, match="waited 0.5 s.*alchemy_thread_wait"):
            app.names()
    finally:
        slow.join()
    assert app.names() == []


def test_threads_reading_at_once_each_get_their_own_rows():
    with app.SessionLocal() as session:
        session.add_all([Item(name="a"), Item(name="b"), Item(name="c")])
        session.commit()

    # Each thread's rows are fetched after its statement ran, while another thread's runs.
    with ThreadPoolExecutor(4) as pool:
        counts = [n for batch in pool.map(app.counts, [500] * 4) for n in batch]
    assert counts == [3] * 2000
"""

SLEEP = {
    "sqlite": "SELECT sleep(2)",
    "postgresql": "SELECT pg_sleep(2)",
    "mysql": "SELECT SLEEP(2)",
}


def test_threads_take_turns_statement_by_statement(sync_backend: Project) -> None:
    _app(sync_backend, THREAD_TURNS_APP)
    backend = make_url(sync_backend.url or "sqlite://").get_backend_name()
    sync_backend.ini("alchemy_engines = app:engine\nalchemy_thread_wait = 0.5\n")
    sync_backend.tests(THREAD_TURNS_TESTS.replace("SLEEP", repr(SLEEP[backend])))
    sync_backend.run().assert_outcomes(passed=3)


TABLES_PER_TEST_CONFTEST = """
import pytest

import app
from models import Base


@pytest.fixture(autouse=True)
def tables():
    Base.metadata.create_all(app.engine)
    yield
    Base.metadata.drop_all(app.engine)
"""

TABLES_PER_TEST = """
from sqlalchemy import select

import app
from models import Item


def test_with_db_session(db_session):
    db_session.add(Item(name="a"))
    db_session.flush()
    app.add_with_session("b")
    assert app.names() == ["a", "b"]


def test_without_a_database_fixture():
    assert app.names() == []
"""


@pytest.mark.parametrize("order", ["session-first", "session-last"])
@pytest.mark.parametrize(
    "driver", subset(SYNC_DRIVERS, "sqlite-pysqlite", "postgresql-psycopg"), ids=lambda d: d.id
)
def test_tables_built_by_each_test_pass_in_either_order(
    driver: Driver, order: str, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    """An autouse create_all/drop_all on a routed engine: the fixtures torn down after the
    session's still run inside the sandbox (they used to run after it had ended)."""
    project = project_for(driver, scratch_databases, pytester)
    _app(project, SYNC_APP)
    pytester.makeconftest(TABLES_PER_TEST_CONFTEST)
    project.ini("alchemy_engines = app:engine\n", metadata=False)
    with_session, without = TABLES_PER_TEST.split("\n\n\ndef test_without")
    without = "def test_without" + without
    head, with_session = with_session.split("\n\n\ndef test_with_db")
    with_session = "def test_with_db" + with_session
    pair = [with_session, without] if order == "session-first" else [without, with_session]
    tests = head + "\n\n\n" + "\n\n\n".join(pair)
    project.tests(tests)
    project.run().assert_outcomes(passed=2)
    assert project.leftover_tables() == []
