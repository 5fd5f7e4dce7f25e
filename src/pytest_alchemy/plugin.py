"""pytest entry point: options, ini keys, the report header, and the fixtures.

Thin on purpose: the fixtures delegate to :mod:`pytest_alchemy.provision` (the target),
:mod:`pytest_alchemy.sandbox` (sync) and :mod:`pytest_alchemy.aio` (async). Nothing here runs
until a test requests a database fixture.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from pytest_alchemy import config as _config
from pytest_alchemy import markers, routing, sessions
from pytest_alchemy.errors import AlchemyError, SandboxBrokenError, UnsandboxedEngineError
from pytest_alchemy.provision import Target, Targets
from pytest_alchemy.sandbox import (
    JOIN_MODE,
    Sandbox,
    cached_maker,
    close_session_after,
    sandbox_of,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator

    from sqlalchemy.engine import URL, Connection, Engine
    from sqlalchemy.ext.asyncio import (
        AsyncConnection,
        AsyncEngine,
        AsyncSession,
        async_sessionmaker,
    )
    from sqlalchemy.orm import Session, sessionmaker

    from pytest_alchemy.aio import AsyncSandbox

_SETTINGS = pytest.StashKey[_config.Settings]()
_ROUTER = pytest.StashKey[routing.Router]()
_TARGET = pytest.StashKey[Targets]()
#: The target whose database a test's sandbox is on.
_TEST_TARGET = pytest.StashKey[Target]()
_COUNTERS_NEEDED = pytest.StashKey[bool]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("alchemy", "pytest-alchemy: a transactional database sandbox per test")
    url, async_url = _config.URL_OPTION, _config.ASYNC_URL_OPTION
    group.addoption(
        url.cli,
        dest=url.dest,
        default=None,
        metavar="URL",
        help=f"SQLAlchemy URL of the test database (env {url.env}, ini {url.ini}); "
        "default: a SQLite file in pytest's temporary directory.",
    )
    group.addoption(
        async_url.cli,
        dest=async_url.dest,
        default=None,
        metavar="URL",
        help=f"SQLAlchemy URL for the async fixtures (env {async_url.env}, ini {async_url.ini}); "
        "default: derived from --alchemy-url (psycopg -> psycopg_async, pysqlite -> aiosqlite, "
        "pymysql -> asyncmy).",
    )
    parser.addini(url.ini, help="SQLAlchemy URL of the test database.", default="")
    parser.addini(async_url.ini, help="SQLAlchemy URL for the async fixtures.", default="")
    suffix = _config.SUFFIX_OPTION
    group.addoption(
        suffix.cli,
        dest=suffix.dest,
        default=None,
        metavar="SUFFIX",
        help=f"Appended to the test database's name, so concurrent runs against one server "
        f"never collide (env {suffix.env}, ini {suffix.ini}).",
    )
    parser.addini(suffix.ini, help="Appended to the test database's name.", default="")
    group.addoption(
        "--alchemy-reuse",
        dest="alchemy_reuse",
        action="store_true",
        default=None,
        help="Keep the test databases after the run, and reuse them in the next run when the "
        "schema fingerprint is unchanged (ini alchemy_reuse).",
    )
    group.addoption(
        "--alchemy-recreate",
        dest="alchemy_recreate",
        action="store_true",
        default=None,
        help="Rebuild the test databases even when they could be reused.",
    )
    parser.addini(
        _config.REUSE_INI, type="bool", default=False, help="Keep and reuse test databases."
    )
    parser.addini(
        _config.TEST_DATABASE_INI,
        default="",
        help="Name of the test database (default: 'test_' + the database named in the URL).",
    )
    parser.addini(
        _config.ALEMBIC_INI,
        default="",
        help="Path of an alembic.ini whose 'upgrade head' builds the schema once per run.",
    )
    parser.addini(
        _config.SEED_INI,
        default="",
        help="Import path 'module:function' called once per run with a Connection, after the "
        "schema is built, to insert rows every test sees.",
    )
    parser.addini(
        _config.ENGINES_INI,
        type="linelist",
        default=[],
        help="Import paths 'module:attr' of the application's engines, sessionmakers, "
        "scoped sessions or Flask-SQLAlchemy db, routed into each test's sandbox.",
    )
    parser.addini(
        _config.DATABASES_INI,
        type="linelist",
        default=[],
        help="The application's other databases, 'name = URL [module:Base ...]' per line (or "
        "'name = URL replica of other'): each gets a test database and a sandbox per test, and "
        "the engines of alchemy_engines on its URL join that sandbox.",
    )
    parser.addini(
        _config.BLOCK_INI,
        type="bool",
        default=False,
        help="Refuse, during a test, any connection to the test database through an engine "
        "that is not routed into the sandbox.",
    )
    parser.addini(
        sessions.OPTIONS_INI,
        type="linelist",
        default=[],
        help="'key = value' lines passed to the fixtures' sessionmakers, e.g. "
        "'expire_on_commit = false'.",
    )
    parser.addini(
        sessions.CLASS_INI,
        default="",
        help="Import path of the Session class db_session is made of (default: SQLModel's with "
        "SQLModel metadata, else SQLAlchemy's).",
    )
    parser.addini(
        sessions.ASYNC_CLASS_INI,
        default="",
        help="Import path of the AsyncSession class async_db_session is made of.",
    )
    parser.addini(
        _config.THREAD_WAIT_INI,
        default=f"{_config.THREAD_WAIT_DEFAULT:g}",
        help="Seconds a thread waits for another thread's statement on the test's shared "
        f"connection before failing with the reason (default {_config.THREAD_WAIT_DEFAULT:g}).",
    )
    parser.addini(
        _config.RESET_SEQUENCES_INI,
        type="bool",
        default=False,
        help="After each test, put the id counters (PostgreSQL sequences, MySQL AUTO_INCREMENT) "
        "of the tables it inserted into back to the template's values; per test: "
        "@pytest.mark.alchemy(reset_sequences=...).",
    )
    parser.addini(
        _config.METADATA_INI,
        type="linelist",
        default=[],
        help="Import paths 'module:attr' of MetaData objects or declarative bases whose tables "
        "are created once per run and dropped at its end.",
    )


def pytest_configure(config: pytest.Config) -> None:
    markers.register(config)
    settings = config.stash[_SETTINGS] = _config.resolve(config)
    router = config.stash[_ROUTER] = routing.Router(settings.engines, settings.block_unsandboxed)
    routing.push(router)
    config.pluginmanager.register(_async_fixtures(config), "alchemy-async-fixtures")
    if settings.engines:
        config.pluginmanager.register(_engine_guard(), "alchemy-engine-guard")
    if config.pluginmanager.has_plugin("xdist") and not hasattr(config, "workerinput"):
        config.pluginmanager.register(
            _XdistController(settings.run_id, settings.run_pid), "alchemy-xdist"
        )


def _defaults(config: pytest.Config) -> markers.Options:
    return markers.Options(reset_sequences=config.stash[_SETTINGS].reset_sequences)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Counters are read when a database is first used, if any test of the run resets them.
    config.stash[_COUNTERS_NEEDED] = markers.check(items, _defaults(config))
    config.stash[_SCHEMAS_OVERRIDDEN] = _check_schema_scopes(items)


#: Some test sees an alchemy_metadata fixture of the user's (a schema of its own).
_SCHEMAS_OVERRIDDEN = pytest.StashKey[bool]()


def _check_schema_scopes(items: list[pytest.Item]) -> bool:
    """Whether some test has a schema of its own; an alchemy_metadata fixture of the user's
    that db_engine cannot use is a usage error naming it and the fix, rather than pytest's
    ScopeMismatch from inside the plugin."""
    seen: dict[int, Any] = {}
    for item in items:
        defs = _fixturedefs(item, "alchemy_metadata")
        if defs:
            seen.setdefault(id(defs[-1]), defs[-1])
    users = [d for d in seen.values() if getattr(d.func, "__module__", None) != __name__]
    for fixturedef in users:
        if fixturedef.scope != "session":
            where = fixturedef.baseid or "a plugin"
            raise pytest.UsageError(
                f"The alchemy_metadata fixture of {where} is {fixturedef.scope}-scoped; it "
                f"chooses the schema of db_engine, which is session-scoped, so it must be too: "
                f'@pytest.fixture(scope="session") (in a class, with @classmethod below it).'
            )
    return bool(users)


def _counters_for(request: pytest.FixtureRequest, target: Target, sandbox: Sandbox) -> None:
    """Arm the sandbox to reset the id counters after the test, if the test asks for it."""
    config = request.config
    if not config.stash.get(_COUNTERS_NEEDED, False):
        return
    counters = target.counters_of(sandbox)
    if markers.options_for(request.node, _defaults(config)).reset_sequences:
        sandbox.counters = counters


def pytest_unconfigure(config: pytest.Config) -> None:
    router = config.stash.get(_ROUTER, None)
    if router is not None:
        routing.pop(router)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # anyio's runner is held across tests for one loop per run (aio.AnyioLease); a test on
    # another anyio backend gets it released first, so anyio starts that backend's runner.
    targets = item.config.stash.get(_TARGET, None)
    callspec = getattr(item, "callspec", None)
    backend = callspec.params.get("anyio_backend") if callspec is not None else None
    if targets is not None and backend is not None:
        name = backend[0] if isinstance(backend, tuple) else backend
        if name != "asyncio":
            for target in targets.all():
                target.loops.anyio.release()
    _switch_schema(item)


#: Which alchemy_metadata fixture db_engine was made for.
_ENGINE_SCHEMA = pytest.StashKey[object]()


def _switch_schema(item: pytest.Item) -> None:
    """Before a test whose alchemy_metadata is another fixture than the one db_engine was
    made for (it is overridden in a directory, module or class), db_engine is torn down, with
    the session fixtures that depend on it, and made again for this test's schema: as pytest
    does when a parametrized session fixture changes its value. Looked up, not taken from the
    test's fixtures: the routing fixture asks for db_connection only as the test runs."""
    request = getattr(item, "_request", None)
    if request is None or not item.config.stash.get(_SCHEMAS_OVERRIDDEN, True):
        return
    found = _fixturedefs(item, "db_engine")
    if not found or found[-1].cached_result is None:
        return
    fixturedef = found[-1]
    if getattr(fixturedef.func, "__module__", None) != __name__:
        return  # the user's own db_engine
    schemas = _fixturedefs(item, "alchemy_metadata")
    wanted = schemas[-1] if schemas else None
    if item.config.stash.get(_ENGINE_SCHEMA, None) is not wanted:
        fixturedef.finish(request)


def _fixturedefs(item: pytest.Item, name: str) -> list[Any]:
    """The definitions of the fixture ``name`` that ``item`` sees, the closest last."""
    manager = getattr(item.session, "_fixturemanager", None)
    found = manager.getfixturedefs(name, item) if manager is not None else None
    return list(found or ())


_CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed
    return report


def _swallowed(request: pytest.FixtureRequest, raised: str | None) -> bool:
    """Whether an error raised during the test went unreported (the test passed anyway)."""
    return raised is not None and not request.node.stash.get(_CALL_FAILED, False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    # Escapes are looked for while the test body runs: fixtures' set-up (provisioning, an
    # Alembic upgrade) commits to the test database by design.
    router = item.config.stash.get(_ROUTER, None)
    targets = item.config.stash.get(_TARGET, None)
    watch = router.escapes if router is not None else None
    if watch is not None and targets is not None and targets.known_urls:
        watch.watch(targets.known_urls, targets.known_base)
        watch.active = True
    try:
        return (yield)
    finally:
        if watch is not None:
            watch.active = False


def _engine_guard() -> types.ModuleType:
    """Registered when alchemy_engines is set: its engines are guarded from the session's
    start, before any module-, class- or session-scoped fixture can use them."""

    @pytest.fixture(scope="session", autouse=True)
    def _alchemy_engine_guard(request: pytest.FixtureRequest) -> None:
        try:
            request.config.stash[_ROUTER].guard()
        except pytest.UsageError as exc:  # alchemy_engines names what cannot be imported
            pytest.fail(str(exc), pytrace=False)

    module = types.ModuleType("pytest_alchemy._engine_guard")
    module._alchemy_engine_guard = _alchemy_engine_guard  # type: ignore[attr-defined]
    return module


class _XdistController:
    """pytest-xdist hooks of the controller: one run id for all workers, templates dropped last.

    Each worker builds the run's template at most once (they take turns), clones its own
    database from it, and reports the template here; the controller drops it once every worker
    is done, so no worker drops it under another.
    """

    def __init__(self, run_id: str, run_pid: int) -> None:
        self.run_id = run_id
        self.run_pid = run_pid
        self.templates: dict[str, bool] = {}  # URL: kept for reuse

    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput[_config.RUN_ID_KEY] = self.run_id
        node.workerinput[_config.RUN_PID_KEY] = self.run_pid

    def pytest_testnodedown(self, node: Any, error: object) -> None:
        output = getattr(node, "workeroutput", {})
        for template, kept in output.get(_TEMPLATES_KEY, ()):
            self.templates[template] = self.templates.get(template, True) and kept

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        from sqlalchemy.engine import make_url

        from pytest_alchemy import databases

        for template, kept in sorted(self.templates.items()):
            with contextlib.suppress(Exception):  # a worker's throwaway server is gone already
                databases.release_template(make_url(template), self.run_id, kept=kept)
        settings = session.config.stash[_SETTINGS]
        if settings.reuse:
            return
        # What workers that crashed or were interrupted (Ctrl-C) could not drop themselves.
        with contextlib.suppress(Exception):
            for line in _clear_workers_leftovers(settings):
                _report(session.config, line)


_TEMPLATES_KEY = "alchemy_templates"


def _clear_workers_leftovers(settings: _config.Settings) -> list[str]:
    from pytest_alchemy import databases, dialects, ephemeral, ownership

    owner = ownership.Owner(settings.run_id, settings.run_pid)
    bases = [(settings.url.url, settings.test_database)]
    bases += [(d.url, None) for d in settings.databases if d.replica_of is None]
    done = []
    for url, name in bases:
        if url is None or ephemeral.wanted(url) or dialects.is_memory(url):
            continue  # pytest's temporary directory; a worker's own server
        naming = databases.Naming(name, settings.database_suffix)
        done += databases.sweep(url, naming, owner, ours=True)
    return done


def pytest_report_header(config: pytest.Config) -> list[str]:
    return _config.describe(config.stash[_SETTINGS])


def _fail(exc: AlchemyError) -> NoReturn:
    __tracebackhide__ = True
    pytest.fail(f"{type(exc).__name__}: {exc}", pytrace=False)


# -- sync fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def _alchemy_target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Targets]:
    config = request.config
    targets = config.stash[_TARGET] = Targets(
        Target(
            config.stash[_SETTINGS],
            lambda: tmp_path_factory.mktemp("alchemy"),
            functools.partial(_report, config),
        )
    )
    yield targets
    del config.stash[_TARGET]
    problems = targets.close()
    found = targets.templates
    templates = [(t.render_as_string(hide_password=False), kept) for t, kept in found.items()]
    if hasattr(config, "workerinput"):  # the controller drops templates after every worker
        config.workeroutput[_TEMPLATES_KEY] = templates  # type: ignore[attr-defined]
    else:
        problems += _release_templates(targets.default.settings.run_id, found)
    if problems:
        pytest.fail("pytest-alchemy: " + "; ".join(problems), pytrace=False)


def _report(config: pytest.Config, line: str) -> None:
    """One progress line on the terminal (building a template can take a while)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    capture = config.pluginmanager.get_plugin("capturemanager")
    # Fixtures run with output captured; the line is for the person watching the run.
    suspended = capture.global_and_fixture_disabled() if capture else contextlib.nullcontext()
    with suspended:
        reporter.write_line(f"alchemy: {line}")


def _release_templates(run_id: str, templates: dict[URL, bool]) -> list[str]:
    from pytest_alchemy import databases

    problems = []
    for template, kept in templates.items():
        try:
            databases.release_template(template, run_id, kept=kept)
        except Exception as exc:
            problems.append(f"dropping the template {_config.mask(template)} failed: {exc}")
    return problems


@pytest.fixture(scope="session")
def alchemy_metadata() -> object:
    """The schema of the tests that see this fixture; None: the ini's ``alchemy_metadata``.

    Override it in the ``conftest.py`` of a directory (or in a module or class) to give its
    tests a schema, and a test database, of their own: return a declarative base, a
    ``MetaData``, an import path ``'module:attr'``, or a list of them. Keep it
    session-scoped, as ``db_engine``, which it chooses, is.
    """
    return None


def _target_for(request: pytest.FixtureRequest, targets: Targets, value: object) -> Target:
    """The target of the test's ``alchemy_metadata`` (``value``)."""
    try:
        return targets.for_value(value, "the alchemy_metadata fixture")
    except pytest.UsageError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def db_engine(
    request: pytest.FixtureRequest, _alchemy_target: Targets, alchemy_metadata: object
) -> Engine:
    """Engine to the test database, schema from ``alchemy_metadata`` built (session scope).

    Override it in a conftest to run the sandbox on an engine of your own.
    """
    target = _target_for(request, _alchemy_target, alchemy_metadata)
    test = getattr(request, "_pyfuncitem", None)  # the test db_engine is made for
    schemas = _fixturedefs(test, "alchemy_metadata") if test is not None else []
    request.config.stash[_ENGINE_SCHEMA] = schemas[-1] if schemas else None
    try:
        return target.sync_engine()
    except AlchemyError as exc:
        failure = exc
    _fail(failure)  # outside the except: one message, not the error and then its context


@pytest.fixture
def db_connection(
    request: pytest.FixtureRequest, db_engine: Engine, _alchemy_target: Targets
) -> Iterator[Connection]:
    """The test's connection, inside an outer transaction rolled back after the test.

    Never commit it: ``db_connection.commit()`` and raw ``COMMIT`` are refused. For Core work
    that may fail on PostgreSQL, use ``with db_connection.begin_nested():``.
    """
    target = request.node.stash[_TEST_TARGET] = _alchemy_target.of_engine(db_engine)
    keeper = target.keeper_for(db_engine)
    connection = keeper.acquire() if keeper is not None else db_engine.connect()
    sandbox = Sandbox(connection)
    try:
        sandbox.start()
        sandbox.lock.timeout = target.settings.thread_wait
        if keeper is not None:  # the plugin's own database: it knows what it built there
            _arm_ddl(sandbox, target)
        _counters_for(request, target, sandbox)
        yield connection
        sandbox.end()
        if sandbox.problem:
            restored = ""
            if sandbox.escaped:
                restored = _restore(target, db_engine if keeper else None)
            _fail(SandboxBrokenError(sandbox.problem + restored))
        if _swallowed(request, sandbox.raised):
            _fail(SandboxBrokenError(str(sandbox.raised)))
    finally:
        sandbox.end()
        if keeper is None:
            connection.close()


def _arm_ddl(sandbox: Sandbox, target: Target) -> None:
    """Let create_all/drop_all of the tables built into the target cost nothing (ddl.py)."""
    built = target.built_tables
    if built:
        from pytest_alchemy import ddl

        sandbox.built_tables = built
        ddl.install(routing.sandbox_for)


def _restore(target: Target, engine: Engine | None, *, overridden: str = "db_engine") -> str:
    """Restore the test database after an escape; the sentence to add to the failure.

    ``engine`` None: the fixture named ``overridden`` is the user's, so nothing is restored.
    """
    if engine is None:
        return f" The test database could not be restored: {overridden} is overridden."
    try:
        return target.restore(engine)
    except Exception as exc:
        return _restore_failed(exc)


def _restore_failed(exc: Exception) -> str:
    return f" Restoring the test database failed: {type(exc).__name__}: {exc}"


@pytest.fixture
def db_sessionmaker(
    request: pytest.FixtureRequest, db_connection: Connection
) -> sessionmaker[Session]:
    """A ``sessionmaker`` whose sessions all join the test's sandbox and see each other's work.

    Its sessions are of ``alchemy_session_class`` (default: SQLModel's ``Session`` when the
    metadata is SQLModel's, else SQLAlchemy's), with ``alchemy_session_options``.
    """
    from sqlalchemy.orm import sessionmaker

    def make() -> sessionmaker[Session]:
        arguments = _maker_arguments(request, db_connection.engine, is_async=False)
        return sessionmaker(bind=db_connection, join_transaction_mode=JOIN_MODE, **arguments)

    return cached_maker(db_connection, make)


def _maker_arguments(
    request: pytest.FixtureRequest, engine: Engine, *, is_async: bool
) -> dict[str, Any]:
    """The arguments of the fixtures' sessionmaker, for the schema ``engine`` is built with."""
    targets = request.config.stash.get(_TARGET, None)
    if targets is None:
        return sessions.maker_arguments(request.config.stash[_SETTINGS], is_async=is_async)
    target = request.node.stash.get(_TEST_TARGET, None) or targets.of_engine(engine)
    return sessions.maker_arguments(target.settings, is_async=is_async, schema=target.schema)


@pytest.fixture
def db_session(db_sessionmaker: sessionmaker[Session]) -> Iterator[Session]:
    """A Session in the test's sandbox: commit, roll back and nest freely; nothing survives."""
    session = db_sessionmaker()
    yield session
    close_session_after(session)


# -- the application's engines ----------------------------------------------------------------


def _is_async_test(request: pytest.FixtureRequest) -> bool:
    return inspect.iscoroutinefunction(getattr(request.node, "obj", None))


def _route(
    request: pytest.FixtureRequest,
    routes: routing.Routes,
    objects: list[object],
    async_test: bool | None = None,
) -> None:
    """Route the engines of ``objects`` into the test's sandboxes, opening them as needed.

    ``async_test`` is told once the test runs: pytest-asyncio has wrapped it in a sync
    function by then.
    """
    __tracebackhide__ = True
    if async_test is None:
        async_test = _is_async_test(request)
    sync_sandbox: Sandbox | None = None
    async_sandbox: Sandbox | None = None
    paused = request.config.stash[_ROUTER].escapes.paused  # db_route() may provision
    several = bool(request.config.stash[_SETTINGS].databases)
    for obj in objects:
        for engine, is_async in routing.engines_of(obj):
            if routes.routed(engine):
                continue
            name, replica = _database_of(request, engine) if several else ("default", None)
            if name != "default":
                if is_async and (async_test or _loop_free_in_sync_test(request, engine)):
                    with paused():
                        sandboxes = _async_others_for(request, engine)
                    routes.add(engine, sandboxes[name].core, replica)
                elif is_async:
                    routes.refuse(engine, _async_in_sync_test(engine, request))
                else:
                    with paused():
                        other = _other_databases(request).sandbox(name)
                    routes.add(engine, other, replica)
            elif not is_async:
                if sync_sandbox is None:
                    with paused():
                        connection = request.getfixturevalue("db_connection")
                    sync_sandbox = _sandbox(sandbox_of(connection))
                routes.add(engine, sync_sandbox, replica)
            elif async_test or _loop_free_in_sync_test(request, engine):
                if async_sandbox is None:
                    from pytest_alchemy import aio

                    with paused():
                        connection = _async_connection_for(request, engine)
                    async_sandbox = _sandbox(aio.sandbox_of(connection), "async_")
                routes.add(engine, async_sandbox, replica)
            else:
                routes.refuse(engine, _async_in_sync_test(engine, request))
    routes.follow(objects, lambda obj: _route(request, routes, [obj], async_test))


def _database_of(request: pytest.FixtureRequest, engine: Engine) -> tuple[str, str | None]:
    targets: Targets = request.getfixturevalue("_alchemy_target")
    return targets.database_of(engine.url)


#: The async sandboxes of the other databases, once open in this test.
_ASYNC_OTHERS = pytest.StashKey[dict[str, "AsyncSandbox"]]()


def _async_others_for(request: pytest.FixtureRequest, engine: Engine) -> dict[str, AsyncSandbox]:
    """The async sandboxes of the other databases, for ``engine`` to join; opened now unless
    the test is running already (see :func:`_async_connection_for`)."""
    import asyncio

    found: dict[str, AsyncSandbox] | None = request.node.stash.get(_ASYNC_OTHERS, None)
    if found is not None:
        return found
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return request.getfixturevalue("_alchemy_async_others")  # type: ignore[no-any-return]
    raise UnsandboxedEngineError(
        f"The AsyncEngine {_config.mask(engine.url)} (a database of alchemy_databases) was "
        f"made or bound during the async test {request.node.name}, and the sandboxes of those "
        f"databases open before an async test starts, not from inside it. List the engine "
        f"(or what makes it) in alchemy_engines, or make it in a fixture."
    )


_OTHER_DATABASES = pytest.StashKey["OtherDatabases"]()


class OtherDatabases:
    """The sandboxes a test opened on the other databases of ``alchemy_databases``: one per
    database, on its first use, all rolled back when the test ends."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self._request = request
        self._open: dict[str, tuple[Sandbox, Target, Connection]] = {}

    def sandbox(self, name: str) -> Sandbox:
        found = self._open.get(name)
        if found is not None:
            return found[0]
        targets: Targets = self._request.getfixturevalue("_alchemy_target")
        target = targets.named(name)
        engine = target.sync_engine()
        keeper = target.keeper_for(engine)
        assert keeper is not None
        connection = keeper.acquire()
        sandbox = Sandbox(connection)
        sandbox.start()
        sandbox.lock.timeout = target.settings.thread_wait
        _arm_ddl(sandbox, target)
        self._open[name] = (sandbox, target, connection)
        return sandbox

    def close(self) -> list[str]:
        """Roll every sandbox back; the problems, each with what was done about it."""
        problems = []
        for sandbox, target, connection in self._open.values():
            sandbox.end()
            if sandbox.problem:
                restored = _restore(target, connection.engine) if sandbox.escaped else ""
                problems.append(sandbox.problem + restored)
        self._open.clear()
        return problems


def _other_databases(request: pytest.FixtureRequest) -> OtherDatabases:
    node = request.node
    found: OtherDatabases | None = node.stash.get(_OTHER_DATABASES, None)
    if found is None:
        found = node.stash[_OTHER_DATABASES] = OtherDatabases(request)
    return found


@pytest.fixture
def db_connections(
    request: pytest.FixtureRequest, _alchemy_routes: routing.Routes
) -> Mapping[str, Connection]:
    """The test's connection to each database, by name: ``"default"`` is ``db_connection``,
    the others those of ``alchemy_databases``, each in a sandbox of its own, opened on first
    use and rolled back after the test."""
    return _Connections(request)


class _Connections(Mapping[str, "Connection"]):
    def __init__(self, request: pytest.FixtureRequest) -> None:
        self._request = request
        databases = request.config.stash[_SETTINGS].databases
        self._names = ["default", *(d.name for d in databases if d.replica_of is None)]

    def __getitem__(self, name: str) -> Connection:
        if name == "default":
            return self._request.getfixturevalue("db_connection")  # type: ignore[no-any-return]
        if name not in self._names:
            raise KeyError(
                f"{name!r} is not a database of alchemy_databases (replicas are reached through "
                f"their engines). Databases: {', '.join(self._names)}."
            )
        try:
            return _other_databases(self._request).sandbox(name).connection
        except AlchemyError as exc:
            failure = exc
        _fail(failure)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


#: The test's async_db_connection is set up (an async engine made during the test may join).
_ASYNC_OPEN = pytest.StashKey[bool]()


def _async_connection_for(request: pytest.FixtureRequest, engine: Engine) -> AsyncConnection:
    """The test's async_db_connection, for ``engine`` to join; a clear error when it cannot be
    opened now: from inside the running test (an async engine made or bound during it), since
    async fixtures are set up before an async test starts, not from its loop (pytest-asyncio
    would leave a coroutine never awaited)."""
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        running = False
    else:
        running = True
    node = request.node
    if (
        not running
        or node.stash.get(_ASYNC_OPEN, False)
        or "async_db_connection" in getattr(node, "funcargs", {})
    ):
        return request.getfixturevalue("async_db_connection")  # type: ignore[no-any-return]
    raise UnsandboxedEngineError(
        f"The AsyncEngine {_config.mask(engine.url)} was made or bound during the async test "
        f"{request.node.name}, and the test's async sandbox was not open: async fixtures are "
        f"set up before an async test starts, not from inside it. Request async_db_connection "
        f"(or async_db_session) in the test, so engines made during it have a sandbox to join, "
        f"or make the engine in a fixture."
    )


def _loop_free_in_sync_test(request: pytest.FixtureRequest, engine: Engine) -> bool:
    """An async engine whose connections serve any loop (aiosqlite), in a sync test whose
    async fixtures pytest-asyncio runs: it joins the async sandbox, as Starlette's TestClient
    needs (it runs the app on a loop of its own)."""
    from pytest_alchemy import dialects

    plugins = request.config.pluginmanager
    return plugins.has_plugin("asyncio") and not dialects.loop_bound(engine.dialect.driver)


def _sandbox(sandbox: Sandbox | None, prefix: str = "") -> Sandbox:
    if sandbox is None:
        raise UnsandboxedEngineError(
            f"{prefix}db_connection is overridden with a connection that has no sandbox, so "
            f"the application's engines have none to join. Override {prefix}db_engine instead."
        )
    return sandbox


def _async_in_sync_test(engine: Engine, request: pytest.FixtureRequest) -> str:
    return (
        f"The AsyncEngine {_config.mask(engine.url)} was used in the sync test "
        f"{request.node.name}. An async connection belongs to the event loop that opened it, "
        f"and a sync test has no loop of its own (Starlette's TestClient runs the app on a "
        f"loop in another thread), so the engine cannot join the test's sandbox. Write the "
        f"test as `async def` and drive the app with "
        f"httpx.AsyncClient(transport=httpx.ASGITransport(app=app)), on the test's loop."
    )


@pytest.fixture(autouse=True)
def _alchemy_routes(request: pytest.FixtureRequest) -> Iterator[routing.Routes]:
    router = request.config.stash[_ROUTER]
    routes = routing.Routes()
    try:
        if router.configured():
            router.guard()  # engines made since the last test (Flask-SQLAlchemy's init_app)
            _route(request, routes, router.objects())
        elif "db_route" in request.fixturenames and _is_async_test(request):
            # db_route() runs inside the test, on its loop: too late to open the sandbox then.
            request.getfixturevalue("async_db_connection")
        yield routes
    except AlchemyError as exc:
        _fail(exc)
    except pytest.UsageError as exc:  # alchemy_engines names what cannot be imported
        pytest.fail(str(exc), pytrace=False)
    finally:
        if router.configured():
            with contextlib.suppress(pytest.UsageError):  # reported above already
                routing.end_scoped_sessions(router.objects())
        refused = routes.stop()
        others = request.node.stash.get(_OTHER_DATABASES, None)
        broken = others.close() if others is not None else []
    escapes, written = router.escapes.take()
    if broken and not escapes:
        _fail(SandboxBrokenError(" ".join(broken)))
    if refused and not escapes and _swallowed(request, refused[0]):
        _fail(UnsandboxedEngineError(" ".join(dict.fromkeys(refused))))
    if escapes:
        targets = request.config.stash.get(_TARGET, None)
        restored = ""
        for target in targets.written(written) if targets is not None else ():
            try:
                restored += target.restore()
            except Exception as exc:
                restored += _restore_failed(exc)
        _fail(UnsandboxedEngineError(" ".join([*broken, *escapes]) + restored))


@pytest.fixture
def db_route(
    request: pytest.FixtureRequest, _alchemy_routes: routing.Routes
) -> Callable[..., None]:
    """Route engines made at run time into this test's sandbox, until the test ends.

    ``db_route(app.state.engine)`` takes what ``alchemy_engines`` takes: an Engine, an
    AsyncEngine, a ``sessionmaker``, ``async_sessionmaker``, ``scoped_session`` or a
    Flask-SQLAlchemy extension. For every test, list them in ``alchemy_engines`` or call
    ``pytest_alchemy.route_engines()``.
    """

    def route(*objects: object) -> None:
        __tracebackhide__ = True
        try:
            _route(request, _alchemy_routes, list(objects))
        except TypeError as exc:
            raise TypeError(f"db_route(): {exc}") from None

    return route


# -- async fixtures ---------------------------------------------------------------------------
# Defined here, registered in pytest_configure with the decorator of the async plugin in use.


def _require_asyncio(request: pytest.FixtureRequest) -> None:
    __tracebackhide__ = True
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pytest.fail(
            f"{request.node.name} runs on an event loop other than asyncio's (anyio's trio "
            f"backend?), and SQLAlchemy's async engines need asyncio. Give the tests that use "
            f"the database anyio_backend = 'asyncio' (a fixture returning 'asyncio').",
            pytrace=False,
        )


async def async_db_engine(
    request: pytest.FixtureRequest, _alchemy_target: Targets, alchemy_metadata: object
) -> AsyncEngine:
    """AsyncEngine to the test database for the running event loop, schema built.

    Tests that share an event loop share the engine; a loop of its own gets an engine of its
    own, disposed on that loop when it shuts down.
    """
    _require_asyncio(request)
    target = _target_for(request, _alchemy_target, alchemy_metadata)
    try:
        state = await target.loop_state()
    except AlchemyError as exc:
        failure = exc
    else:
        return state.engine
    _fail(failure)


async def async_db_connection(
    request: pytest.FixtureRequest, async_db_engine: AsyncEngine, _alchemy_target: Targets
) -> AsyncIterator[AsyncConnection]:
    """The test's AsyncConnection, inside an outer transaction rolled back after the test."""
    from pytest_alchemy import aio

    target = _alchemy_target.of_async_engine(async_db_engine)
    request.node.stash[_TEST_TARGET] = target
    state = target.loops.peek()
    own = state is not None and state.engine is async_db_engine
    if state is not None and own:
        connection = await state.acquire()
    else:
        connection = await async_db_engine.connect()
    sandbox = await aio.open_sandbox(connection)
    sandbox.core.lock.timeout = target.settings.thread_wait
    if own:
        _arm_ddl(sandbox.core, target)
    request.node.stash[_ASYNC_OPEN] = True
    try:
        if request.config.stash.get(_COUNTERS_NEEDED, False):
            arm = functools.partial(_counters_for, request, target, sandbox.core)
            await connection.run_sync(lambda _: arm())
        yield connection
        await sandbox.end()
        if sandbox.core.problem:
            restored = ""
            if sandbox.core.escaped and not own:
                restored = _restore(target, None, overridden="async_db_engine")
            elif sandbox.core.escaped:
                try:
                    restored = await target.restore_async(async_db_engine)
                except Exception as exc:
                    restored = _restore_failed(exc)
            _fail(SandboxBrokenError(sandbox.core.problem + restored))
        if _swallowed(request, sandbox.core.raised):
            _fail(SandboxBrokenError(str(sandbox.core.raised)))
    finally:
        await sandbox.end()
        if not own:
            await connection.close()


def async_db_sessionmaker(
    request: pytest.FixtureRequest, async_db_connection: AsyncConnection
) -> async_sessionmaker[AsyncSession]:
    """An ``async_sessionmaker`` whose sessions all join the test's sandbox.

    Its sessions are of ``alchemy_async_session_class`` (default: SQLModel's ``AsyncSession``
    when the metadata is SQLModel's), with ``alchemy_session_options``.
    """
    from sqlalchemy.ext.asyncio import async_sessionmaker

    def make() -> async_sessionmaker[AsyncSession]:
        engine = async_db_connection.sync_connection.engine  # type: ignore[union-attr]
        arguments = _maker_arguments(request, engine, is_async=True)
        return async_sessionmaker(
            bind=async_db_connection, join_transaction_mode=JOIN_MODE, **arguments
        )

    return cached_maker(async_db_connection.sync_connection, make)  # type: ignore[arg-type]


async def async_db_session(
    async_db_sessionmaker: async_sessionmaker[AsyncSession],
) -> AsyncIterator[AsyncSession]:
    """An AsyncSession in the test's sandbox: commit, roll back and nest freely.

    Handed over as ``async_sessionmaker()()`` makes it: not begun, so ``async with
    session.begin():`` works. Concurrent first use (``asyncio.gather``) is safe all the same:
    the sandbox has its first savepoint ready, so beginning sends nothing and no two tasks
    can be caught halfway.
    """
    from pytest_alchemy import aio

    session = async_db_sessionmaker()
    await aio.prepare_first_savepoint(session)
    yield session
    await aio.close_session_after(session)


async def _alchemy_async_others(
    request: pytest.FixtureRequest, _alchemy_target: Targets
) -> AsyncIterator[dict[str, AsyncSandbox]]:
    """An async sandbox on each other database of alchemy_databases, for the async engines
    on them (opened together: async fixtures cannot be set up once the test runs)."""
    from pytest_alchemy import aio

    opened: dict[str, tuple[AsyncSandbox, Target]] = {}
    try:
        for database in request.config.stash[_SETTINGS].databases:
            if database.replica_of is not None:
                continue
            target = _alchemy_target.named(database.name)
            try:
                state = await target.loop_state()
            except AlchemyError as exc:
                _fail(exc)
            sandbox = await aio.open_sandbox(await state.acquire())
            sandbox.core.lock.timeout = target.settings.thread_wait
            _arm_ddl(sandbox.core, target)
            opened[database.name] = (sandbox, target)
        sandboxes = {name: sandbox for name, (sandbox, _) in opened.items()}
        request.node.stash[_ASYNC_OTHERS] = sandboxes
        yield sandboxes
    finally:
        problems = []
        for sandbox, target in opened.values():
            await sandbox.end()
            if sandbox.core.problem:
                restored = ""
                if sandbox.core.escaped:
                    try:
                        restored = await target.restore_async(sandbox.connection.engine)
                    except Exception as exc:
                        restored = _restore_failed(exc)
                problems.append(sandbox.core.problem + restored)
    if problems:
        _fail(SandboxBrokenError(" ".join(problems)))


_ASYNC_FIXTURES: dict[str, Callable[..., Any]] = {
    "async_db_engine": async_db_engine,
    "async_db_connection": async_db_connection,
    "async_db_sessionmaker": async_db_sessionmaker,
    "async_db_session": async_db_session,
    "_alchemy_async_others": _alchemy_async_others,
}
_NO_RUNNER = (
    "{name} needs an async test runner, and none is active. Install pytest-asyncio "
    "(pip install 'pytest-alchemy[asyncio]') and mark the test @pytest.mark.asyncio, or use "
    "anyio's pytest plugin and mark the test @pytest.mark.anyio."
)


def _async_fixtures(config: pytest.Config) -> types.ModuleType:
    """The async fixtures, decorated for whichever async plugin is active."""
    module = types.ModuleType("pytest_alchemy._async_fixtures")
    plugins = config.pluginmanager
    decorate: Callable[..., Any]
    if plugins.has_plugin("asyncio"):
        import pytest_asyncio

        decorate = pytest_asyncio.fixture
    elif plugins.has_plugin("anyio"):
        decorate = pytest.fixture
    else:
        decorate = pytest.fixture
        for name, function in _ASYNC_FIXTURES.items():
            setattr(module, name, decorate(_no_runner(name, function), name=name))
        return module
    for name, function in _ASYNC_FIXTURES.items():
        is_async = inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function)
        setattr(module, name, (decorate if is_async else pytest.fixture)(function, name=name))
    return module


def _no_runner(name: str, function: Callable[..., Any]) -> Callable[[], None]:
    def fixture() -> None:
        __tracebackhide__ = True
        pytest.fail(_NO_RUNNER.format(name=name), pytrace=False)

    fixture.__doc__ = function.__doc__
    return fixture
