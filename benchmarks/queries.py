"""What recording statements costs (``db_queries``, N+1 detection), per statement.

    .venv/bin/python benchmarks/queries.py [--rounds N] [--only ID ...]

In one process, interleaved round by round, on each driver that answers: a sandboxed
``Session`` runs an ORM ``select(Owner)`` returning one row, over and over, in three states:

- before: no recorder was ever installed in the process;
- recording: a recorder is on (what a test that requests ``db_queries`` pays per statement);
- after: a recorder was installed and removed again (what a test that does not request
  ``db_queries`` pays in a run where others did).

Reported: microseconds per statement (medians of the rounds), recording/before and
after/before. ``after/before`` near 1.00 is "free unless asked for".
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from typing import TYPE_CHECKING

from sqlalchemy import String, create_engine, make_url, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from pytest_alchemy import aio, dialects
from pytest_alchemy.queries import Recorder
from pytest_alchemy.sandbox import JOIN_MODE, ConnectionKeeper, Sandbox, close_session_after

if TYPE_CHECKING:
    from collections.abc import Callable

PG = "postgresql+{driver}://postgres@127.0.0.1:5432/test"
MY = "mysql+{driver}://root@127.0.0.1:3306/test"
SYNC = {
    "sqlite-pysqlite": "sqlite:///{tmp}/bench.sqlite3",
    "postgresql-psycopg": PG.format(driver="psycopg"),
    "mysql-pymysql": MY.format(driver="pymysql"),
}
ASYNC = {
    "postgresql-asyncpg": PG.format(driver="asyncpg"),
    "mysql-asyncmy": MY.format(driver="asyncmy"),
}
STATEMENTS = 50  # per sample


class Base(DeclarativeBase):
    pass


class Owner(Base):
    __tablename__ = "alchemy_bench_owner"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(40))


QUERY = select(Owner).where(Owner.id == 1)


def _us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6 / STATEMENTS


def report(name: str, times: dict[str, list[float]]) -> None:
    before, recording, after = (_us(times[k]) for k in ("before", "recording", "after"))
    print(
        f"{name:26s} per statement: before {before:7.1f}us  recording {recording:7.1f}us "
        f"({recording / before:4.2f}x, +{recording - before:5.1f}us)  after {after:7.1f}us "
        f"({after / before:4.2f}x)",
        flush=True,
    )


def bench_sync(name: str, url: str, rounds: int) -> None:
    url_obj, options = dialects.engine_options(make_url(url))
    engine = create_engine(url_obj, **options)
    dialects.prepare_engine(engine)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Owner(id=1, name="ada"))
        session.commit()
    keeper = ConnectionKeeper(engine)
    sandbox = Sandbox(keeper.acquire())
    sandbox.start()
    session = Session(bind=sandbox.connection, join_transaction_mode=JOIN_MODE)

    def sample() -> float:
        start = time.perf_counter()
        for _ in range(STATEMENTS):
            session.execute(QUERY).scalar_one()
        return time.perf_counter() - start

    times = _measure(sample, rounds)
    close_session_after(session)
    sandbox.end()
    keeper.close()
    Base.metadata.drop_all(engine)
    engine.dispose()
    report(name, times)


def _measure(sample: Callable[[], float], rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"before": [], "recording": [], "after": []}
    for _ in range(5):
        sample()
    for _ in range(rounds):
        times["before"].append(sample())
    recorder = Recorder()
    for _ in range(rounds):  # interleaved: recording on, then off again (the "after" state)
        recorder.start()
        times["recording"].append(sample())
        recorder.stop()
        recorder.queries.clear()
        times["after"].append(sample())
    return times


async def bench_async(name: str, url: str, rounds: int) -> None:
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    url_obj, options = dialects.engine_options(make_url(url))
    engine = create_async_engine(url_obj, **options)
    dialects.prepare_engine(engine.sync_engine)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)
    async with AsyncSession(engine) as session:
        session.add(Owner(id=1, name="ada"))
        await session.commit()
    state = aio.LoopState(engine)
    sandbox = await aio.open_sandbox(await state.acquire())
    session = AsyncSession(bind=sandbox.connection, join_transaction_mode=JOIN_MODE)

    async def run() -> float:
        start = time.perf_counter()
        for _ in range(STATEMENTS):
            (await session.execute(QUERY)).scalar_one()
        return time.perf_counter() - start

    # _measure's schedule, with awaits: before x rounds, then (recording, after) x rounds.
    recorder = Recorder()
    times: dict[str, list[float]] = {"before": [], "recording": [], "after": []}
    for _ in range(5):
        await run()
    for _ in range(rounds):
        times["before"].append(await run())
    for _ in range(rounds):
        recorder.start()
        times["recording"].append(await run())
        recorder.stop()
        recorder.queries.clear()
        times["after"].append(await run())
    await aio.close_session_after(session)
    await sandbox.end()
    await state.aclose()
    engine = create_async_engine(url_obj, **options)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
    await engine.dispose()
    report(name, times)


def _answers(url: str) -> bool:
    try:
        engine = create_engine(url.replace("+asyncpg", "+psycopg").replace("+asyncmy", "+pymysql"))
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:
        print(f"{url}: skipped ({type(exc).__name__})")
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp()
    chosen: Callable[[str], bool] = lambda n: not args.only or n in args.only  # noqa: E731
    for name, url in SYNC.items():
        url = url.format(tmp=tmp)
        if chosen(name) and _answers(url):
            bench_sync(name, url, args.rounds)
    for name, url in ASYNC.items():
        if chosen(name) and _answers(url):
            asyncio.run(bench_async(name, url, args.rounds))


if __name__ == "__main__":
    main()
