"""A test that ends its outer transaction, however it does it, fails, and no later test sees
what escaped: the end is told by the driver's state, and the database is restored."""

from __future__ import annotations

import pytest
from conftest import ASYNC_DRIVERS, SYNC_DRIVERS, Driver, project_for

# The guilty test commits a row through its session, then ends the outer transaction and
# swallows whatever error that raised, as code under test might. The next test must start
# clean all the same.
SYNC = """
from sqlalchemy import select, text
from models import Item


def test_1_ends_the_outer_transaction(db_session):
    db_session.add(Item(name="escaped"))
    db_session.commit()
    try:
        {escape}
    except Exception:
        pass


def test_2_starts_clean(db_session):
    assert db_session.scalars(select(Item.name)).all() == []
"""

ASYNC = """
import pytest
from sqlalchemy import select, text
from models import Item


@pytest.mark.asyncio
async def test_1_ends_the_outer_transaction(async_db_session):
    async_db_session.add(Item(name="escaped"))
    await async_db_session.commit()
    raw = await (await async_db_session.connection()).get_raw_connection()
    try:
        {escape}
    except Exception:
        pass


@pytest.mark.asyncio
async def test_2_starts_clean(async_db_session):
    assert (await async_db_session.scalars(select(Item.name))).all() == []
"""

# Each escape, and how it is caught: "refused" by the statement's text before it runs, or
# "ended": seen in the driver's state, and the database restored.
RAW_COMMIT = ("db_session.connection().connection.dbapi_connection.commit()", "ended")
COMMENTED = ('db_session.execute(text("/* x */ COMMIT"))', "refused")
SYNC_ESCAPES: dict[str, dict[str, tuple[str, str]]] = {
    "sqlite": {"raw-commit": RAW_COMMIT, "commented-commit": COMMENTED},
    "postgresql": {
        "raw-commit": RAW_COMMIT,
        "commented-commit": COMMENTED,
        "line-comment-commit": ('db_session.execute(text("-- why not\\nCOMMIT"))', "refused"),
        "multi-statement": ('db_session.execute(text("SELECT 1; COMMIT"))', "ended"),
    },
    "mysql": {
        "raw-commit": RAW_COMMIT,
        "commented-commit": COMMENTED,
        "set-autocommit": ('db_session.execute(text("SET autocommit = 1"))', "refused"),
        "executable-comment": (
            'db_session.execute(text("/*!40101 SET autocommit = 1 */"))',
            "ended",
        ),
    },
}
ASYNC_ESCAPES: dict[str, dict[str, tuple[str, str]]] = {
    "sqlite-aiosqlite": {"raw-commit": ("await raw.driver_connection.commit()", "ended")},
    "postgresql-asyncpg": {
        "raw-commit": ('await raw.driver_connection.execute("COMMIT")', "ended")
    },
    "postgresql-psycopg_async": {
        "raw-commit": ("await raw.driver_connection.commit()", "ended"),
        "multi-statement": (
            'await async_db_session.execute(text("SELECT 1; COMMIT"))',
            "ended",
        ),
    },
    "mysql-aiomysql": {"raw-commit": ("await raw.driver_connection.commit()", "ended")},
    # asyncmy keeps the last non-zero server status, so it cannot tell that a transaction
    # ended: for it the statement guard is what holds (see dialects.transaction_probe).
    "mysql-asyncmy": {},
}
COMMON_ASYNC = {
    "commented-commit": ('await async_db_session.execute(text("/* x */ COMMIT"))', "refused")
}

CASES = [
    pytest.param(driver, SYNC, *escape, id=f"{driver.id}-{name}")
    for driver in SYNC_DRIVERS
    for name, escape in SYNC_ESCAPES[driver.backend].items()
] + [
    pytest.param(driver, ASYNC, *escape, id=f"{driver.id}-{name}")
    for driver in ASYNC_DRIVERS
    for name, escape in {
        **ASYNC_ESCAPES[driver.id.replace("-memory", "")],
        **COMMON_ASYNC,
    }.items()
]


@pytest.mark.parametrize(("driver", "source", "escape", "caught"), CASES)
def test_an_escape_fails_its_test_and_no_later_test_sees_it(
    driver: Driver,
    source: str,
    escape: str,
    caught: str,
    scratch_databases: dict[str, str],
    pytester: pytest.Pytester,
) -> None:
    project = project_for(driver, scratch_databases, pytester)
    project.ini()
    project.tests(source.format(escape=escape))
    result = project.run("-p", "no:randomly")
    result.assert_outcomes(passed=2, errors=1)
    if caught == "refused":  # nothing escaped
        result.stdout.fnmatch_lines(["*SandboxBrokenError: pytest-alchemy refused to run*"])
    else:
        result.stdout.fnmatch_lines(
            ["*SandboxBrokenError: The test's outer transaction ended *no later test sees it.*"]
        )
