"""Round trips the sandbox adds to a test, counted through a loopback proxy (exact, not
timed): what a test pays beyond its own statements."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import turns
from conftest import ASYNC_DRIVERS, SYNC_DRIVERS, Driver, project_for

SERVER_DRIVERS = [d for d in SYNC_DRIVERS + ASYNC_DRIVERS if d.backend != "sqlite"]

CONFTEST = """
import gc
import json
import os

import pytest
from sqlalchemy.engine import make_url

import turns

# The proxy lives in the counted run's own process, started before the plugin reads its URL
# (the environment wins over the ini).
_url = make_url(os.environ["ALCHEMY_COUNTED_URL"])
turns.ACTIVE = turns.TurnCounter((_url.host or "127.0.0.1", _url.port or 0))
os.environ["PYTEST_ALCHEMY_URL"] = _url.set(port=turns.ACTIVE.port).render_as_string(
    hide_password=False
)
COUNTS = {}


def pytest_sessionstart(session):
    # A driver's housekeeping can depend on when the cyclic collector runs (asyncpg closes a
    # garbage-collected prepared statement with a round trip of its own), and the proxy's
    # threads allocate too: counted without it, the figures are the plugin's alone.
    gc.disable()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    before = turns.ACTIVE.turns
    try:
        return (yield)
    finally:
        COUNTS[item.name.partition("_")[2].partition("_")[2]] = turns.ACTIVE.turns - before


def pytest_sessionfinish(session):
    gc.enable()
    with open("turns.json", "w") as out:
        json.dump(COUNTS, out)


def pytest_unconfigure(config):  # after every plugin's end of the run
    with open("connections.json", "w") as out:
        json.dump(turns.ACTIVE.connections, out)
"""

SYNC_TESTS = """
from sqlalchemy import text

from models import Item


def test_0_first(db_session):  # what a connection pays once: preparing, catalog queries
    db_session.execute(text("SELECT 1"))
    db_session.add(Item(name="a"))
    db_session.commit()
    db_session.add(Item(name="b"))  # the savepoint statements too (asyncpg prepares them)
    db_session.commit()


def test_1_untouched(db_session):
    pass


def test_2_select(db_session):
    db_session.execute(text("SELECT 1"))


def test_3_write(db_session):
    db_session.add(Item(name="a"))
    db_session.commit()


def test_4_twowrites(db_session):
    db_session.add(Item(name="a"))
    db_session.commit()
    db_session.add(Item(name="b"))
    db_session.commit()


def test_5_after(db_session):
    pass


def test_6_last(db_session):
    pass
"""

ASYNC_TESTS = (
    SYNC_TESTS.replace("def test", "async def test")
    .replace("(db_session)", "(async_db_session)")
    .replace("db_session.execute", "await async_db_session.execute")
    .replace("db_session.commit", "await async_db_session.commit")
    .replace("db_session.add", "async_db_session.add")
)

#: What the test's own statements cost in production: the query; an INSERT and a COMMIT.
OWN = {"untouched": 0, "select": 1, "write": 2, "twowrites": 4}

#: Round trips the sandbox may add, per driver: a test that never uses its session, one that
#: only reads, one that writes and commits. PostgreSQL's drivers send BEGIN as a round trip
#: of their own; every test that ran a statement ends with a ROLLBACK. A test's first
#: savepoint is never sent (it stands for the outer transaction's start), so its first
#: commit sends nothing: on MySQL, a write costs no more than in production. asyncmy cannot
#: see a transaction end, so a test that wrote also asks the server at teardown.
BUDGET = {
    "postgresql-psycopg": (0, 2, 1),
    "postgresql-psycopg2": (0, 2, 1),
    "mysql-pymysql": (0, 1, 0),
    "postgresql-asyncpg": (0, 2, 1),
    "postgresql-psycopg_async": (0, 2, 1),
    "mysql-asyncmy": (0, 1, 1),
    "mysql-aiomysql": (0, 1, 0),
}


@pytest.mark.parametrize("driver", SERVER_DRIVERS, ids=lambda d: d.id)
def test_the_sandbox_adds_at_most_its_budget_of_round_trips_and_a_run_few_connections(
    driver: Driver,
    scratch_databases: dict[str, str],
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    project = project_for(driver, scratch_databases, pytester)
    project.ini("asyncio_mode = auto\n")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(turns=Path(turns.__file__).read_text())
    project.tests(ASYNC_TESTS if driver.is_async else SYNC_TESTS)
    # In a process of its own: nothing an earlier test of this process left behind (a
    # thread, a connection, a changed setting) can add turns. Run in this process, the counts
    # of async drivers were sometimes inflated in full runs of the suite (twice in five).
    monkeypatch.setenv("ALCHEMY_COUNTED_URL", project.url or "")
    # xdist loaded, as most users have it, but no workers: a run without them opens none of
    # theirs, nor sweeps for what they left.
    run = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly", timeout=300)
    run.assert_outcomes(passed=7)
    counts = json.loads((pytester.path / "turns.json").read_text())
    added = {name: counts[name] - OWN[name] for name in OWN}
    untouched, select, write = BUDGET[driver.id]
    assert added["untouched"] <= untouched, counts
    assert counts["after"] <= untouched, counts  # what a writing test left costs nothing
    assert added["select"] <= select, counts
    assert added["write"] <= write, counts
    # Each further commit: the next SAVEPOINT, beyond the INSERT and the COMMIT.
    assert counts["twowrites"] - counts["write"] <= 3, counts
    # The whole run's connections: the session holding the server's lock while this run
    # provisions (the sweep of earlier runs' leftovers, the check and CREATE DATABASE run on
    # it too), the build, the tests' connection, and at the end the marker check and the
    # DROP; on MySQL, first, a check that the server greets. One each, not one per statement.
    connections = json.loads((pytester.path / "connections.json").read_text())
    assert connections <= (6 if driver.backend == "mysql" else 5), connections
