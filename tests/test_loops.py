"""Loops as the driver allows: async fixtures in sync tests as pytest-asyncio runs them,
aiosqlite connections on any loop (Starlette's TestClient runs the app on a loop of its own),
the clear error where a driver ties a connection to its loop, and one anyio loop per run."""

from __future__ import annotations

import pytest
from conftest import ASYNC_DRIVERS, Driver, project_for

API = """
from fastapi import Depends, FastAPI
from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from models import Item

engine = create_async_engine(APP_URL)
SessionLocal = async_sessionmaker(engine, expire_on_commit=False)
api = FastAPI()


async def get_session():
    async with SessionLocal() as session:
        yield session


@api.post("/items/{name}", status_code=201)
async def create(name: str, session=Depends(get_session)):
    session.add(Item(name=name))
    await session.commit()
    return {"count": len((await session.scalars(select(Item))).all())}
"""

SYNC_TESTS_ON_ASYNC_FIXTURES = """
import pytest
import pytest_asyncio
from fastapi.testclient import TestClient
from sqlalchemy import select

from api import api, get_session
from models import Item


@pytest_asyncio.fixture
async def client(async_db_session):
    async def the_tests_session():
        yield async_db_session

    api.dependency_overrides[get_session] = the_tests_session
    yield TestClient(api)
    api.dependency_overrides.clear()


@pytest_asyncio.fixture
async def item(async_db_session):
    async_db_session.add(Item(name="from-a-fixture"))
    await async_db_session.commit()


def test_a_sync_test_with_the_async_session_behind_a_testclient(client, item):
    response = client.post("/items/from-request")
    assert response.status_code == 201, response.text
    assert response.json() == {"count": 2}


def test_nothing_survives(client):
    assert client.post("/items/again").json() == {"count": 1}
"""

ROUTED_TESTS = """
from fastapi.testclient import TestClient

from api import api


def test_a_sync_testclient_test_on_a_routed_async_engine():
    with TestClient(api) as client:
        assert client.post("/items/a").json() == {"count": 1}
        assert client.post("/items/b").json() == {"count": 2}


def test_nothing_survives():
    with TestClient(api) as client:
        assert client.post("/items/c").json() == {"count": 1}
"""

LOOP_DRIVERS = [
    d for d in ASYNC_DRIVERS if d.id in {"sqlite-aiosqlite", "postgresql-asyncpg", "mysql-asyncmy"}
]


@pytest.mark.parametrize("driver", LOOP_DRIVERS, ids=lambda d: d.id)
def test_sync_tests_use_async_fixtures_as_the_driver_allows(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = project_for(driver, scratch_databases, pytester)
    pytester.makepyfile(api=API.replace("APP_URL", repr(project.url)))
    project.ini()
    project.tests(SYNC_TESTS_ON_ASYNC_FIXTURES)
    result = project.run()
    if driver.backend == "sqlite":  # aiosqlite serves any loop
        result.assert_outcomes(passed=2)
    else:  # the app runs on TestClient's loop; the connection belongs to the fixtures' loop
        result.assert_outcomes(failed=2)
        result.stdout.fnmatch_lines(
            [
                f"*EventLoopMismatchError: *A {driver.drivername.split('+')[1]} connection "
                "belongs to the loop it was opened on*"
            ]
        )


def test_a_routed_aiosqlite_engine_joins_a_sync_testclient_test(
    scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    driver = next(d for d in ASYNC_DRIVERS if d.id == "sqlite-aiosqlite")
    project = project_for(driver, scratch_databases, pytester)
    pytester.makepyfile(api=API.replace("APP_URL", repr(project.url)))
    project.ini("alchemy_engines = api:engine\n")
    project.tests(ROUTED_TESTS)
    project.run().assert_outcomes(passed=2)


ANYIO_CONFTEST = """
import pytest

seen = []


@pytest.fixture
def anyio_backend():
    return "asyncio"
"""

ANYIO_TESTS = """
import asyncio

import pytest
from sqlalchemy import text

from conftest import seen


@pytest.mark.anyio
@pytest.mark.parametrize("n", range(3))
async def test_one_loop_and_connection_serve_the_run(async_db_session, n):
    await async_db_session.execute(text("SELECT 1"))
    seen.append((asyncio.get_running_loop(), async_db_session.bind))
    assert len(set(seen)) == 1
"""


@pytest.mark.parametrize("driver", LOOP_DRIVERS, ids=lambda d: d.id)
def test_anyio_runs_on_one_loop_without_a_keep_alive_fixture(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = project_for(driver, scratch_databases, pytester)
    project.ini(loop_scopes="")
    pytester.makeconftest(ANYIO_CONFTEST)
    project.tests(ANYIO_TESTS, name="test_first")
    project.tests(ANYIO_TESTS, name="test_second")
    project.run("-p", "no:asyncio").assert_outcomes(passed=6)


HIDDEN_500_TESTS = """
import pytest
from fastapi.testclient import TestClient

from api import api


def test_sync_test_whose_app_gets_a_500():
    client = TestClient(api, raise_server_exceptions=False)
    assert client.post("/items/a").status_code == 500  # what the app made of the refusal


@pytest.mark.asyncio
async def test_async_test_whose_app_on_another_loop_gets_a_500():
    client = TestClient(api, raise_server_exceptions=False)
    assert client.post("/items/a").status_code == 500
"""


def test_a_loop_error_inside_the_app_reaches_the_report(
    scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    """The app turns the plugin's error into a bare HTTP 500; the test fails with the error
    at teardown all the same, so the explanation is in pytest's output."""
    driver = next(d for d in ASYNC_DRIVERS if d.id == "postgresql-asyncpg")
    project = project_for(driver, scratch_databases, pytester)
    pytester.makepyfile(api=API.replace("APP_URL", repr(project.url)))
    project.ini("alchemy_engines = api:engine\n")
    project.tests(HIDDEN_500_TESTS)
    result = project.run()
    result.assert_outcomes(passed=2, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_sync_test_whose_app_gets_a_500*",
            "*UnsandboxedEngineError: The AsyncEngine * was used in the sync test*",
            "*ERROR at teardown of test_async_test_whose_app_on_another_loop_gets_a_500*",
            "*EventLoopMismatchError: async_db_connection was opened on one event loop*",
        ]
    )
