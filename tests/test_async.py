"""The async sandbox: semantics on every async driver, and every event-loop configuration."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from conftest import (
    ASYNC_DRIVERS,
    LOOP_TROUBLE,
    Driver,
    collected_ids,
    project_for,
    run_in_one_process,
)

if TYPE_CHECKING:
    from conftest import Project

SEMANTICS = """
import asyncio

import pytest
import pytest_asyncio
from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from models import Item

ROUNDS = pytest.mark.parametrize("round", [1, 2])
pytestmark = pytest.mark.asyncio


async def names(session):
    return sorted((await session.scalars(select(Item.name))).all())


@pytest_asyncio.fixture(autouse=True)
async def starts_empty(async_db_session):
    assert await names(async_db_session) == []


@pytest_asyncio.fixture
async def seeded(async_db_session):
    async_db_session.add(Item(name="seed"))
    await async_db_session.commit()


@ROUNDS
async def test_commit_once_and_twice(async_db_session, round):
    async_db_session.add(Item(name="a"))
    await async_db_session.commit()
    async_db_session.add(Item(name="b"))
    await async_db_session.commit()
    assert await names(async_db_session) == ["a", "b"]


@ROUNDS
async def test_rollback_keeps_what_was_committed(async_db_session, round):
    async_db_session.add(Item(name="a"))
    await async_db_session.commit()
    async_db_session.add(Item(name="b"))
    await async_db_session.flush()
    await async_db_session.rollback()
    assert await names(async_db_session) == ["a"]


@ROUNDS
async def test_rollback_keeps_what_a_fixture_committed(seeded, async_db_session, round):
    async_db_session.add(Item(name="a"))
    await async_db_session.flush()
    await async_db_session.rollback()
    assert await names(async_db_session) == ["seed"]


@ROUNDS
async def test_async_with_begin(async_db_sessionmaker, round):
    async with async_db_sessionmaker() as session:
        async with session.begin():
            session.add(Item(name="a"))
        async with session.begin():
            session.add(Item(name="b"))
        assert await names(session) == ["a", "b"]


@ROUNDS
async def test_begin_nested_rolled_back(async_db_session, round):
    async_db_session.add(Item(name="a"))
    nested = await async_db_session.begin_nested()
    async_db_session.add(Item(name="b"))
    await async_db_session.flush()
    await nested.rollback()
    await async_db_session.commit()
    assert await names(async_db_session) == ["a"]


@ROUNDS
async def test_integrity_error_then_rollback_then_carry_on(async_db_session, round):
    async_db_session.add(Item(name="a"))
    await async_db_session.commit()
    async_db_session.add(Item(name="a"))
    with pytest.raises(IntegrityError):
        await async_db_session.commit()
    await async_db_session.rollback()
    async_db_session.add(Item(name="c"))
    await async_db_session.commit()
    assert await names(async_db_session) == ["a", "c"]


@ROUNDS
async def test_close_then_reuse(async_db_session, round):
    async_db_session.add(Item(name="a"))
    await async_db_session.commit()
    await async_db_session.close()
    assert await names(async_db_session) == ["a"]


@ROUNDS
async def test_second_session_shares_the_connection(async_db_session, async_db_sessionmaker, round):
    async_db_session.add(Item(name="a"))
    await async_db_session.commit()
    async with async_db_sessionmaker() as other:
        assert await names(other) == ["a"]


@ROUNDS
async def test_sessionmaker_settings_do_not_outlive_the_test(async_db_sessionmaker, round):
    assert async_db_sessionmaker.kw.get("expire_on_commit", True) is True
    async_db_sessionmaker.configure(expire_on_commit=False)
    async with async_db_sessionmaker() as session:
        assert session.sync_session.expire_on_commit is False


@ROUNDS
async def test_core_work_on_the_connection(async_db_connection, async_db_session, round):
    async with async_db_connection.begin_nested():
        await async_db_connection.execute(insert(Item).values(name="core"))
    assert await names(async_db_session) == ["core"]


@ROUNDS
async def test_concurrent_first_use_of_the_session(async_db_session, round):
    first, second = await asyncio.gather(
        async_db_session.execute(select(Item.id)), async_db_session.execute(select(Item.name))
    )
    assert first.all() == second.all() == []


@ROUNDS
async def test_the_first_writes_rolled_back(async_db_session, round):
    # The test's first savepoint is never sent: rolling back to it rolls the driver back.
    async_db_session.add(Item(name="a"))
    await async_db_session.flush()
    await async_db_session.rollback()
    assert await names(async_db_session) == []
    async_db_session.add(Item(name="c"))
    await async_db_session.commit()
    async_db_session.add(Item(name="d"))
    await async_db_session.flush()
    await async_db_session.rollback()
    assert await names(async_db_session) == ["c"]


@ROUNDS
async def test_integrity_error_on_the_first_write(async_db_session, round):
    async_db_session.add_all([Item(name="a"), Item(name="a")])
    with pytest.raises(IntegrityError):
        await async_db_session.flush()
    await async_db_session.rollback()
    assert await names(async_db_session) == []
    async_db_session.add(Item(name="c"))
    await async_db_session.commit()
    assert await names(async_db_session) == ["c"]
"""


def test_async_semantics_hold_in_any_order(async_project: Project) -> None:
    async_project.ini()
    async_project.tests(SEMANTICS)
    result = async_project.run()
    result.assert_outcomes(passed=26)
    again = async_project.run(*reversed(collected_ids(async_project)))
    again.assert_outcomes(passed=26)
    assert async_project.leftover_tables() == []


# Three tests that each commit a row and expect to start from an empty table; with loop
# handling wrong they fail with "attached to a different loop", "another operation is in
# progress", "Event loop is closed", or a ResourceWarning turned into an error.
LOOP_TESTS = """
import pytest
from sqlalchemy import func, select

from models import Item

{marks}


@pytest.mark.parametrize("n", range(3))
async def test_commit_and_start_clean(async_db_session, n):
    assert await async_db_session.scalar(select(func.count(Item.id))) == 0
    async_db_session.add(Item(name=f"row{{n}}"))
    await async_db_session.commit()
"""

# (id, ini lines, module marks, extra command-line args)
LOOP_CONFIGS = [
    ("strict-session", "session", "pytestmark = pytest.mark.asyncio", ()),
    ("strict-function", "function", "pytestmark = pytest.mark.asyncio", ()),
    ("strict-module", "module", "pytestmark = pytest.mark.asyncio", ()),
    ("auto-session", "session", "", ("-o", "asyncio_mode=auto")),
    ("auto-function", "function", "", ("-o", "asyncio_mode=auto")),
    (
        "marker-loop_scope-module",
        "",
        'pytestmark = pytest.mark.asyncio(loop_scope="module")',
        ("-o", "asyncio_default_fixture_loop_scope=module"),
    ),
    (
        "anyio-session-backend",
        "",
        "pytestmark = pytest.mark.anyio\n\n"
        '@pytest.fixture(scope="session")\ndef anyio_backend():\n    return "asyncio"',
        ("-p", "no:asyncio"),
    ),
    (
        "anyio-module-backend",
        "",
        "pytestmark = pytest.mark.anyio\n\n"
        '@pytest.fixture(scope="module")\ndef anyio_backend():\n    return "asyncio"',
        ("-p", "no:asyncio"),
    ),
]


def test_loop_configurations_share_or_separate_loops_cleanly(async_project: Project) -> None:
    """Every configuration of pytest-asyncio and anyio, run one after another in one
    interpreter (what is left behind shows when it is collected, or at the interpreter's
    exit); and a fixture loop wider than the test's gets a clear error."""
    runs: dict[str, list[str]] = {}
    for name, scopes, marks, args in LOOP_CONFIGS:
        async_project.ini(loop_scopes=scopes)
        async_project.tests(LOOP_TESTS.format(marks=marks))
        async_project.into_folder(name)
        runs[name] = list(args)
    async_project.ini(
        "asyncio_default_fixture_loop_scope = session\n"
        "asyncio_default_test_loop_scope = function\n",
        loop_scopes="",
    )
    async_project.tests(LOOP_TESTS.format(marks="pytestmark = pytest.mark.asyncio"))
    async_project.into_folder("different-loops")
    runs["different-loops"] = []
    results, at_exit = run_in_one_process(async_project.pytester, runs)
    for name, _, _, _ in LOOP_CONFIGS:
        output = "\n".join(results[name].outlines)
        assert results[name].parseoutcomes() == {"passed": 3}, f"{name}:\n{output}"
        assert not [t for t in LOOP_TROUBLE if t in output], f"{name}:\n{output}"
    mismatched = results["different-loops"]
    if "aiosqlite" in (async_project.url or ""):  # its connections serve any loop
        mismatched.assert_outcomes(passed=3)
    else:
        mismatched.assert_outcomes(failed=3)
        mismatched.stdout.fnmatch_lines(
            ["*EventLoopMismatchError*asyncio_default_test_loop_scope*"]
        )
        mismatched.stdout.no_fnmatch_line("*attached to a different loop*")
    assert not [t for t in LOOP_TROUBLE if t in at_exit], at_exit
    assert async_project.leftover_tables() == []


BREAKERS = """
import pytest
import pytest_asyncio
from sqlalchemy import select, text

from models import Item
from pytest_alchemy import SandboxBrokenError

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture(autouse=True)
async def starts_empty(async_db_session):
    assert (await async_db_session.scalars(select(Item.name))).all() == []


async def test_connection_commit_is_refused(async_db_connection, async_db_session):
    async_db_session.add(Item(name="leak"))
    await async_db_session.flush()
    with pytest.raises(SandboxBrokenError, match="Connection.commit"):
        await async_db_connection.commit()


async def test_raw_commit_is_refused(async_db_session):
    async_db_session.add(Item(name="leak"))
    await async_db_session.flush()
    with pytest.raises(SandboxBrokenError, match="COMMIT"):
        await async_db_session.execute(text("COMMIT"))


async def test_next_test_starts_clean(async_db_session):
    async_db_session.add(Item(name="leak"))
    await async_db_session.commit()
"""


def test_breaking_the_async_sandbox_fails_that_test_and_leaks_nothing(
    async_project: Project,
) -> None:
    async_project.ini()
    async_project.tests(BREAKERS)
    result = async_project.run()
    result.assert_outcomes(passed=3, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_connection_commit_is_refused*",
            "*ERROR at teardown of test_raw_commit_is_refused*",
        ]
    )
    assert async_project.leftover_tables() == []


MYSQL_SESSION_STATE = """
import pytest
from sqlalchemy import text

pytestmark = pytest.mark.asyncio


async def test_session_settings_change(async_db_session):
    await async_db_session.execute(text("SET SESSION sql_mode = 'ANSI_QUOTES'"))


async def test_session_settings_do_not_reach_the_next_test(async_db_session):
    mode = await async_db_session.scalar(text("SELECT @@SESSION.sql_mode"))
    assert "ANSI_QUOTES" not in mode
"""


@pytest.mark.parametrize(
    "driver", [d for d in ASYNC_DRIVERS if d.backend == "mysql"], ids=lambda d: d.id
)
def test_mysql_session_settings_stay_in_their_test(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    # Only MySQL and MariaDB keep session settings across a rollback.
    project = project_for(driver, scratch_databases, pytester)
    project.ini()
    project.tests(MYSQL_SESSION_STATE)
    project.run().assert_outcomes(passed=2)


NOT_BEGUN = """
import asyncio

import pytest
from sqlalchemy import select

from models import Item

pytestmark = pytest.mark.asyncio


async def test_the_session_is_handed_over_not_begun(async_db_session):
    assert not async_db_session.in_transaction()
    async with async_db_session.begin():  # the most common async pattern
        async_db_session.add(Item(name="begun"))
    assert (await async_db_session.scalars(select(Item.name))).all() == ["begun"]


async def test_and_concurrent_first_use_stays_safe(async_db_session):
    assert not async_db_session.in_transaction()
    first, second = await asyncio.gather(
        async_db_session.execute(select(Item.id)), async_db_session.execute(select(Item.name))
    )
    assert first.all() == second.all() == []


async def test_and_the_next_test_starts_empty(async_db_session):
    async with async_db_session.begin():
        assert (await async_db_session.scalars(select(Item.name))).all() == []
"""


def test_async_db_session_is_not_begun_and_concurrent_first_use_is_safe(
    async_project: Project,
) -> None:
    async_project.ini()
    async_project.tests(NOT_BEGUN)
    async_project.run("-p", "no:randomly").assert_outcomes(passed=3)
