"""Routing the application's own engines into the test's sandbox.

An application creates its engine at import time and its sessions from it; that code never sees
the test's connection. While a test runs, a :class:`Route` points such an engine at the sandbox:
its pool hands every checkout the sandbox's own DBAPI connection, and its dialect turns the
transaction calls SQLAlchemy makes into savepoints on the sandbox's ledger
(:class:`~pytest_alchemy.sandbox.Savepoints`):

==========================  =============================================
the application does         on the test's connection
==========================  =============================================
begin (explicit or auto)     ``SAVEPOINT sa_savepoint_N``
commit                       ``RELEASE SAVEPOINT sa_savepoint_N``
rollback                     ``ROLLBACK TO SAVEPOINT sa_savepoint_N``
``begin_nested()``           the same, one level deeper
raw ``COMMIT``, MySQL DDL    refused, as on ``db_connection``
==========================  =============================================

Routing happens at the engine, so every API built on it joins: ``Session(engine)``,
sessionmakers, ``engine.connect()``, ``engine.begin()``, their async twins. When the test ends
the engine gets its own pool back and its dialect loses the overrides, so it is exactly as it
was: same pool, same dialect, same event listeners.

:class:`EscapeWatch` catches what is not routed: a commit to the test database, during a test,
through any other engine.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import weakref
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import Pool, StaticPool
from sqlalchemy.pool.base import _ConnectionFairy, _ConnectionRecord

from pytest_alchemy import dialects
from pytest_alchemy.config import mask
from pytest_alchemy.errors import (
    AlchemyError,
    DatabaseBlockedError,
    ReadOnlyReplicaError,
    UnsandboxedEngineError,
)
from pytest_alchemy.sandbox import Savepoints
from pytest_alchemy.statements import proves_read_only

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

    from sqlalchemy.engine import URL, Connection
    from sqlalchemy.engine.interfaces import DBAPIConnection, DBAPICursor, Dialect
    from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

    from pytest_alchemy.sandbox import Sandbox

#: Engines of the plugin's provisioning (create, fill, mark, heartbeats); never escapes.
OWN_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()
#: The engines behind db_engine and async_db_engine: their own connections are outside any
#: sandbox, so a commit through one during a test escapes like any other.
PLUGIN_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()

_ENGINES_INI = "alchemy_engines"
_DATABASES_INI = "alchemy_databases"

# -- what a configured object routes ----------------------------------------------------------


def engines_of(obj: object) -> list[tuple[Engine, bool]]:
    """The engines behind ``obj``, each with whether it is an AsyncEngine's sync engine.

    ``obj`` is an Engine, an AsyncEngine, a ``sessionmaker`` or ``async_sessionmaker`` (its
    ``bind`` and ``binds``), a ``scoped_session`` or ``async_scoped_session`` (its factory), or
    a Flask-SQLAlchemy extension (the engines of every app it was initialised with).
    """
    found: list[tuple[Engine, bool]] = []
    _collect(obj, found, depth=0)
    unique: dict[int, tuple[Engine, bool]] = {}
    for engine, is_async in found:
        unique.setdefault(id(_root(engine)), (_root(engine), is_async))
    return list(unique.values())


def _collect(obj: object, found: list[tuple[Engine, bool]], depth: int) -> None:
    if depth > 4:
        return
    if isinstance(obj, Engine):
        found.append((obj, False))
        return
    sync_engine = getattr(obj, "sync_engine", None)
    if isinstance(sync_engine, Engine) and not hasattr(obj, "sync_connection"):
        found.append((sync_engine, True))  # an AsyncEngine
        return
    kw = getattr(obj, "kw", None)
    if isinstance(kw, dict) and hasattr(obj, "class_"):  # a sessionmaker or async_sessionmaker
        if kw.get("bind") is not None:
            _collect(kw["bind"], found, depth + 1)
        for bind in (kw.get("binds") or {}).values():
            _collect(bind, found, depth + 1)
        return
    factory = getattr(obj, "session_factory", None)
    if factory is not None:  # scoped_session, async_scoped_session
        _collect(factory, found, depth + 1)
        return
    apps = getattr(obj, "_app_engines", None)
    if apps is not None:  # Flask-SQLAlchemy 3: {app: {bind_key: engine}}
        for engines in list(apps.values()):
            for engine in engines.values():
                _collect(engine, found, depth + 1)
        return
    raise TypeError(
        f"{obj!r} is not an Engine, AsyncEngine, sessionmaker, async_sessionmaker, "
        "scoped_session or Flask-SQLAlchemy extension"
    )


def end_scoped_sessions(objects: Iterable[object]) -> None:
    """Close the sessions that configured registries still hold at the end of a test.

    A ``scoped_session`` (Flask-SQLAlchemy's ``db.session`` among them) keeps its session for
    as long as its scope lasts; with an app context pushed for the whole run, that outlives
    the test, still holding the sandbox the test ended. Flask removes the session when a
    request's app context ends; the plugin does the same when a test does, in this thread.
    Async registries are left to the app (their ``remove()`` is a coroutine).
    """
    from sqlalchemy.orm import scoped_session

    for obj in objects:
        registry = obj if isinstance(obj, scoped_session) else getattr(obj, "session", None)
        if not isinstance(registry, scoped_session):
            continue
        try:
            if registry.registry.has():
                registry.remove()
        except RuntimeError:  # its scope is not there now (no app context)
            continue


def _root(engine: Engine) -> Engine:
    """The engine owning the pool (``engine.execution_options()`` makes proxies)."""
    while hasattr(engine, "_proxied"):
        engine = engine._proxied
    return engine


def load(path: str) -> object:
    """The object at ``module:attr`` named in ``alchemy_engines``; a UsageError if absent."""
    import importlib

    import pytest

    module_name, _, attribute = path.partition(":")
    try:
        obj: object = importlib.import_module(module_name)
        for part in attribute.split("."):
            obj = getattr(obj, part)
    except Exception as exc:
        raise pytest.UsageError(
            f"{_ENGINES_INI}: cannot import {path!r}: {type(exc).__name__}: {exc}. Give "
            "'module:attribute' of an engine, sessionmaker or Flask-SQLAlchemy `db`, "
            "importable from the directory pytest runs in."
        ) from None
    try:
        engines_of(obj)
    except TypeError as exc:
        raise pytest.UsageError(f"{_ENGINES_INI}: {path!r}: {exc}.") from None
    return obj


# -- the route --------------------------------------------------------------------------------


def sandbox_for(connection: Connection) -> Sandbox | None:
    """The sandbox ``connection`` runs in: the test's own connection, or a checkout of an
    engine routed into it."""
    from pytest_alchemy.sandbox import sandbox_of

    found = sandbox_of(connection)
    if found is not None:
        return found
    pool = _root(connection.engine).pool
    route = pool._route if isinstance(pool, _SandboxPool) else None
    return route.sandbox if route is not None else None


def _family(dialect: Dialect) -> str:
    return "mysql" if dialect.name == "mariadb" else dialect.name


class _SandboxFairy(_ConnectionFairy):
    """A checkout of a routed engine, for code that uses the DBAPI connection directly.

    ``engine.raw_connection()`` hands this to the caller, whose ``cursor()``, ``commit()``
    and ``rollback()`` would otherwise reach the test's connection unchecked: the first
    cursor opens a savepoint, ``commit()`` releases it and ``rollback()`` returns to it.
    SQLAlchemy's own Connection asks for its first cursor just before it begins (through the
    dialect, which the route hooks), and that begin adopts the savepoint the cursor opened.
    """

    __slots__ = ()

    def cursor(self, *args: Any, **kwargs: Any) -> DBAPICursor:
        route: Route = self._pool._routing()  # type: ignore[attr-defined]
        ledger = route.sandbox.savepoints
        with route.sandbox.lock:
            if not ledger.holds(self):
                ledger.open(self, self)
                ledger.wrote(self, None)  # raw writes are not seen: assume there are some
        return super().cursor(*args, **kwargs)

    def commit(self) -> None:
        route: Route = self._pool._routing()  # type: ignore[attr-defined]
        with route.sandbox.lock:
            route.sandbox.savepoints.release(self)

    def rollback(self) -> None:
        route: Route = self._pool._routing()  # type: ignore[attr-defined]
        with route.sandbox.lock:
            route.sandbox.savepoints.rollback(self)


class _SandboxPool(Pool):
    """Hands every checkout the sandbox's DBAPI connection; never opens or closes one.

    One per engine, made at its first route and given to each route in turn (a pool and a
    record cost more to make than a routed test's checkout otherwise does). Each checkout gets
    a record of its own (unlike StaticPool's one shared record, whose bookkeeping loses a
    checkin when two checkouts overlap, as concurrent tasks and nested sessions make them);
    a record checked in is handed out again while it holds the route's DBAPI connection, as
    a pool hands out its connections again. What a test keeps in ``connection.info`` (the
    record's) is cleared when its route ends: it lasts the test, not longer.
    """

    def __init__(self, engine: Engine) -> None:
        super().__init__(
            self._dbapi_connection,
            reset_on_return=None,  # the ledger ends transactions; a reset would ROLLBACK
            dialect=engine.dialect,
        )
        self._route: Route | None = None
        self._checkouts: dict[int, _SandboxFairy] = {}
        self._idle: list[ConnectionPoolEntry] = []
        self._app_dialect = engine.dialect
        self._hooks: dict[str, Callable[..., Any]] | None = None

    def hooks(self) -> dict[str, Callable[..., Any]]:
        """The engine's dialect hooks, for whichever route the pool is attached to."""
        if self._hooks is None:
            self._hooks = _route_hooks(self, self._app_dialect)
        return self._hooks

    @classmethod
    def attach(cls, route: Route) -> _SandboxPool:
        """The engine's sandbox pool, given to ``route`` until :meth:`detach`."""
        pool = _SANDBOX_POOLS.get(route.engine)
        if pool is None:
            pool = _SANDBOX_POOLS[route.engine] = cls(route.engine)
        route.outer, pool._route = pool._route, route  # a route within a route gives it back
        return pool

    def detach(self, route: Route) -> None:
        """``route`` ends: the pool goes back to the route it was in, else to none."""
        if self._route is not route:
            return
        self._route = route.outer
        if self._route is not None:
            return
        self._checkouts.clear()
        for record in self._idle:
            record.__dict__.pop("info", None)  # memoized: {} again at its next use

    def _dbapi_connection(self) -> DBAPIConnection:
        found = self._routing().sandbox.connection.connection.dbapi_connection
        assert found is not None  # the sandbox's connection is open while a route is
        return found

    def _routing(self) -> Route:
        if self._route is None:
            raise UnsandboxedEngineError(_ROUTE_ENDED)
        return self._route

    def connect(self) -> PoolProxiedConnection:
        fairy = super().connect()
        fairy.__class__ = _SandboxFairy  # same layout, three methods more
        self._checkouts[id(fairy._connection_record)] = fairy  # type: ignore[assignment]
        return fairy

    def _do_get(self) -> ConnectionPoolEntry:
        route = self._routing()
        route.checked_out()
        current = route.sandbox.connection.connection.dbapi_connection
        while self._idle:
            try:
                record = self._idle.pop()
            except IndexError:  # another thread took the last one
                break
            if record.dbapi_connection is current:
                return record
        return _ConnectionRecord(self)

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        fairy = self._checkouts.pop(id(record), None)
        route = self._route
        if route is not None and fairy is not None and route.sandbox.savepoints.holds(fairy):
            with route.sandbox.lock:  # closed without commit: the DBAPI discards the work
                route.sandbox.savepoints.rollback(fairy)
        self._idle.append(record)

    def _close_connection(self, connection: DBAPIConnection, *, terminate: bool = False) -> None:
        pass  # the sandbox's connection outlives every checkout

    def dispose(self) -> None:
        pass

    def recreate(self) -> _SandboxPool:
        return self  # engine.dispose() during a test stays routed

    def status(self) -> str:
        return "pytest-alchemy sandbox pool"


_ROUTE_ENDED = (
    "A connection of a routed engine, checked out during a test that has ended, was used "
    "after it: its sandbox is gone. Check connections and sessions out within the test that "
    "uses them (a session kept across tests: close it at each test's end)."
)

#: Each routed engine's sandbox pool and pending pool, kept while the engine lives.
_SANDBOX_POOLS: weakref.WeakKeyDictionary[Engine, _SandboxPool] = weakref.WeakKeyDictionary()
_PENDING_POOLS: weakref.WeakKeyDictionary[Engine, _PendingPool] = weakref.WeakKeyDictionary()


class _PendingPool(Pool):
    """An engine routed lazily (see :class:`_Lazy`): its first checkout opens the test's
    sandbox and starts the route, then checks out of the route's pool."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(lambda: None, dialect=engine.dialect)  # type: ignore[arg-type]
        self._lazy: _Lazy | None = None

    @classmethod
    def attach(cls, lazy: _Lazy) -> _PendingPool:
        """The engine's pending pool (one per engine, as its sandbox pool), for ``lazy``."""
        pool = _PENDING_POOLS.get(lazy.engine)
        if pool is None:
            pool = _PENDING_POOLS[lazy.engine] = cls(lazy.engine)
        pool._lazy = lazy
        return pool

    def _pending(self) -> _Lazy:
        if self._lazy is None:
            raise UnsandboxedEngineError(_ROUTE_ENDED)
        return self._lazy

    def connect(self) -> PoolProxiedConnection:
        return self._pending().begin().connect()

    def _do_get(self) -> ConnectionPoolEntry:  # never: connect() hands over first
        return self._pending().begin()._do_get()

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        pass

    def dispose(self) -> None:
        pass

    def recreate(self) -> _PendingPool:
        return self

    def status(self) -> str:
        return "pytest-alchemy: routed into the test's sandbox at first use"


class _RefusingPool(StaticPool):
    """Refuses every checkout with a message saying why the engine cannot join."""

    def __init__(
        self, engine: Engine, message: str, error: type[AlchemyError] = UnsandboxedEngineError
    ) -> None:
        super().__init__(lambda: None, dialect=engine.dialect)  # type: ignore[arg-type]
        self._message = message
        self._error = error
        self.refused = False  # raised at least once: the test fails with it at teardown

    def _do_get(self) -> ConnectionPoolEntry:
        self.refused = True
        raise self._error(self._message)

    def recreate(self) -> _RefusingPool:
        return self


_HOOKS = (
    "do_begin",
    "do_commit",
    "do_rollback",
    "do_savepoint",
    "do_release_savepoint",
    "do_rollback_to_savepoint",
    "do_execute",
    "do_execute_no_params",
    "do_executemany",
    "set_isolation_level",
    "reset_isolation_level",
)


class Route:
    """One application engine routed into one test's sandbox, until :meth:`stop`."""

    def __init__(self, engine: Engine, sandbox: Sandbox, replica_of: str | None = None) -> None:
        self.engine = _root(engine)
        self.sandbox = sandbox
        self.replica_of = replica_of
        self._pool = self.engine.pool
        self._saved: dict[str, Any] = {}
        self._initialized = False
        self.outer: Route | None = None  # the route of this engine it started within

    @property
    def label(self) -> str:
        return mask(self.engine.url)

    def start(self) -> None:
        app, mine = self.engine.dialect, self.sandbox.connection.dialect
        if _family(app) != _family(mine) or app.driver != mine.driver:
            raise UnsandboxedEngineError(
                f"The application engine {self.label} cannot join the test's sandbox: it uses "
                f"{app.name}+{app.driver}, and the sandbox's connection "
                f"({mask(self.sandbox.connection.engine.url)}) is {mine.name}+{mine.driver}. "
                f"They must share one connection, so one driver: point alchemy_url (or "
                f"alchemy_async_url, for an AsyncEngine) at the driver the application uses, "
                f"e.g. {mine.name}+{app.driver}://..."
            )
        pool = _SandboxPool.attach(self)
        self._hook(app, pool)
        self.engine.pool = pool

    def stop(self) -> None:
        routed = self.engine.pool
        self.engine.pool = self._pool
        if isinstance(routed, _SandboxPool):
            routed.detach(self)
        dialect = self.engine.dialect
        for name, value in self._saved.items():
            if value is _MISSING:
                dialect.__dict__.pop(name, None)
            else:
                dialect.__dict__[name] = value
        self._saved.clear()

    def checked_out(self) -> None:
        """Called at each checkout: right loop, and the dialect initialised."""
        sandbox = self.sandbox
        if sandbox.watch.loop is not None:
            sandbox.watch.check_loop()
        if self._initialized:
            return
        with sandbox.lock:  # threads checking out at once: one initialises, the others wait
            if self._initialized:
                return
            dialect = self.engine.dialect
            if dialect.server_version_info is None:  # never connected: as its first connect would
                connection = sandbox.connection
                with connection.begin_nested():
                    dialect.initialize(connection)
            self._initialized = True

    def _hook(self, dialect: Dialect, pool: _SandboxPool) -> None:
        for name, hook in pool.hooks().items():
            self._saved[name] = dialect.__dict__.get(name, _MISSING)
            dialect.__dict__[name] = hook


def _route_hooks(pool: _SandboxPool, dialect: Dialect) -> dict[str, Callable[..., Any]]:
    """The hooks of a routed engine's ``dialect``: made once per engine (making eleven
    closures per test cost more than the rest of a route's set-up), each acting for the route
    ``pool`` is attached to when it runs. They hold no engine: the pool is kept per engine
    while the engine lives."""
    cls = type(dialect)
    routing = pool._routing

    def guard(route: Route, statement: str) -> None:
        __tracebackhide__ = True
        replica_of, engine = route.replica_of, route.engine
        if replica_of is not None and not proves_read_only(statement):
            first_line = statement.strip().splitlines()[0][:80]
            raise ReadOnlyReplicaError(
                f"{mask(engine.url)} is a read replica of {replica_of} ({_DATABASES_INI}), and "
                f"{first_line!r} writes: a replica refuses writes, so the plugin does too "
                f"(the test sees {replica_of}'s data through it, read-only). Write through "
                f"{replica_of}'s engine, as the application must in production."
            )
        watch = route.sandbox.watch
        if watch.guard.match(statement):
            first_line = statement.strip().splitlines()[0][:80]
            watch.refuse(
                f"pytest-alchemy refused to run {first_line!r} through "
                f"{mask(engine.url)}: it would end the test's outer transaction, and what "
                f"the test wrote would survive it. {dialects.refusal_advice(statement)}"
            )

    def executing(method: str) -> Callable[..., None]:
        run = getattr(cls, method)

        def execute(cursor: DBAPICursor, statement: str, *args: Any) -> None:
            route = routing()
            context = args[-1] if args else None
            party = getattr(getattr(context, "root_connection", None), "connection", None)
            guard(route, statement)
            route.sandbox.savepoints.execute(
                party, statement, lambda: run(dialect, cursor, statement, *args)
            )

        return execute

    def begin(ledger: Savepoints, fairy: PoolProxiedConnection) -> None:
        if not ledger.adopt(fairy):
            ledger.open(fairy, fairy)

    def locked(function: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            sandbox = routing().sandbox
            with sandbox.lock:
                return function(sandbox.savepoints, *args)

        return run

    def set_isolation_level(dbapi_connection: DBAPIConnection, level: str) -> None:
        # Other levels are moot on one connection that nothing else shares; AUTOCOMMIT
        # would commit every statement for real.
        if level.upper().replace("_", " ") == "AUTOCOMMIT":
            raise UnsandboxedEngineError(
                f"{routing().label} asked for isolation level 'AUTOCOMMIT' during a test. Its "
                f"connection is the test's, inside a transaction that must stay open, and "
                f"autocommit would make every statement permanent. Test code that needs "
                f"autocommit (CREATE INDEX CONCURRENTLY, VACUUM) against a database of its "
                f"own, outside the sandbox."
            )

    hooks: dict[str, Callable[..., Any]] = {
        # SQLAlchemy creates the statement's cursor before it autobegins, and that cursor
        # opened the savepoint already (see _SandboxFairy): adopt it.
        "do_begin": locked(begin),
        "do_commit": locked(Savepoints.release),
        "do_rollback": locked(Savepoints.rollback),
        "do_savepoint": locked(
            lambda ledger, connection, name: ledger.open((connection, name), connection.connection)
        ),
        "do_release_savepoint": locked(
            lambda ledger, connection, name: ledger.release((connection, name))
        ),
        "do_rollback_to_savepoint": locked(
            lambda ledger, connection, name: ledger.rollback((connection, name))
        ),
        "do_execute": executing("do_execute"),
        "do_execute_no_params": executing("do_execute_no_params"),
        "do_executemany": executing("do_executemany"),
        "set_isolation_level": set_isolation_level,
        "reset_isolation_level": lambda dbapi_connection: None,
    }
    assert set(hooks) == set(_HOOKS)
    return hooks


_MISSING = object()


class _Refusal:
    """An engine that cannot join, refusing to connect until :meth:`stop`."""

    def __init__(
        self, engine: Engine, message: str, error: type[AlchemyError] = UnsandboxedEngineError
    ) -> None:
        self.engine = engine
        self._pool = engine.pool
        self._refusing = _RefusingPool(engine, message, error)
        engine.pool = self._refusing
        self.message = message

    @property
    def refused(self) -> bool:
        return self._refusing.refused

    def stop(self) -> None:
        self.engine.pool = self._pool


class _Lazy:
    """A sync engine routed into a sandbox that is opened at its first use, until
    :meth:`stop`: a test that never uses it costs no connection, no schema, no round trip.

    ``provider`` opens (or refuses, raising) the sandbox.
    """

    def __init__(
        self, engine: Engine, provider: Callable[[], Sandbox], replica_of: str | None
    ) -> None:
        self.engine = engine
        self._provider = provider
        self._replica_of = replica_of
        self._pool = engine.pool
        self._lock = threading.RLock()
        self.route: Route | None = None
        self._stopped = False
        engine.pool = _PendingPool.attach(self)

    def begin(self) -> Pool:
        """Open the sandbox and start the route (once); the pool to check out of now."""
        with self._lock:
            if self.route is None and not self._stopped:
                sandbox = self._provider()
                self.engine.pool = self._pool  # what the route saves and gives back
                route = Route(self.engine, sandbox, self._replica_of)
                try:
                    route.start()
                except BaseException:
                    self.engine.pool = _PendingPool.attach(self)
                    raise
                self.route = route
        return self.engine.pool

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            if self.route is not None:
                self.route.stop()
            self.engine.pool = self._pool
            pending = _PENDING_POOLS.get(self.engine)
            if pending is not None and pending._lazy is self:
                pending._lazy = None


class _Direct:
    """An application engine reaching the test database itself, with real commits (a test of
    the commit strategy), until :meth:`stop`: its pool is one of the test database's, through
    the engine's own driver, so nothing it writes lands in the database its URL names."""

    def __init__(self, engine: Engine, url: URL, is_async: bool) -> None:
        from sqlalchemy.pool import NullPool

        self.engine = engine
        self._pool = engine.pool
        url = url.set(drivername=engine.url.drivername)
        if is_async:
            from sqlalchemy.ext.asyncio import create_async_engine

            self._build = create_async_engine(url, poolclass=NullPool).sync_engine
        else:
            from sqlalchemy import create_engine

            self._build = create_engine(url, poolclass=NullPool)
        OWN_ENGINES.add(self._build)
        if engine.dialect.server_version_info is None:
            event.listen(self._build.pool, "connect", self._initialize)
        engine.pool = self._build.pool

    def _initialize(self, dbapi_connection: DBAPIConnection, record: ConnectionPoolEntry) -> None:
        """The engine never connected: its dialect learns the server on the first connection,
        as the engine's own first connect would have (inside the greenlet, for an async one)."""
        from sqlalchemy.engine.base import Connection as Adhoc
        from sqlalchemy.pool.base import _AdhocProxiedConnection

        dialect = self.engine.dialect
        if dialect.server_version_info is not None:
            return
        connection = Adhoc(
            self.engine,
            connection=_AdhocProxiedConnection(dbapi_connection, record),
            _has_events=False,
            _allow_revalidate=False,
            _allow_autobegin=False,
        )
        dialect.initialize(connection)
        dialect.do_rollback(connection.connection)

    def stop(self) -> None:
        self.engine.pool = self._pool
        self._build.dispose()


class Routes:
    """The routes of one test, stopped together when it ends."""

    def __init__(self) -> None:
        self._routes: dict[int, Route | _Refusal | _Direct | _Lazy] = {}
        self._following: dict[int, Callable[[], None]] = {}  # id(obj): undo

    def follow(self, objects: Iterable[object], reroute: Callable[[object], None]) -> None:
        """Route the engines these objects make or take during the test as they do.

        An app made per test makes its engines after the test's routing began: a
        Flask-SQLAlchemy ``db``'s ``init_app`` (one engine per app), a sessionmaker
        ``configure(bind=...)``'d anew. ``reroute(obj)`` routes what ``obj`` holds then,
        before the new engine is first used (a factory's ``has_table`` sees the sandbox).
        """
        for obj in objects:
            if id(obj) in self._following:
                continue
            maker = getattr(obj, "session_factory", obj)  # a scoped_session's sessionmaker
            if isinstance(getattr(maker, "kw", None), dict) and hasattr(maker, "class_"):
                self._following[id(obj)] = _wrap(maker, "configure", obj, reroute, after=True)
            elif hasattr(obj, "_app_engines") and hasattr(obj, "_make_engine"):
                self._following[id(obj)] = _wrap(obj, "_make_engine", obj, reroute)

    def add(self, engine: Engine, sandbox: Sandbox, replica_of: str | None = None) -> None:
        """Route ``engine`` into ``sandbox`` from now on; ``replica_of``: read-only, as a
        read replica of that database."""
        root = _root(engine)
        if id(root) in self._routes or root is _root(sandbox.connection.engine):
            return  # routed already, or the sandbox's own engine
        route = Route(root, sandbox, replica_of)
        route.start()
        self._routes[id(root)] = route

    def add_lazy(
        self, engine: Engine, provider: Callable[[], Sandbox], replica_of: str | None = None
    ) -> None:
        """Route the sync ``engine`` into the sandbox ``provider`` opens at its first use."""
        root = _root(engine)
        if id(root) not in self._routes:
            self._routes[id(root)] = _Lazy(root, provider, replica_of)

    def direct(self, engine: Engine, url: URL, is_async: bool) -> None:
        """Point ``engine`` at the test database ``url`` itself, until the test ends."""
        root = _root(engine)
        if id(root) not in self._routes:
            self._routes[id(root)] = _Direct(root, url, is_async)

    def refuse(
        self, engine: Engine, message: str, error: type[AlchemyError] = UnsandboxedEngineError
    ) -> None:
        """Make ``engine`` raise ``message`` on connecting, until the test ends."""
        root = _root(engine)
        if id(root) not in self._routes:
            self._routes[id(root)] = _Refusal(root, message, error)

    def routed(self, engine: Engine) -> bool:
        return id(_root(engine)) in self._routes

    def stop(self) -> list[str]:
        """Stop every route; the refusals that were met (the test fails with them: inside an
        app they may have become a bare HTTP 500)."""
        following, self._following = self._following, {}
        for undo in following.values():
            undo()
        routes, self._routes = self._routes, {}
        for route in reversed(list(routes.values())):
            route.stop()
        return [r.message for r in routes.values() if isinstance(r, _Refusal) and r.refused]


def _wrap(
    holder: Any,
    method: str,
    obj: object,
    reroute: Callable[[object], None],
    *,
    after: bool = False,
) -> Callable[[], None]:
    """Make ``holder.method`` reroute ``obj`` once it has run (a sessionmaker's ``configure``)
    or on the engine it returns (Flask-SQLAlchemy's ``_make_engine``); the undo."""
    original = getattr(holder, method)
    had_own = method in vars(holder)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        made = original(*args, **kwargs)
        reroute(obj if after else made)
        return made

    setattr(holder, method, wrapper)

    def undo() -> None:
        if had_own:
            setattr(holder, method, original)
        else:
            vars(holder).pop(method, None)

    return undo


# -- escapes ----------------------------------------------------------------------------------


def database_key(url: URL) -> tuple[Any, ...] | None:
    """What identifies the database a URL points at, whatever the driver; None for memory."""
    backend = url.get_backend_name()
    family = "mysql" if backend == "mariadb" else backend
    if family == "sqlite":
        if dialects.is_memory(url):
            return None
        return (family, os.path.realpath(url.database or ""))
    host = url.host or "localhost"
    host = "127.0.0.1" if host == "localhost" else host
    port = url.port or {"postgresql": 5432, "mysql": 3306}.get(family)
    return (family, host, port, url.database)


class EscapeWatch:
    """Notices commits, during a test, through engines not routed: to the test database
    (what they wrote survives the test) and to the base database named in alchemy_url (which
    tests must never write).

    With ``block`` (ini ``alchemy_block_unsandboxed``), such an engine cannot even connect.
    Listens on the Engine class, so it sees engines created before and after it is installed;
    installed on first use and removed at the end of the run.
    """

    def __init__(self, block: bool) -> None:
        self.block = block
        self.keys: set[tuple[Any, ...]] = set()
        self.base_keys: set[tuple[Any, ...]] = set()
        self.active = False
        self.routes: Routes | None = None
        self.escapes: list[str] = []
        #: The test databases (database_key) an escape reached: they must be restored.
        self.test_database_written: set[tuple[Any, ...]] = set()
        #: What was said of a restore done before the escape was reported (the run's end).
        self.restored = ""
        self._installed = False
        self._watching: tuple[tuple[URL, ...], tuple[URL, ...]] | None = None

    def watch(self, urls: Iterable[URL], base: Iterable[URL] = ()) -> None:
        urls, base = tuple(urls), tuple(base)
        if (urls, base) == self._watching:
            return  # the databases of the last test: keys known, listeners installed
        self._watching = (urls, base)
        self.keys = {key for key in map(database_key, urls) if key is not None}
        self.base_keys = {key for key in map(database_key, base) if key is not None} - self.keys
        if not self._installed and self.keys:
            self._installed = True
            event.listen(Engine, "commit", self._commit)
            if self.block:
                event.listen(Engine, "engine_connect", self._connect)

    def uninstall(self) -> None:
        self._watching = None
        if self._installed:
            self._installed = False
            event.remove(Engine, "commit", self._commit)
            if self.block:
                event.remove(Engine, "engine_connect", self._connect)

    def _escaping(self, connection: Connection) -> str | None:
        """``"test"`` or ``"base"``: the database an escaping connection is on; else None."""
        from pytest_alchemy.sandbox import sandbox_of

        engine = connection.engine
        if not self.active or engine in OWN_ENGINES:
            return None
        root = _root(engine)
        if root in OWN_ENGINES or isinstance(
            root.pool, (_SandboxPool, _RefusingPool, _PendingPool)
        ):
            return None
        if sandbox_of(connection) is not None:  # the sandbox's own: guarded there
            return None
        key = database_key(engine.url)
        if key in self.keys:
            return "test"
        return "base" if key in self.base_keys else None

    def _commit(self, connection: Connection) -> None:
        where = self._escaping(connection)
        if where is None:
            return
        engine = connection.engine
        if where == "test":
            key = database_key(engine.url)
            if key is not None:
                self.test_database_written.add(key)
            self.escapes.append(
                f"{mask(engine.url)} committed to the test database outside the test's "
                f"sandbox, so what it wrote survived the test. {fix(engine)}"
            )
        else:
            self.escapes.append(
                f"{mask(engine.url)} committed to the base database named in alchemy_url, "
                f"which tests must never write: what it wrote stays there. {fix(engine)}"
            )

    def _connect(self, connection: Connection) -> None:
        where = self._escaping(connection)
        if where is not None:
            database = "the test database" if where == "test" else "the base database"
            message = (
                f"{mask(connection.engine.url)} connected to {database} outside the "
                f"test's sandbox, which alchemy_block_unsandboxed forbids. "
                f"{fix(connection.engine)}"
            )
            self.escapes.append(message)
            connection.invalidate()  # closes the DBAPI connection too: nothing left pooled
            connection.close()
            raise UnsandboxedEngineError(message)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Not watching while the plugin provisions (it commits to the test database)."""
        active, self.active = self.active, False
        try:
            yield
        finally:
            self.active = active

    def take(self) -> tuple[list[str], set[tuple[Any, ...]]]:
        """The escapes seen since the last call, and the test databases they wrote."""
        found, self.escapes = self.escapes, []
        written, self.test_database_written = self.test_database_written, set()
        return list(dict.fromkeys(found)), written


class Blocker:
    """``alchemy_require_marker``: while a test that did not ask for the database runs, any
    engine that connects to the test or base database is refused, saying which test and what
    to do. Listens on the Engine class from the first such test to the end of the run."""

    def __init__(self) -> None:
        self.test: str | None = None  # the node id of the blocked test running now
        self.keys: set[tuple[Any, ...]] = set()
        self.seen: list[str] = []
        self._installed = False

    def start(self, test: str, urls: Iterable[URL]) -> None:
        self.test = test
        self.keys = {key for key in map(database_key, urls) if key is not None}
        if not self._installed:
            self._installed = True
            event.listen(Engine, "engine_connect", self._connect)

    def stop(self) -> list[str]:
        """The test is over: what it was refused."""
        self.test = None
        seen, self.seen = self.seen, []
        return list(dict.fromkeys(seen))

    def uninstall(self) -> None:
        self._watching = None
        if self._installed:
            self._installed = False
            event.remove(Engine, "engine_connect", self._connect)

    def _connect(self, connection: Connection) -> None:
        test = self.test
        if test is None:
            return
        engine = connection.engine
        root = _root(engine)
        if root in OWN_ENGINES or root in PLUGIN_ENGINES:
            return  # the plugin's: a fixture the test asked for after all
        if database_key(engine.url) not in self.keys:
            return
        message = blocked(test, engine)
        self.seen.append(message)
        connection.invalidate()
        connection.close()
        raise DatabaseBlockedError(message)


def blocked(test: str, engine: Engine) -> str:
    """Why ``test`` may not use ``engine``, and what to do."""
    return (
        f"{test} used the database ({mask(engine.url)}) without asking for it: "
        f"alchemy_require_marker is on, so only tests that request a database fixture "
        f"(db_session, db_connection, async_db_session, ...) or carry @pytest.mark.alchemy may. "
        f"Request one, or mark the test @pytest.mark.alchemy() (a module: pytestmark = "
        f"pytest.mark.alchemy())."
    )


def fix(engine: Engine) -> str:
    """How to route ``engine``: the ini line naming where it lives, when it can be found."""
    if _root(engine) in PLUGIN_ENGINES:
        return (
            "It is db_engine (or async_db_engine): its own connections, from connect() and "
            "begin(), are outside the sandbox. Use db_connection or db_session (their async "
            "twins in async tests), which are inside it."
        )
    paths = list(_import_paths(_root(engine)))
    configured = set(_ROUTERS[-1].paths) if _ROUTERS else set()
    listed = [path for path in paths if path in configured]
    if listed:  # the advice "add it to alchemy_engines" would go round in a circle
        return (
            f"It belongs to {listed[0]}, which {_ENGINES_INI} lists, but it was made or bound "
            f"during the test in a way the plugin does not see. Route it as it is made: call "
            f"db_route({listed[0].rpartition(':')[2]}) in the test or fixture right after "
            f"making it (after create_app(), say), or pytest_alchemy.route_engines() there."
        )
    if paths:
        return (
            f"Route it into the sandbox: add `{_ENGINES_INI} = {paths[0]}` to your pytest ini "
            f"(one import path per line)."
        )
    return (
        f"Route it into the sandbox: list the module attribute holding it in {_ENGINES_INI} "
        f"('module:attribute', one per line), or pass it to db_route() in the test, or to "
        f"pytest_alchemy.route_engines() where it is created."
    )


def _import_paths(engine: Engine) -> Iterator[str]:
    skip = ("sqlalchemy", "pytest", "_pytest", "pluggy", "pytest_alchemy")
    for name, module in list(sys.modules.items()):
        if module is None or name.split(".")[0] in skip:
            continue
        for attribute, value in list(getattr(module, "__dict__", {}).items()):
            if attribute.startswith("__") or isinstance(value, type):
                continue
            try:
                if any(found is engine for found, _ in engines_of(value)):
                    yield f"{name}:{attribute}"
            except Exception:
                continue


# -- the run's router -------------------------------------------------------------------------


class Router:
    """What the run routes: ``alchemy_engines`` (imported on first use) and what
    :func:`route_engines` added; plus the run's :class:`EscapeWatch`."""

    def __init__(self, paths: tuple[str, ...], block: bool) -> None:
        self.paths = paths
        self._loaded: list[object] | None = None
        self.added: list[object] = []
        self.escapes = EscapeWatch(block)
        self.blocker = Blocker()
        self._guards: dict[int, _Refusal] = {}
        self._following = Routes()  # only follows: guards what the objects make
        #: Called when route_engines() adds objects (the plugin gives the running test its
        #: routing fixture then).
        self.on_added: Callable[[], None] | None = None

    def configured(self) -> bool:
        return bool(self.paths or self.added)

    def objects(self) -> list[object]:
        if self._loaded is None:
            self._loaded = [load(path) for path in self.paths]
        return self._loaded + self.added

    def guard(self) -> None:
        """Refuse the engines of ``alchemy_engines`` outside tests' sandboxes.

        Module-, class- and session-scoped fixtures run before a test's routing starts: there
        such an engine would reach its own URL, often the developer's database, and keep what
        it wrote. Guarded, it refuses to connect there, saying what to do; inside a test the
        route takes over its pool, and hands the guard back after. Engines the objects make
        later (Flask-SQLAlchemy's ``init_app``, a sessionmaker's ``configure(bind=...)``) are
        guarded as they are made: an app factory run in a session-scoped fixture never
        reaches the database its settings name.
        """
        if self._loaded is None:
            self.objects()
        for obj in self._loaded or ():
            self._guard(obj)
        self._following.follow(self._loaded or (), self._guard)

    def _guard(self, obj: object) -> None:
        for engine, _ in engines_of(obj):
            root = _root(engine)
            if id(root) not in self._guards:
                self._guards[id(root)] = _Refusal(root, _outside(root))

    def unguard(self) -> None:
        self._following.stop()
        guards, self._guards = self._guards, {}
        for refusal in reversed(list(guards.values())):
            refusal.stop()


def _outside(engine: Engine) -> str:
    return (
        f"The application engine {mask(engine.url)} (listed in {_ENGINES_INI}) was used "
        f"outside a test: in a module-, class- or session-scoped fixture, at import or "
        f"collection time, or after the run. While pytest-alchemy runs, such an engine only "
        f"joins a test's sandbox: outside one it would reach {mask(engine.url)} itself (often "
        f"the development database) and keep what it wrote. Use it from the test or a "
        f"function-scoped fixture; rows every test needs belong in alchemy_seed."
    )


_ROUTERS: list[Router] = []


def push(router: Router) -> None:
    _ROUTERS.append(router)


def pop(router: Router) -> None:
    if router in _ROUTERS:
        _ROUTERS.remove(router)
    router.escapes.uninstall()
    router.blocker.uninstall()
    router.unguard()


@contextlib.contextmanager
def building(url: URL) -> Iterator[None]:
    """While the plugin builds the test database ``url``, the engines of ``alchemy_engines``
    connect to it, with real commits, as the plugin's own connections do.

    For an env.py that migrates through the application's engine rather than the URL the
    plugin sets (Flask-Migrate's reads ``current_app``'s ``db.engine``): the migrations land
    in the test database, never in the one the engine names. Sync engines of the same backend
    only; afterwards each has its own pool (or the guard) back.

    Meanwhile any other engine is refused a connection to any other database: an env.py that
    builds an engine from the application's settings would migrate that database (often the
    developer's), which the plugin must never write.
    """
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    router = _ROUTERS[-1] if _ROUTERS else None
    swapped: dict[int, tuple[Engine, Pool, Engine]] = {}
    target = database_key(url)

    def elsewhere(connection: Connection) -> None:
        engine = connection.engine
        root = _root(engine)
        if id(root) in swapped or root in OWN_ENGINES or database_key(engine.url) == target:
            return
        connection.invalidate()
        connection.close()
        raise UnsandboxedEngineError(
            f"While the plugin migrated the test database {mask(url)}, {mask(engine.url)} "
            f"connected to another database, which the migrations would have changed, so it "
            f"was refused. env.py must migrate the URL the plugin sets in the Alembic config "
            f"(engine_from_config(config.get_section(config.config_ini_section), "
            f"prefix='sqlalchemy.')), or the application's engine listed in {_ENGINES_INI} "
            f"(the plugin points it at the test database while migrating, as Flask-Migrate's "
            f"env.py needs: add `{_ENGINES_INI} = myapp:db`)."
        )

    event.listen(Engine, "engine_connect", elsewhere)
    try:
        for obj in router.objects() if router is not None and router.configured() else ():
            for engine, _ in engines_of(obj):
                root = _root(engine)
                if id(root) in swapped or root.dialect.is_async:
                    continue
                if root.url.get_backend_name() != url.get_backend_name():
                    continue
                build = create_engine(url.set(drivername=root.url.drivername), poolclass=NullPool)
                OWN_ENGINES.add(build)
                if root.dialect.server_version_info is None:  # as its first connect would
                    with build.connect() as connection:
                        root.dialect.initialize(connection)
                swapped[id(root)] = (root, root.pool, build)
                root.pool = build.pool
        yield
    finally:
        event.remove(Engine, "engine_connect", elsewhere)
        for root, pool, build in swapped.values():
            root.pool = pool
            build.dispose()


def route_engines(*objects: object) -> None:
    """Route these into the sandbox of every test from now on, like ``alchemy_engines``.

    For engines made at run time by an application factory, in a session-scoped fixture::

        @pytest.fixture(scope="session")
        def app():
            app = create_app()
            pytest_alchemy.route_engines(app.state.engine)
            return app

    Takes what ``alchemy_engines`` takes: an Engine, an AsyncEngine, a ``sessionmaker``,
    ``async_sessionmaker``, ``scoped_session``, or a Flask-SQLAlchemy extension. For one test
    only, use the ``db_route`` fixture.
    """
    from pytest_alchemy.errors import AlchemyError

    if not _ROUTERS:
        raise AlchemyError(
            "route_engines() was called outside a pytest run with pytest-alchemy active; call "
            "it from a fixture or conftest.py."
        )
    for obj in objects:
        engines_of(obj)  # a TypeError now, rather than in every later test
    router = _ROUTERS[-1]
    router.added.extend(objects)
    if router.on_added is not None:
        router.on_added()
