"""The proof that the sandbox behaves like production: a differential, model-based test.

Hypothesis generates programs of what applications do (sessions from a sessionmaker on the
test's connection and from a routed application engine; add, flush, commit, rollback,
``begin_nested()`` kept or rolled back, ``with session.begin():``, close, an IntegrityError and
its recovery, a failing query and its recovery, Core ``engine.begin()`` writes, a ``SELECT`` of
a function that inserts, a second overlapping session) and runs each program twice, step by
step: on a scratch database with real commits and no plugin (the oracle: production), and inside
a sandbox, driven as the fixtures drive it (a ``Sandbox`` on a kept connection, the application
engine routed into it; for asyncpg an ``AsyncSandbox`` on one event loop, AsyncSessions and a
routed AsyncEngine). After every step the exceptions and the rows each party sees must match;
after the program, the sandboxed database must be exactly as before.

What one connection cannot give is stated by the model rather than generated:

- another party sees the writer's uncommitted rows (in the sandbox every party shares one
  transaction): the expected view is the oracle's committed rows plus the writer's pending;
- one writer at a time: two transactions holding writes at once would wait on each other's
  row locks in production (and overlap on one connection in the sandbox, where a rollback of
  one could undo the other's work; that case fails the test with an explanation instead);
- a transaction that saw another party commit does not write afterwards (its rollback would
  undo that commit on the one connection) and its reads are not compared (production's
  snapshot, on MySQL and SQLite, hides the newer commit).

In CI: a fixed seed (derandomized) and a bounded number of examples. A soak run anyone can
repeat: ``ALCHEMY_DIFFERENTIAL_EXAMPLES=2000 pytest tests/test_differential.py
--hypothesis-seed=1234``.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest
from conftest import _unavailable, admin
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import Engine, String, create_engine, event, insert, select, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import NullPool
from sqlalchemy.util import greenlet_spawn

from pytest_alchemy import aio, dialects
from pytest_alchemy.aio import LoopState
from pytest_alchemy.routing import Routes
from pytest_alchemy.sandbox import JOIN_MODE, ConnectionKeeper, Sandbox

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    SandboxSide = Callable[[], tuple[Sandbox, "World", Callable[[], None]]]
    Sides = tuple[
        SandboxSide, Callable[[Callable[[], list[str]]], "World"], list[Callable[[], None]]
    ]


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "alchemy_item"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(20), unique=True)


#: A function that inserts: what a SELECT can do behind the back of its text.
CREATE_FUNCTION = {
    "postgresql": "CREATE FUNCTION alchemy_create_item(n text) RETURNS integer LANGUAGE sql AS "
    "$$ INSERT INTO alchemy_item (name) VALUES (n) RETURNING id $$",
    "mysql": "CREATE FUNCTION alchemy_create_item(n VARCHAR(20)) RETURNS INTEGER MODIFIES SQL "
    "DATA BEGIN INSERT INTO alchemy_item (name) VALUES (n); RETURN LAST_INSERT_ID(); END",
}
SEED = "seed"
NAMES = st.sampled_from([SEED, "a", "b", "c"])
#: Slots 0-1: sessions of the sessionmaker on the test's connection (db_sessionmaker);
#: slots 2-3: sessions of the application's sessionmaker on its routed engine.
SLOTS = st.sampled_from(range(4))

#: A soak run sets the number of examples, and gets random programs (or --hypothesis-seed's).
SOAK = int(os.environ.get("ALCHEMY_DIFFERENTIAL_EXAMPLES", "0"))
EXAMPLES = SOAK or 100


@dataclass
class World:
    """One side of the comparison: two sessionmakers, an application engine, an observer."""

    makers: tuple[Any, Any]  # sessionmakers, or async_sessionmakers
    engine: Engine  # an AsyncEngine's sync_engine for async drivers
    observe: Callable[[], list[str]]  # the committed rows, as a new connection sees them
    runner: Runner
    sessions: list[Session | None] = field(default_factory=lambda: [None] * 4)
    _async_sessions: list[Any] = field(default_factory=list)

    def session(self, slot: int) -> Session:
        """The slot's session; an AsyncSession is driven through its sync_session, inside
        the greenlet ``call`` runs steps in, so the async driver serves every statement."""
        found = self.sessions[slot]
        if found is None:
            made = self.makers[slot // 2]()
            if isinstance(made, AsyncSession):
                self._async_sessions.append(made)
                made = made.sync_session
            found = self.sessions[slot] = made
        return found

    def call(self, step: Callable[[], Any]) -> Any:
        return self.runner.call(step)

    def close_all(self) -> None:
        for slot in range(len(self.sessions)):
            session = self.sessions[slot]
            if session is not None:
                self.call(session.close)
            self.sessions[slot] = None
        self._async_sessions.clear()


class Runner:
    """Runs steps directly (sync drivers), or in a greenlet on one event loop (async ones)."""

    def __init__(self, is_async: bool) -> None:
        self.loop = asyncio.new_event_loop() if is_async else None

    def call(self, step: Callable[[], Any]) -> Any:
        if self.loop is None:
            return step()
        return self.loop.run_until_complete(greenlet_spawn(step))

    def wait(self, awaitable: Any) -> Any:
        assert self.loop is not None
        return self.loop.run_until_complete(awaitable)


def outcome(run: Callable[[], Any]) -> tuple[str, Any]:
    """What a step did: its value, or the name of the exception it raised."""
    try:
        return ("ok", run())
    except Exception as exc:  # the comparison is the point: any exception type counts
        return ("error", type(exc).__name__)


def names(session: Session) -> list[str]:
    return sorted(session.scalars(select(Item.name)))


@dataclass
class Databases:
    """The sandbox's database and the oracle's, each with a table and the seed row."""

    backend: str
    sandbox_url: str  # sync URLs; ``driver`` says which driver the worlds use
    oracle_url: str
    driver: str = ""
    cleanup: list[Callable[[], None]] = field(default_factory=list)


def _sqlite_savepoints(engine: Engine) -> None:
    """SQLAlchemy's documented recipe for SAVEPOINT on pysqlite, for the oracle's engine."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN")


def _prepare(url: str, backend: str) -> None:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            Base.metadata.drop_all(conn)
            if backend in CREATE_FUNCTION:
                conn.exec_driver_sql("DROP FUNCTION IF EXISTS alchemy_create_item")
            Base.metadata.create_all(conn)
            if backend in CREATE_FUNCTION:
                conn.exec_driver_sql(CREATE_FUNCTION[backend])
            if backend == "sqlite":
                conn.exec_driver_sql("PRAGMA journal_mode=WAL")  # readers never block writers
            conn.execute(insert(Item).values(name=SEED))
    finally:
        engine.dispose()


@pytest.fixture(
    params=["sqlite-pysqlite", "postgresql-psycopg", "postgresql-asyncpg", "mysql-pymysql"]
)
def databases(
    request: pytest.FixtureRequest, scratch_databases: dict[str, str], tmp_path: Path
) -> Iterator[Databases]:
    backend, driver = request.param.split("-")
    if backend == "sqlite":
        found = Databases(backend, f"sqlite:///{tmp_path}/sandbox.db", f"sqlite:///{tmp_path}/o.db")
    else:
        if scratch_databases[backend].startswith("!"):
            _unavailable(backend, RuntimeError(scratch_databases[backend][1:]))
        # Databases of its own (named after the worker's scratch database, so a crashed run's
        # are swept with it): the scratch database is other tests' base database.
        url = make_url(scratch_databases[backend])
        sandbox, oracle = (url.set(database=f"{url.database}_{n}") for n in ("dsand", "dorcl"))
        server = admin(url)
        with server.connect() as conn:
            for each in (sandbox, oracle):
                conn.exec_driver_sql(f"CREATE DATABASE {each.database}")
        found = Databases(backend, sandbox.render_as_string(False), oracle.render_as_string(False))

        def drop() -> None:
            force = " WITH (FORCE)" if backend == "postgresql" else ""
            with server.connect() as conn:
                for each in (sandbox, oracle):
                    conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {each.database}{force}")
            server.dispose()

        found.cleanup.append(drop)
    found.driver = driver
    _prepare(found.sandbox_url, backend)
    _prepare(found.oracle_url, backend)
    yield found
    for step in found.cleanup:
        step()


def _observer(engine: Engine) -> Callable[[], list[str]]:
    def observe() -> list[str]:
        with engine.connect() as conn:
            return sorted(conn.scalars(select(Item.name)))

    return observe


def _sync_side(databases: Databases, runner: Runner) -> Sides:
    """Sync drivers. The sandbox's side as the fixtures set it up: the plugin's engine (its
    pysqlite savepoint fix included), one kept connection; the application's own engine and
    sessionmaker, routed into each example's sandbox. The oracle: real commits."""
    url, options = dialects.engine_options(make_url(databases.sandbox_url))
    sandbox_engine = create_engine(url, **options)
    dialects.prepare_engine(sandbox_engine)
    keeper = ConnectionKeeper(sandbox_engine)
    app_engine = create_engine(databases.sandbox_url)
    app_maker = sessionmaker(app_engine)
    oracle_engine = create_engine(databases.oracle_url)
    if databases.backend == "sqlite":
        _sqlite_savepoints(oracle_engine)

    def sandbox_side() -> tuple[Sandbox, World, Callable[[], None]]:
        kept = keeper.acquire()  # replaced if an example left it broken, as between tests
        box = Sandbox(kept)
        box.start()
        routes = Routes()
        routes.add(app_engine, box)
        fixture_maker = sessionmaker(bind=kept, join_transaction_mode=JOIN_MODE)
        world = World(
            (fixture_maker, app_maker),
            app_engine,
            lambda: sorted(kept.scalars(select(Item.name))),
            runner,
        )

        def end() -> None:
            routes.stop()
            box.end()

        return box, world, end

    def oracle_world(observe: Callable[[], list[str]]) -> World:
        makers = (sessionmaker(oracle_engine), sessionmaker(oracle_engine))
        return World(makers, oracle_engine, observe, runner)

    cleanup = [keeper.close, sandbox_engine.dispose, app_engine.dispose, oracle_engine.dispose]
    return sandbox_side, oracle_world, cleanup


def _async_side(databases: Databases, runner: Runner) -> Sides:
    """asyncpg: the same on one event loop, as async_db_connection and a routed AsyncEngine
    set it up; AsyncSessions driven through their sync sessions in a greenlet."""
    async_url = make_url(databases.sandbox_url).set(drivername="postgresql+asyncpg")
    url, options = dialects.engine_options(async_url)
    sandbox_engine = create_async_engine(url, **options)
    state = LoopState(sandbox_engine)
    app_engine = create_async_engine(async_url)
    app_maker = async_sessionmaker(app_engine)
    oracle_url = make_url(databases.oracle_url).set(drivername="postgresql+asyncpg")
    oracle_engine = create_async_engine(oracle_url)

    def sandbox_side() -> tuple[Sandbox, World, Callable[[], None]]:
        kept = runner.wait(state.acquire())
        box = runner.wait(aio.open_sandbox(kept))
        routes = Routes()
        routes.add(app_engine.sync_engine, box.core)
        fixture_maker = async_sessionmaker(bind=kept, join_transaction_mode=JOIN_MODE)
        sync_kept = kept.sync_connection
        assert sync_kept is not None

        def observe() -> list[str]:
            return sorted(runner.call(lambda: list(sync_kept.scalars(select(Item.name)))))

        world = World((fixture_maker, app_maker), app_engine.sync_engine, observe, runner)

        def end() -> None:
            routes.stop()
            runner.wait(box.end())

        return box.core, world, end

    def oracle_world(observe: Callable[[], list[str]]) -> World:
        makers = (async_sessionmaker(oracle_engine), async_sessionmaker(oracle_engine))
        return World(makers, oracle_engine.sync_engine, observe, runner)

    def close() -> None:
        runner.wait(state.aclose())
        runner.wait(app_engine.dispose())
        runner.wait(oracle_engine.dispose())
        assert runner.loop is not None
        runner.loop.close()

    return sandbox_side, oracle_world, [close]


def machine_for(databases: Databases) -> type[RuleBasedStateMachine]:
    """The state machine comparing the two worlds on ``databases``."""
    backend = databases.backend
    runner = Runner(is_async=databases.driver == "asyncpg")
    side = _async_side if runner.loop is not None else _sync_side
    sandbox_side, oracle_world, cleanup = side(databases, runner)
    # Pooled: each observation checks out a connection in a new transaction (a new snapshot).
    observer_engine = create_engine(databases.oracle_url)
    outside = create_engine(databases.sandbox_url, poolclass=NullPool)
    databases.cleanup[:0] = [*cleanup, observer_engine.dispose, outside.dispose]
    before = _observer(outside)()

    class Differential(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.box, self.sandbox, self.end_box = sandbox_side()
            self.oracle = oracle_world(_observer(observer_engine))
            self.writer: int | None = None  # the slot whose transaction holds writes
            self.open: set[int] = set()  # slots with a transaction begun
            self.stale: set[int] = set()  # open slots that saw another party commit

        # -- the comparison ----------------------------------------------------------------

        def both(self, step: Callable[[World], Any]) -> tuple[str, Any]:
            expected = outcome(lambda: self.oracle.call(lambda: step(self.oracle)))
            got = outcome(lambda: self.sandbox.call(lambda: step(self.sandbox)))
            assert got == expected, f"sandbox {got} != production {expected}"
            return expected

        def pending(self) -> set[str]:
            """The rows the writer has not committed, as production's writer sees them."""
            if self.writer is None:
                return set()
            session = self.oracle.sessions[self.writer]
            assert session is not None
            return set(self.oracle.call(lambda: names(session))) - set(self.oracle.observe())

        def may_write(self, slot: int) -> bool:
            return self.writer in (None, slot) and slot not in self.stale

        def began(self, slot: int) -> None:
            self.open.add(slot)

        def wrote(self, slot: int, result: tuple[str, Any]) -> None:
            self.began(slot)
            self.writer = slot
            if result[0] == "error":  # the IntegrityError's recovery, in both worlds
                self.both(lambda world: world.session(slot).rollback())
                self.ended(slot, committed=False)

        def ended(self, slot: int, *, committed: bool) -> None:
            if committed and self.writer == slot:
                self.stale |= self.open - {slot}
            if self.writer == slot:
                self.writer = None
            self.open.discard(slot)
            self.stale.discard(slot)

        # -- what applications do ----------------------------------------------------------

        @rule(slot=SLOTS, name=NAMES)
        def add_and_flush(self, slot: int, name: str) -> None:
            if not self.may_write(slot):
                return

            def step(world: World) -> None:
                session = world.session(slot)
                session.add(Item(name=name))
                session.flush()

            self.wrote(slot, self.both(step))

        @rule(slot=SLOTS, name=NAMES, keep=st.booleans())
        def nested(self, slot: int, name: str, keep: bool) -> None:
            if not self.may_write(slot):
                return

            def step(world: World) -> str:
                session = world.session(slot)
                savepoint = session.begin_nested()
                session.add(Item(name=name))
                try:
                    session.flush()
                except Exception as exc:
                    savepoint.rollback()  # the recovery production code does
                    return f"rolled back after {type(exc).__name__}"
                if keep:
                    savepoint.commit()
                    return "kept"
                savepoint.rollback()
                return "rolled back"

            self.began(slot)
            self.writer = slot
            self.both(step)

        @rule(slot=SLOTS, name=NAMES)
        def begin_block(self, slot: int, name: str) -> None:
            if slot in self.open or not self.may_write(slot):
                return

            def step(world: World) -> None:
                session = world.session(slot)
                with session.begin():
                    session.add(Item(name=name))

            self.began(slot)
            self.writer = slot
            self.both(step)
            self.ended(slot, committed=True)

        @precondition(lambda self: backend in CREATE_FUNCTION)
        @rule(slot=SLOTS, name=NAMES)
        def select_a_function_that_writes(self, slot: int, name: str) -> None:
            if not self.may_write(slot):
                return

            def step(world: World) -> None:
                query = text("SELECT alchemy_create_item(:name)")
                world.session(slot).execute(query, {"name": name})

            self.wrote(slot, self.both(step))

        @precondition(lambda self: self.writer is None)
        @rule(name=NAMES)
        def core_write(self, name: str) -> None:
            def step(world: World) -> None:
                with world.engine.begin() as conn:
                    conn.execute(insert(Item).values(name=name))

            if self.both(step)[0] == "ok":
                self.stale |= self.open

        @rule(slot=SLOTS)
        def read(self, slot: int) -> None:
            if slot in self.stale:
                return
            oracle, sandbox = self.oracle, self.sandbox
            expected = outcome(lambda: oracle.call(lambda: names(oracle.session(slot))))
            if expected[0] == "ok" and self.writer != slot:
                expected = ("ok", sorted(set(expected[1]) | self.pending()))
            got = outcome(lambda: sandbox.call(lambda: names(sandbox.session(slot))))
            assert got == expected, f"sandbox {got} != production {expected}"
            self.began(slot)

        @rule(slot=SLOTS)
        def failed_read(self, slot: int) -> None:
            """A query that fails (on PostgreSQL the transaction is then aborted), and the
            rollback production code does to recover."""
            if slot in self.stale or (self.writer not in (None, slot)):
                return

            def step(world: World) -> None:
                world.session(slot).execute(text("SELECT name FROM alchemy_no_such_table"))

            self.began(slot)
            self.both(step)
            self.both(lambda world: world.session(slot).rollback())
            self.ended(slot, committed=False)

        @rule(slot=SLOTS)
        def commit(self, slot: int) -> None:
            self.both(lambda world: world.session(slot).commit())
            self.ended(slot, committed=True)

        @rule(slot=SLOTS)
        def rollback(self, slot: int) -> None:
            self.both(lambda world: world.session(slot).rollback())
            self.ended(slot, committed=False)

        @rule(slot=SLOTS)
        def close(self, slot: int) -> None:

            def step(world: World) -> None:
                session = world.sessions[slot]
                if session is not None:
                    session.close()
                world.sessions[slot] = None

            self.both(step)
            self.ended(slot, committed=False)

        @invariant()
        def a_new_party_sees_the_same_rows(self) -> None:
            expected = sorted(set(self.oracle.observe()) | self.pending())
            got = self.sandbox.observe()
            assert got == expected, f"a new party sees {got} in the sandbox, {expected} live"

        def teardown(self) -> None:
            failed = []
            steps: list[Callable[[], None]] = [
                self.oracle.close_all,
                self.reset_oracle,
                self.sandbox.close_all,
                self.end_box,
            ]
            for step in steps:
                try:
                    step()
                except Exception as exc:  # every step runs: the next example starts clean
                    failed.append(repr(exc))
            assert not failed, failed
            assert self.box.problem is None, self.box.problem
            after = _observer(outside)()
            assert after == before, f"the sandbox left {after}, it started from {before}"

        def reset_oracle(self) -> None:
            with observer_engine.begin() as conn:  # the oracle's own reset: real deletes
                conn.exec_driver_sql(f"DELETE FROM alchemy_item WHERE name <> '{SEED}'")

    return Differential


def test_the_sandbox_behaves_like_production(databases: Databases) -> None:
    machine = machine_for(databases)
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=15,
            deadline=None,
            derandomize=not SOAK,  # CI: the same programs every run
            database=None,
            suppress_health_check=list(HealthCheck),
            print_blob=True,
        ),
    )
