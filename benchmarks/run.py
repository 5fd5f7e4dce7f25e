"""Per-test cost of pytest-alchemy's sandbox, as ratios to alternatives measured in the same run.

    .venv/bin/python benchmarks/run.py [--rounds N] [--suite-tests N] [--only ID ...]

For each backend x driver that answers, in one process and interleaved round by round:

- R: one ``SELECT 1`` round trip through a held SQLAlchemy connection on the same driver;
- plugin: what ``db_connection`` + ``db_session`` do for a test that runs one ``SELECT 1``,
  setup and teardown included, with the kept connection;
- classic: the hand-written recipe (``engine.connect()``, ``begin()``, a ``create_savepoint``
  Session, the query, close, rollback, connection close);
- untouched: a test that requests ``db_session`` and never uses it;
- commit: the extra cost of each ``session.commit()`` after a write inside a test (an INSERT
  into a temporary table of the benchmark's own); a commit after reads only costs less,
  since its savepoint is kept for the next transaction;
- routed: a test whose one query goes through the application's own engine, routed into the
  sandbox (``alchemy_engines``): ``Session(app_engine)``, the query, close; and routed/plugin,
  its time over the plugin's.

Overheads are (time - R) / R for a test that runs one query, so "1.0" means one round trip
more than the query itself. Medians over many tests; the machine is shared, so read ratios.
Finally a whole-suite comparison: N tests that request ``db_session`` and do nothing, against
the same tests without it, each run as a pytest subprocess.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Session

from pytest_alchemy import aio, dialects, routing
from pytest_alchemy.sandbox import JOIN_MODE, ConnectionKeeper, Sandbox, close_session_after

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

PG = "postgresql+{driver}://postgres@127.0.0.1:5432/test"
MY = "mysql+{driver}://root@127.0.0.1:3306/test"
SYNC = {
    "sqlite-pysqlite": "sqlite:///{tmp}/bench.sqlite3",
    "postgresql-psycopg": PG.format(driver="psycopg"),
    "postgresql-psycopg2": PG.format(driver="psycopg2"),
    "mysql-pymysql": MY.format(driver="pymysql"),
}
ASYNC = {
    "sqlite-aiosqlite": "sqlite+aiosqlite:///{tmp}/bench.sqlite3",
    "postgresql-asyncpg": PG.format(driver="asyncpg"),
    "postgresql-psycopg_async": PG.format(driver="psycopg_async"),
    "mysql-asyncmy": MY.format(driver="asyncmy"),
}
COMMITS = 10
# A table of the benchmark's own, on its kept connection only, gone when that closes.
TEMP_TABLE = "CREATE TEMPORARY TABLE alchemy_bench (n INTEGER)"
INSERT = "INSERT INTO alchemy_bench (n) VALUES (1)"


def median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def report(name: str, times: dict[str, list[float]]) -> None:
    r = median_us(times["R"])
    line = [f"{name:26s} R={r:7.1f}us"]
    for key in ("plugin", "classic"):
        overhead = (median_us(times[key]) - r) / r
        line.append(f"{key} {overhead:4.1f} R")
    line.append(f"untouched {median_us(times['untouched']) / r:4.2f} R")
    line.append(f"commit {median_us(times['commit']) / r:4.1f} R")
    line.append(f"plugin/classic {median_us(times['plugin']) / median_us(times['classic']):4.2f}")
    routed = median_us(times["routed"])
    line.append(f"routed {(routed - r) / r:4.1f} R")
    line.append(f"routed/plugin {routed / median_us(times['plugin']):4.2f}")
    print("  ".join(line), flush=True)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


async def atimed(fn: Callable[[], Awaitable[Any]]) -> float:
    start = time.perf_counter()
    await fn()
    return time.perf_counter() - start


def bench_sync(name: str, url: str, rounds: int) -> None:
    url_obj, options = dialects.engine_options(__import__("sqlalchemy").make_url(url))
    engine = create_engine(url_obj, **options)
    dialects.prepare_engine(engine)
    keeper = ConnectionKeeper(engine)
    held = engine.connect()
    query = select(1)

    def bare() -> None:
        held.exec_driver_sql("SELECT 1").scalar()

    def plugin_test(body: Callable[[Session], Any]) -> Callable[[], None]:
        def run() -> None:
            sandbox = Sandbox(keeper.acquire())
            sandbox.start()
            session = Session(bind=sandbox.connection, join_transaction_mode=JOIN_MODE)
            body(session)
            close_session_after(session)
            sandbox.end()

        return run

    def classic() -> None:
        with engine.connect() as conn:
            trans = conn.begin()
            session = Session(bind=conn, join_transaction_mode=JOIN_MODE)
            session.execute(query).scalar()
            session.close()
            trans.rollback()

    kept = keeper.acquire()
    kept.exec_driver_sql(TEMP_TABLE)
    kept.commit()
    write = text(INSERT)

    def commits(session: Session) -> None:
        for _ in range(COMMITS):
            session.execute(write)
            session.commit()

    def queries(session: Session) -> None:
        for _ in range(COMMITS):
            session.execute(write)

    app_engine = create_engine(url_obj, **options)  # the application's own, never connected

    def routed() -> None:
        sandbox = Sandbox(keeper.acquire())
        sandbox.start()
        routes = routing.Routes()
        routes.add(app_engine, sandbox)
        with Session(app_engine) as session:
            session.execute(query).scalar()
        routes.stop()
        sandbox.end()

    one_query = plugin_test(lambda s: s.execute(query).scalar())
    untouched = plugin_test(lambda s: None)
    with_commits, without_commits = plugin_test(commits), plugin_test(queries)
    keys = ("R", "plugin", "classic", "untouched", "routed")
    times: dict[str, list[float]] = {k: [] for k in keys}
    commit_times: list[float] = []
    for _ in range(20):  # warm up caches, pools and statement caches
        bare(), one_query(), classic(), untouched(), with_commits(), without_commits(), routed()
    for _ in range(rounds):
        times["R"].append(timed(bare))
        times["plugin"].append(timed(one_query))
        times["classic"].append(timed(classic))
        times["untouched"].append(timed(untouched))
        times["routed"].append(timed(routed))
        commit_times.append((timed(with_commits) - timed(without_commits)) / COMMITS)
    times["commit"] = commit_times
    report(name, times)
    held.close()
    keeper.close()
    engine.dispose()
    app_engine.dispose()


async def bench_async(name: str, url: str, rounds: int) -> None:
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    url_obj, options = dialects.engine_options(__import__("sqlalchemy").make_url(url))
    engine = create_async_engine(url_obj, **options)
    dialects.prepare_engine(engine.sync_engine)
    state = aio.LoopState(engine)
    held = await engine.connect()
    query = select(1)

    async def bare() -> None:
        (await held.exec_driver_sql("SELECT 1")).scalar()

    def plugin_test(
        body: Callable[[AsyncSession], Awaitable[Any]],
    ) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            sandbox = await aio.open_sandbox(await state.acquire())
            session = AsyncSession(bind=sandbox.connection, join_transaction_mode=JOIN_MODE)
            await session.connection()  # what async_db_session does before handing it over
            await body(session)
            await aio.close_session_after(session)
            await sandbox.end()

        return run

    async def classic() -> None:
        async with engine.connect() as conn:
            trans = await conn.begin()
            session = AsyncSession(bind=conn, join_transaction_mode=JOIN_MODE)
            (await session.execute(query)).scalar()
            await session.close()
            await trans.rollback()

    async def one(session: AsyncSession) -> None:
        (await session.execute(query)).scalar()

    async def nothing(session: AsyncSession) -> None:
        return None

    kept = await state.acquire()
    await kept.exec_driver_sql(TEMP_TABLE)
    await kept.commit()
    write = text(INSERT)

    async def commits(session: AsyncSession) -> None:
        for _ in range(COMMITS):
            await session.execute(write)
            await session.commit()

    async def queries(session: AsyncSession) -> None:
        for _ in range(COMMITS):
            await session.execute(write)

    app_engine = create_async_engine(url_obj, **options)  # the application's own

    async def routed() -> None:
        sandbox = await aio.open_sandbox(await state.acquire())
        routes = routing.Routes()
        routes.add(app_engine.sync_engine, sandbox.core)
        async with AsyncSession(app_engine) as session:
            (await session.execute(query)).scalar()
        routes.stop()
        await sandbox.end()

    one_query, untouched = plugin_test(one), plugin_test(nothing)
    with_commits, without_commits = plugin_test(commits), plugin_test(queries)
    keys = ("R", "plugin", "classic", "untouched", "routed")
    times: dict[str, list[float]] = {k: [] for k in keys}
    commit_times: list[float] = []
    for _ in range(20):
        for fn in (bare, one_query, classic, untouched, with_commits, without_commits, routed):
            await fn()
    for _ in range(rounds):
        times["R"].append(await atimed(bare))
        times["plugin"].append(await atimed(one_query))
        times["classic"].append(await atimed(classic))
        times["untouched"].append(await atimed(untouched))
        times["routed"].append(await atimed(routed))
        commit_times.append((await atimed(with_commits) - await atimed(without_commits)) / COMMITS)
    times["commit"] = commit_times
    report(name, times)
    await held.close()
    await state.aclose()
    await app_engine.dispose()


def reachable(url: str) -> bool:
    try:
        engine = create_engine(dialects.sync_twin(__import__("sqlalchemy").make_url(url)))
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
        return True
    except Exception as exc:
        print(f"skipped {url}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        return False


SUITE_TEST = """
import pytest

{fixtures}

@pytest.mark.parametrize("n", range({count}))
def test_noop({fixture}n):
    pass
"""

# Four chained no-op fixtures shaped like the plugin's layers (a session-scoped engine, then
# three function-scoped layers, two of them generators): what pytest itself charges for them.
CHAIN = """
@pytest.fixture(scope="session")
def engine():
    return object()

@pytest.fixture
def connection(engine):
    yield engine

@pytest.fixture
def maker(connection):
    return connection

@pytest.fixture
def session(maker):
    yield maker
"""

SUITES = {
    "without": ("", ""),
    "4 no-op fixtures": (CHAIN, "session, "),
    "with db_session": ("", "db_session, "),
    "with db_session and a routed engine": ("", "db_session, "),
}
# The application module and ini of the last suite: its engine routed into every test.
ROUTED_APP = "from sqlalchemy import create_engine\n\nengine = create_engine('sqlite://')\n"
ROUTED_INI = "[pytest]\npythonpath = .\nalchemy_engines = app:engine\n"


def bench_suite(count: int, repeats: int) -> None:
    """N no-op tests with and without fixtures, run as pytest subprocesses, interleaved."""
    results: dict[str, list[float]] = {name: [] for name in SUITES}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "pytest.ini").write_text("[pytest]\n")
        for index, (fixtures, fixture) in enumerate(SUITES.values()):
            folder = root / f"suite{index}"
            folder.mkdir()
            source = SUITE_TEST.format(count=count, fixture=fixture, fixtures=fixtures)
            (folder / "test_suite.py").write_text(source)
            if "routed" in list(SUITES)[index]:
                (folder / "app.py").write_text(ROUTED_APP)
                (folder / "pytest.ini").write_text(ROUTED_INI)
        for _ in range(repeats):
            for index, name in enumerate(SUITES):
                command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x"]
                start = time.perf_counter()
                done = subprocess.run(
                    command, cwd=root / f"suite{index}", capture_output=True, text=True
                )
                results[name].append(time.perf_counter() - start)
                if done.returncode != 0:
                    raise SystemExit(f"suite {name!r} failed:\n{done.stdout[-2000:]}")
    base = statistics.median(results["without"])
    shown = ", ".join(
        f"{name} {statistics.median(times):.2f}s ({statistics.median(times) / base:.2f}x)"
        for name, times in results.items()
    )
    print(f"suite of {count} no-op tests (SQLite default, median of {repeats}): {shown}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300, help="tests measured per backend")
    parser.add_argument("--suite-tests", type=int, default=1000)
    parser.add_argument("--suite-repeats", type=int, default=5)
    parser.add_argument("--only", nargs="*", default=None, help="backend ids to run")
    args = parser.parse_args()
    print(
        "overhead per test in R (one SELECT 1 round trip on a held connection), beyond the "
        "test's own query; untouched = total cost of a test that never uses its session"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name, url in SYNC.items():
            if args.only is None or name in args.only:
                url = url.format(tmp=tmp)
                if reachable(url):
                    bench_sync(name, url, args.rounds)
        for name, url in ASYNC.items():
            if args.only is None or name in args.only:
                url = url.format(tmp=tmp)
                if reachable(url):
                    asyncio.run(bench_async(name, url, args.rounds))
    if args.suite_tests:
        bench_suite(args.suite_tests, args.suite_repeats)


if __name__ == "__main__":
    os.environ.pop("PYTEST_ALCHEMY_URL", None)
    main()
