"""pytest entry point: options, ini keys, markers, the report header, and the hooks.

Thin on purpose: the fixtures live in :mod:`pytest_alchemy.fixtures` (imported here, where
pytest finds them) and delegate to :mod:`pytest_alchemy.provision` (the targets),
:mod:`pytest_alchemy.sandbox` (sync) and :mod:`pytest_alchemy.aio` (async). Nothing here runs
until a test requests a database fixture.
"""

from __future__ import annotations

import contextlib
import types
from typing import TYPE_CHECKING, Any

import pytest

from pytest_alchemy import config as _config
from pytest_alchemy import examples as _examples
from pytest_alchemy import markers, routing, sessions
from pytest_alchemy.fixtures import commit as _commit
from pytest_alchemy.fixtures import factories as _factories
from pytest_alchemy.fixtures import queries as _queries
from pytest_alchemy.fixtures import sync as _sync_fixtures
from pytest_alchemy.fixtures.aio import _async_fixtures
from pytest_alchemy.fixtures.aio import own_layers as _async_layers

# The fixtures: pytest finds them in this module's namespace.
from pytest_alchemy.fixtures.commit import _alchemy_commit  # noqa: F401
from pytest_alchemy.fixtures.common import (
    _CALL_FAILED,
    _COUNTERS_NEEDED,
    _ENGINE_SCHEMA,
    _ROUTER,
    _RUNNING,
    _SETTINGS,
    _TARGET,
    _TEMPLATES_KEY,
    _defaults,
    _fixturedefs,
    _report,
)
from pytest_alchemy.fixtures.hooks import db_commits  # noqa: F401
from pytest_alchemy.fixtures.layers import db_layer  # noqa: F401
from pytest_alchemy.fixtures.queries import db_queries  # noqa: F401
from pytest_alchemy.fixtures.routes import (  # noqa: F401
    BLOCKED,
    ROUTES,
    _alchemy_routes,
    add_routes,
    asks_for_the_database,
    db_connections,
    db_route,
    end_blocking,
    needs_routes,
    report_escapes,
    start_blocking,
)
from pytest_alchemy.fixtures.sync import (  # noqa: F401
    _alchemy_target,
    alchemy_metadata,
    db_connection,
    db_engine,
    db_session,
    db_sessionmaker,
)

if TYPE_CHECKING:
    from collections.abc import Iterator


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
        _config.COMMIT_LAST_INI,
        type="bool",
        default=True,
        help="Run the tests of @pytest.mark.alchemy(strategy='commit') after the others, in "
        "each worker (default true).",
    )
    parser.addini(
        _config.REQUIRE_MARKER_INI,
        type="bool",
        default=False,
        help="Tests that neither request a database fixture nor carry @pytest.mark.alchemy "
        "get an error on any use of the database (routed engines, any engine on the test or "
        "base database).",
    )
    parser.addini(
        _config.FACTORIES_INI,
        type="linelist",
        default=[],
        help="Modules of factories, or factory base classes ('module:Class'), of factory_boy "
        "(SQLAlchemyModelFactory) or polyfactory (SQLAlchemyFactory) whose objects are created "
        "through each test's db_session / async_db_session.",
    )
    parser.addini(
        _config.NPLUSONE_INI,
        default="off",
        help="N+1 detection: 'warn' or 'fail' when a test lazy-loads one relationship once per "
        "row from one place; 'off' (default). Per test: @pytest.mark.alchemy(nplusone=...).",
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
    router.on_added = _routes_for_the_test_being_set_up
    routing.push(router)
    config.pluginmanager.register(_async_fixtures(config), "alchemy-async-fixtures")
    if settings.engines:
        config.pluginmanager.register(_engine_guard(), "alchemy-engine-guard")
    if config.pluginmanager.has_plugin("xdist") and not hasattr(config, "workerinput"):
        config.pluginmanager.register(
            _XdistController(settings.run_id, settings.run_pid), "alchemy-xdist"
        )


@pytest.hookimpl(trylast=True)  # after reordering plugins (pytest-randomly): commit tests last
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    options = markers.check(items, _defaults(config))
    # Counters are read when a database is first used, if any test of the run resets them.
    config.stash[_COUNTERS_NEEDED] = any(o.reset_sequences for o in options)
    config.stash[_SCHEMAS_OVERRIDDEN] = _check_schema_scopes(items)
    committing = []
    require = config.stash[_SETTINGS].require_marker
    for item, option in zip(items, options, strict=True):
        if require and not asks_for_the_database(item):
            item.stash[BLOCKED] = True
        _sync_fixtures.own_layers(item)
        _async_layers(item)
        if option.nplusone != "off":
            item.stash[_queries.NPLUSONE] = option.nplusone
        if not option.commits:
            _examples.wrap(item)
        if option.commits:
            item.stash[_commit.COMMITS] = True
            _commit.add_fixture(item)
            committing.append(item)
    if committing and config.stash[_SETTINGS].commit_tests_last:
        # As Django runs its TransactionTestCases: a database left changed by one (a restore
        # that failed) is never seen by a sandboxed test.
        chosen = set(map(id, committing))
        items[:] = [item for item in items if id(item) not in chosen] + committing


def pytest_collection_finish(session: pytest.Session) -> None:
    _factories.install(session.config.stash[_SETTINGS])


#: Some test sees an alchemy_metadata fixture of the user's (a schema of its own).
_SCHEMAS_OVERRIDDEN = pytest.StashKey[bool]()


def _check_schema_scopes(items: list[pytest.Item]) -> bool:
    """Whether some test has a schema of its own; an alchemy_metadata fixture of the user's
    that db_engine cannot use is a usage error naming it and the fix, rather than pytest's
    ScopeMismatch from inside the plugin."""
    seen: dict[int, Any] = {}
    parents: set[int] = set()
    for item in items:
        if id(item.parent) in parents:
            continue  # the tests of one module or class see the same fixtures
        parents.add(id(item.parent))
        defs = _fixturedefs(item, "alchemy_metadata")
        if defs:
            seen.setdefault(id(defs[-1]), defs[-1])
    mine = _sync_fixtures.__name__
    users = [d for d in seen.values() if getattr(d.func, "__module__", None) != mine]
    for fixturedef in users:
        if fixturedef.scope != "session":
            where = fixturedef.baseid or "a plugin"
            raise pytest.UsageError(
                f"The alchemy_metadata fixture of {where} is {fixturedef.scope}-scoped; it "
                f"chooses the schema of db_engine, which is session-scoped, so it must be too: "
                f'@pytest.fixture(scope="session") (in a class, with @classmethod below it).'
            )
    return bool(users)


def pytest_unconfigure(config: pytest.Config) -> None:
    router = config.stash.get(_ROUTER, None)
    if router is not None:
        routing.pop(router)


#: The tests whose fixtures are being set up, innermost last.
_SETTING_UP: list[pytest.Item] = []


def _routes_for_the_test_being_set_up() -> None:
    """route_engines() was called: a session fixture of the test being set up (an app
    factory) routes its engines from this test on, as an autouse fixture would have."""
    if _SETTING_UP and _RUNNING and _SETTING_UP[-1] is _RUNNING[-1]:
        add_routes(_SETTING_UP[-1], during_setup=True)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    _RUNNING.append(item)  # for the fixtures that do not take request (_current_request)
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
    if item.stash.get(BLOCKED, False):
        start_blocking(item)
    if needs_routes(item.config):
        add_routes(item)
    if item.stash.get(_commit.COMMITS, False):
        _commit.start(item)
    _SETTING_UP.append(item)
    try:
        return (yield)
    finally:
        _SETTING_UP.pop()


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
    if getattr(fixturedef.func, "__module__", None) != _sync_fixtures.__name__:
        return  # the user's own db_engine
    schemas = _fixturedefs(item, "alchemy_metadata")
    wanted = schemas[-1] if schemas else None
    if item.config.stash.get(_ENGINE_SCHEMA, None) is not wanted:
        fixturedef.finish(request)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    try:
        return (yield)
    finally:
        if _RUNNING and _RUNNING[-1] is item:
            _RUNNING.pop()
        # Without the routing fixture (nothing routed), which reports them itself: a commit
        # through an engine that is not routed fails the test, after the database is restored.
        if ROUTES not in getattr(item, "fixturenames", ()) and _ROUTER in item.config.stash:
            report_escapes(item.config, [])
        if item.stash.get(_commit.COMMITS, False):
            _commit.leave(item)
        if item.stash.get(BLOCKED, False):
            end_blocking(item)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    # Escapes are looked for while the test body runs: fixtures' set-up (provisioning, an
    # Alembic upgrade) commits to the test database by design.
    router = item.config.stash.get(_ROUTER, None)
    targets = item.config.stash.get(_TARGET, None)
    watch = router.escapes if router is not None else None
    if item.stash.get(_commit.COMMITS, False):
        watch = None  # its commits are real, by request
    if watch is not None and targets is not None and targets.known_urls:
        watch.watch(targets.known_urls, targets.known_base)
        watch.active = True
    recorder = _queries.start(item)
    passed = False
    try:
        result = yield
        passed = True
    finally:
        if watch is not None:
            watch.active = False
        _queries.finish(item, recorder, passed=passed)
    return result


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
        self.workers = False  # the run had xdist workers (not every run with xdist does)

    def pytest_configure_node(self, node: Any) -> None:
        self.workers = True
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
        if settings.reuse or not self.workers:
            return
        # What workers that crashed or were interrupted (Ctrl-C) could not drop themselves.
        with contextlib.suppress(Exception):
            for line in _clear_workers_leftovers(settings):
                _report(session.config, line)


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
    settings = config.stash[_SETTINGS]
    return _config.describe(settings) if settings.configured else []
