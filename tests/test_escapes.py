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
    # ended: the server is asked at teardown (see dialects.ends_unseen).
    "mysql-asyncmy": {"raw-commit": ("await raw.driver_connection.commit()", "ended")},
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


# -- the plugin's own engines, and the base database ------------------------------------------

OWN_ENGINE = """
import pytest
from sqlalchemy import insert, select
from models import Item


def test_1_commits_through_db_engine(db_engine):
    with db_engine.begin() as conn:
        conn.execute(insert(Item).values(name="escaped"))


@pytest.mark.asyncio
async def test_2_commits_through_async_db_engine(async_db_engine):
    async with async_db_engine.begin() as conn:
        await conn.execute(insert(Item).values(name="escaped-async"))


def test_3_starts_clean(db_session):
    assert db_session.scalars(select(Item.name)).all() == []
"""

BACKENDS = [
    d for d in SYNC_DRIVERS if d.id in ("sqlite-pysqlite", "postgresql-psycopg", "mysql-pymysql")
]


@pytest.mark.parametrize("driver", BACKENDS, ids=lambda d: d.id)
def test_a_commit_through_the_plugins_own_engine_is_an_escape(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = project_for(driver, scratch_databases, pytester)
    project.ini()
    project.tests(OWN_ENGINE)
    result = project.run("-p", "no:randomly")
    result.assert_outcomes(passed=3, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*UnsandboxedEngineError: * committed to the test database outside the test's "
            "sandbox*It is db_engine (or async_db_engine)*so no later test sees it."
        ]
        * 2
    )


# The run's last test escapes: its teardown ends the run's fixtures before the hook that
# reports the escape runs. A kept database (reuse) would carry the row into the next run.
LAST_ESCAPES = {
    "sync": """
from sqlalchemy import insert
from models import Item


def test_last_commits_through_db_engine(db_engine):
    with db_engine.begin() as conn:
        conn.execute(insert(Item).values(name="escaped"))
""",
    "async": """
import pytest
from sqlalchemy import insert
from models import Item


@pytest.mark.asyncio
async def test_last_commits_through_async_db_engine(async_db_engine):
    async with async_db_engine.begin() as conn:
        await conn.execute(insert(Item).values(name="escaped"))
""",
}

NEXT_RUN_STARTS_CLEAN = """
from sqlalchemy import select
from models import Item


def test_starts_clean(db_session):
    assert db_session.scalars(select(Item.name)).all() == []
"""


@pytest.mark.parametrize(
    ("driver", "kind"),
    [
        *((d, "sync") for d in BACKENDS),
        *((d, "async") for d in ASYNC_DRIVERS if d.id == "postgresql-asyncpg"),
    ],
    ids=lambda v: v if isinstance(v, str) else v.id,
)
def test_an_escape_in_the_runs_last_test_is_restored_before_the_run_ends(
    driver: Driver, kind: str, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = project_for(driver, scratch_databases, pytester)
    project.ini()
    project.tests(LAST_ESCAPES[kind])
    first = project.run("--alchemy-reuse")
    first.assert_outcomes(passed=1, errors=1)
    first.stdout.fnmatch_lines(
        ["*UnsandboxedEngineError: * committed to the test database*so no later test sees it."]
    )
    project.tests(NEXT_RUN_STARTS_CLEAN)
    try:
        second = project.run("--alchemy-reuse")
        second.stdout.fnmatch_lines(["alchemy: reusing * (schema unchanged)"])
        second.assert_outcomes(passed=1)
    finally:
        project.run().assert_outcomes(passed=1)  # without reuse: dropped
    assert project.leftover_tables() == []


BASE_DATABASE = """
from sqlalchemy import create_engine, text

BASE = {base!r}


def test_writes_the_base_database(db_session):
    engine = create_engine(BASE)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE IF NOT EXISTS developer_notes (id INTEGER)"))
    finally:
        engine.dispose()
"""


@pytest.mark.parametrize("driver", BACKENDS, ids=lambda d: d.id)
@pytest.mark.parametrize("strict", [False, True], ids=["watch", "strict"])
def test_a_commit_to_the_base_database_during_a_test_is_reported(
    driver: Driver, strict: bool, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    from sqlalchemy import create_engine, inspect

    project = project_for(driver, scratch_databases, pytester)
    project.ini("alchemy_block_unsandboxed = true\n" if strict else "")
    project.tests(BASE_DATABASE.format(base=project.url))
    result = project.run()
    base = create_engine(project.url or "")
    try:
        tables = set(inspect(base).get_table_names())
        if strict:  # refused: it never got there
            result.assert_outcomes(failed=1, errors=1)
            result.stdout.fnmatch_lines(["*connected to the base database outside the test's*"])
            assert "developer_notes" not in tables
        else:
            result.assert_outcomes(passed=1, errors=1)
            result.stdout.fnmatch_lines(
                [
                    "*committed to the base database named in alchemy_url, which tests must never "
                    "write: what it wrote stays there*"
                ]
            )
    finally:
        with base.begin() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS developer_notes")
        base.dispose()
