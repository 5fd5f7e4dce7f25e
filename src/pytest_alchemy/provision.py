"""The target: the database the tests run on, its engines, and its schema's lifetime.

The test database itself is created and dropped by :mod:`pytest_alchemy.databases`.

Nothing here connects until a test asks for a database fixture. The first failure (driver
missing, server unreachable, schema conflict) is remembered, so every later test fails with the
same short message instead of retrying the connection.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import InterfaceError, NoSuchModuleError, OperationalError

from pytest_alchemy import commits, databases, dialects, ephemeral, ownership, schema
from pytest_alchemy.aio import LoopEngines, LoopState
from pytest_alchemy.config import DATABASES_INI, Option, Setting, Settings, mask
from pytest_alchemy.counters import Counters
from pytest_alchemy.errors import (
    AlchemyError,
    DatabaseUnavailableError,
    DriverMissingError,
    ProvisioningError,
)
from pytest_alchemy.routing import PLUGIN_ENGINES, database_key
from pytest_alchemy.sandbox import ConnectionKeeper

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from sqlalchemy import MetaData
    from sqlalchemy.engine import Connection, Engine
    from sqlalchemy.ext.asyncio import AsyncEngine

    from pytest_alchemy.sandbox import Sandbox
    from pytest_alchemy.schema import Schema

T = TypeVar("T")


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Target:
    """The configured test database: URLs, engines, kept connections and the built schema."""

    def __init__(
        self,
        settings: Settings,
        tmp_dir: Callable[[], Path],
        report: Callable[[str], None] = lambda line: None,
        *,
        schema: Schema | None = None,
        parent: Target | None = None,
    ) -> None:
        #: A schema of its own (an ``alchemy_metadata`` fixture's), on ``parent``'s server.
        self.schema = schema
        self._parent = parent
        if schema is not None:  # built from its metadata alone: the ini's seed and Alembic
            settings = dataclasses.replace(  # are for the ini's schema
                settings, metadata=schema.labels, seed=None, alembic=None
            )
        self.settings = settings
        self._tmp_dir = tmp_dir
        self._report = report
        self._urls: tuple[URL, URL] | None = None
        # Databases filled by the plugin without provisioning (the default file), and how to
        # empty each at the end.
        self._filled: dict[str, Callable[[], None]] = {}
        #: Templates this run may have built, and whether each is kept for reuse (the xdist
        #: controller releases them at the end).
        self.templates: dict[URL, bool] = {}
        self._engine: Engine | None = None
        self._keeper: ConnectionKeeper | None = None
        self._sync_failure: AlchemyError | None = None
        self._async_failure: AlchemyError | None = None
        self._databases: dict[str, databases.ProvisionedDatabase] = {}
        self._swept = False
        self._own_names = False  # the usual names are another live run's
        self._greeted = False  # the server answered a first connection
        self.owner = ownership.Owner(settings.run_id, settings.run_pid)
        self._heartbeats = ownership.Heartbeats(
            functools.partial(databases.beat, run_id=settings.run_id)
        )
        self._server: ephemeral.EphemeralPostgres | None = (
            None  # databases of dead earlier runs are dropped once per run
        )
        self.loops = LoopEngines(self._new_async_engine)
        self._counters: dict[object, Counters] = {}
        #: The commit strategy's picture of each database, once a commit test used it.
        self.snapshots: dict[str, commits.Snapshot] = {}
        self._committers: dict[str, commits.Committer] = {}
        #: Called with (this target, key, URL) when a database is built (or built again).
        self.on_ready: Callable[[Target, str, URL], None] | None = None

    # -- URLs -------------------------------------------------------------------------------

    @functools.cached_property
    def base(self) -> URL | None:
        """The configured URL, with a throwaway server started if one was asked for."""
        if self._parent is not None:
            return self._parent.base
        configured = self.settings.url.url
        if ephemeral.wanted(configured):
            assert configured is not None
            self._server = ephemeral.EphemeralPostgres(self._report)
            return self._server.start(configured.database)
        return configured

    @property
    def urls(self) -> tuple[URL, URL]:
        """(sync URL, async URL), with the default SQLite file resolved."""
        if self._urls is None:
            s = self.settings
            base = self.base
            if base is None:  # a file of our own in pytest's temporary directory, per worker
                name = f"alchemy_{self.schema.key}" if self.schema else "alchemy"
                base = make_url(f"sqlite:///{self._tmp_dir() / name}.sqlite3")
            sync_url = dialects.sync_twin(base)
            async_url = s.async_url.url or dialects.async_twin(base)
            if self.base is not None:
                naming = self._naming()
                sync_url = databases.derive_test_url(sync_url, naming)
                async_url = databases.derive_test_url(async_url, naming)
            self._urls = (sync_url, async_url)
        return self._urls

    @property
    def known_urls(self) -> tuple[URL, ...]:
        """The test database's URLs, if a test has asked for them (they may start a server)."""
        return self._urls or ()

    @property
    def known_base(self) -> tuple[URL, ...]:
        """The base database's URL, once the test database's are known (never the default)."""
        if not self._urls or self.base is None or dialects.is_memory(self.base):
            return ()
        return (self.base,)

    def _naming(self, *, template: bool = False) -> databases.Naming:
        s = self.settings
        run = databases.run_part(s.run_id) if self._own_names else None
        key = self.schema.key if self.schema else None
        return databases.Naming(s.test_database, s.database_suffix, s.worker, template, run, key)

    def _provision(self, which: int) -> tuple[URL, bool]:
        """Create the test database behind ``self.urls[which]`` once per run.

        Returns its URL, which changes when the usual name is held by another live run (this
        run then works on names of its own), and whether it was provisioned. The default
        file in pytest's temporary directory and in-memory databases are not (False): the
        caller fills them directly.
        """
        url = self.urls[which]
        if self.base is None or dialects.is_memory(url):
            return url, False
        first = self._parent or self  # the server is greeted, and swept, once per run
        if not first._greeted:
            dialects.check_greeting(url)
            first._greeted = True
        sweep = None
        if not first._swept and not self.settings.reuse:
            first._swept = True
            base = self.base.set(drivername=url.drivername)

            def sweep() -> None:  # in the provisioning turn: on its administrative session
                for line in databases.sweep(base, self._naming(), self.owner):
                    self._report(line)

        key = self._schema_key(url, None)
        if key not in self._databases:
            try:
                self._databases[key] = self._provision_at(url, sweep)
            except databases.Busy as busy:
                if self._own_names:
                    raise ProvisioningError(f"{busy}, and so are this run's own names.") from None
                self._own_names = True
                self._urls = None
                url = self.urls[which]
                self._report(f"{busy}: this run uses {mask(url)} instead")
                key = self._schema_key(url, None)
                self._databases[key] = self._provision_at(url)
            self._now_ready(key, url)
        return url, True

    def _template_for(self, url: URL) -> URL | None:
        """The run's template for the test database ``url``: with a recipe, for xdist
        workers (one builds it, each clones it) and for reuse (kept with the database). A run
        in one process builds its test database directly: one CREATE DATABASE, not two."""
        if self._recipe is None or self.base is None:
            return None
        if self.settings.worker is None and not self._reuse:
            return None
        base = self.base.set(drivername=url.drivername)
        return databases.derive_test_url(base, self._naming(template=True))

    @property
    def _reuse(self) -> bool:
        # Names of our own are never reused: a kept one would be left for no later run.
        return self.settings.reuse and not self._own_names

    def _provision_at(
        self, url: URL, sweep: Callable[[], None] | None = None
    ) -> databases.ProvisionedDatabase:
        recipe = self._recipe
        template = self._template_for(url)
        s = self.settings
        reuse = self._reuse
        if template is not None:
            self.templates[template] = reuse
        provisioned = databases.provision(
            url,
            self.owner,
            recipe=recipe,
            template=template,
            report=self._report,
            reuse=reuse,
            recreate=s.recreate,
            first=sweep,
        )
        if url.get_backend_name() != "sqlite":  # a file is on this host: its pid tells
            for held in (url, template):
                if held is not None:
                    self._heartbeats.add(held)
        return provisioned

    def _origin(self, url: URL, setting: Setting) -> str:
        given = setting.url
        if given is None:
            return f"from {setting.origin}"
        other_driver = given.drivername != url.drivername
        derived = other_driver or given.database != url.database
        how = f"derived from {setting.origin}" if derived else f"from {setting.origin}"
        if other_driver and dialects.is_async(url) and setting.option is self.settings.url.option:
            return f"{how}; set {self.settings.async_url.option.ini} to choose the async driver"
        return how

    # -- errors -------------------------------------------------------------------------------

    def _explain(self, exc: BaseException, url: URL, *, is_async: bool) -> AlchemyError:
        setting = (
            self.settings.async_url
            if is_async and self.settings.async_url.url
            else self.settings.url
        )
        origin = self._origin(url, setting)
        option = setting.option
        names = " / ".join(dict.fromkeys(n for n in (option.cli, option.env, option.ini) if n))
        if isinstance(exc, AlchemyError):
            details = getattr(exc, "details", "")
            if details:  # once, for the whole run: every test repeats only the message
                self._report(f"{exc}, at:\n{details}")
            return exc
        if isinstance(exc, (ImportError, NoSuchModuleError)):
            return DriverMissingError(
                f"The driver for {mask(url)} ({origin}) is not installed: {_first_line(exc)}. "
                f"Install it with `{dialects.install_hint(url)}`, or change {names}."
            )
        message = _first_line(exc)
        if url.password:
            message = message.replace(str(url.password), "***")
        if not isinstance(exc, (OperationalError, InterfaceError, OSError, TimeoutError)):
            return ProvisioningError(
                f"Preparing the test database {mask(url)} ({origin}) failed: "
                f"{type(exc).__name__}: {message}"
            )
        return DatabaseUnavailableError(
            f"Cannot connect to the test database {mask(url)} ({origin}): {message}. Start the "
            f"server, or point {names} at a reachable database."
        )

    # -- schema -------------------------------------------------------------------------------

    def metadatas(self) -> list[MetaData]:
        """The MetaData objects of the schema (imported now)."""
        if self.schema is not None:
            return list(self.schema.metadatas)
        return schema.load_metadata(self.settings.metadata)

    @functools.cached_property
    def built_tables(self) -> frozenset[tuple[str | None, str]]:
        """The tables the plugin builds into this target's database from its metadata, as
        (schema, name); none when Alembic builds it (what it made is not known here)."""
        if self._recipe is None or self.settings.alembic:
            return frozenset()
        return frozenset((t.schema, t.name) for md in self.metadatas() for t in md.tables.values())

    @functools.cached_property
    def _recipe(self) -> databases.Recipe | None:
        """What fills a new test database, from alchemy_metadata and alchemy_seed (imported now)."""
        metadatas = self.metadatas()
        seed = schema.load_seed(self.settings.seed)
        return schema.recipe(metadatas, seed, self.settings, self.base)

    def schema_key(self, url: URL, engine: object) -> str:
        """Which database of this target ``url`` (and ``engine``, for memory) is."""
        return self._schema_key(url, engine)

    def _schema_key(self, url: URL, engine: object) -> str:
        if dialects.is_memory(url):
            return f"memory:{id(engine)}"
        return url.set(drivername=url.get_backend_name(), password=None).render_as_string()

    # -- sync ---------------------------------------------------------------------------------

    def sync_engine(self) -> Engine:
        """The session's engine, connected and with its schema built."""
        if self._sync_failure is not None:
            raise self._sync_failure
        if self._engine is not None:
            return self._engine
        url = self.urls[0]
        recipe = self._recipe
        engine: Engine | None = None
        try:
            url, filled = self._provision(0)
            url, options = dialects.engine_options(url)
            engine = create_engine(url, **options)
            PLUGIN_ENGINES.add(engine)
            dialects.prepare_engine(engine)
            keeper = ConnectionKeeper(engine)
            keeper.acquire()
            key = self._schema_key(url, engine)
            if recipe is not None and not filled and key not in self._filled:
                if recipe.migrate is not None:
                    recipe.migrate(url)
                _run_sync(engine, recipe.fill)
                self._report(f"built {recipe.describe} into {mask(url)}")
                self._filled[key] = functools.partial(_run_sync, engine, recipe.empty)
                self._now_ready(key, url)
        except Exception as exc:
            if engine is not None:
                engine.dispose()
            self._sync_failure = self._explain(exc, url, is_async=False)
            raise self._sync_failure from None
        self._engine, self._keeper = engine, keeper
        return engine

    def counters_of(self, sandbox: Sandbox) -> Counters:
        """The id counters of the sandbox's database as first seen in this run (read once,
        before the first test there wrote: the template's values)."""
        connection = sandbox.connection
        key = database_key(connection.engine.url)
        found = self._counters.get(key) if key is not None else None
        if found is None:
            with sandbox.watch.own_statements():
                found = Counters.read(connection)
            if key is not None:
                self._counters[key] = found
        return found

    def keeper_for(self, engine: Engine) -> ConnectionKeeper | None:
        """The kept connection of the plugin's own engine (None for a user's engine)."""
        return self._keeper if engine is self._engine else None

    # -- async --------------------------------------------------------------------------------

    async def loop_state(self) -> LoopState:
        """The running loop's engine and kept connection, schema built."""
        if self._async_failure is not None:
            raise self._async_failure
        try:
            return await self.loops.current()
        except pytest.UsageError:
            raise
        except Exception as exc:
            self._async_failure = self._explain(exc, self.urls[1], is_async=True)
            raise self._async_failure from None

    async def _new_async_engine(self) -> AsyncEngine:
        from sqlalchemy.ext.asyncio import create_async_engine

        recipe = self._recipe
        url, filled = self._provision(1)  # blocks the loop once, to create the database
        url, options = dialects.engine_options(url)
        engine = create_async_engine(url, **options)
        PLUGIN_ENGINES.add(engine.sync_engine)
        try:
            dialects.prepare_engine(engine.sync_engine)
            key = self._schema_key(url, engine)
            if recipe is not None and not filled and key not in self._filled:
                if recipe.migrate is not None:
                    recipe.migrate(url)  # blocks the loop while the migrations run
                async with engine.begin() as conn:
                    await conn.run_sync(recipe.fill)
                self._report(f"built {recipe.describe} into {mask(url)}")
                if not dialects.is_memory(url):
                    self._filled[key] = functools.partial(
                        databases.run_with_connection, url, recipe.empty, autocommit=False
                    )
                    self._now_ready(key, url)
            else:
                async with engine.connect():
                    pass  # fail here, with the URL, rather than inside the first test
        except BaseException:
            await engine.dispose()
            raise
        return engine

    # -- after an escape -----------------------------------------------------------------------

    def restore(self, engine: Engine | None = None) -> str:
        """Bring the test database back to its provisioned state after a test escaped its
        sandbox (what escaped is not known); returns a sentence saying what was done.

        Every connection the plugin keeps to it is given up first; async ones are replaced
        on their loop's next use.
        """
        self._give_up_connections()
        url = (engine.url if engine is not None else None) or (self.known_urls or (None,))[0]
        if url is None:
            return ""
        key = self._schema_key(url, engine)
        database = self._databases.get(key)
        if database is not None:
            return self._reprovision(database)
        if engine is None or (engine is not self._engine and key not in self._filled):
            return " The test database could not be restored (db_engine is overridden)."
        _run_sync(engine, self._rebuild)
        return f" The test database {mask(url)} was built again, so no later test sees it."

    def _reprovision(self, database: databases.ProvisionedDatabase) -> str:
        template = self._template_for(database.url)
        databases.restore(
            database, self.owner, self._recipe, template, self._report, reuse=self._reuse
        )
        what = "created anew"
        if self._recipe is not None:
            what = "cloned from the template again" if template else "built again"
        if database.adopted:
            what = "emptied of what the plugin built there, and built again"
        return f" The test database {mask(database.url)} was {what}, so no later test sees it."

    async def restore_async(self, engine: AsyncEngine) -> str:
        """:meth:`restore`, from an async test's teardown, on the loop of ``engine``."""
        if self._schema_key(engine.url, engine) in self._databases:
            state = self.loops.peek()
            if state is not None:
                await state.discard_connection()
            return self.restore(engine.sync_engine)
        self._give_up_connections()
        state = self.loops.peek()
        if state is not None:  # now, not at its next use: memory would be lost after the fill
            await state.discard_connection()
        async with engine.begin() as conn:  # the default file, or memory (it lives in the engine)
            await conn.run_sync(self._rebuild)
        return f" The test database {mask(engine.url)} was built again, so no later test sees it."

    # -- the commit strategy -------------------------------------------------------------------

    def database_kind(self, url: URL, engine: object) -> str | None:
        """What the database behind ``engine`` (at ``url``) is to the plugin: ``"own"`` (it
        created it, or the default file), ``"adopted"`` (it existed, empty: only what the
        plugin built there is its own), None (a database of the user's, or memory)."""
        key = self._schema_key(url, engine)
        database = self._databases.get(key)
        if database is not None:
            return "adopted" if database.adopted else "own"
        default = self.base is None and not dialects.is_memory(url)
        if key in self._filled or (default and key == self._schema_key(self.urls[0], None)):
            return "own"  # the default file, in pytest's temporary directory
        return None

    def ready(self) -> dict[str, URL]:
        """The databases of this target that are built, by key: provisioned, or filled."""
        found = {key: database.url for key, database in self._databases.items()}
        for key in self._filled:
            found.setdefault(key, make_url(key))
        return found

    def _now_ready(self, key: str, url: URL) -> None:
        hook = self.on_ready or (self._parent.on_ready if self._parent is not None else None)
        if hook is not None:
            hook(self, key, url)

    def begin_commit_test(self, key: str, url: URL) -> None:
        """Before a commit test: notes and snapshot (the first time), and the mark that a
        commit test runs, on the plugin's own database ``key``; nothing on an adopted one."""
        database = self._databases.get(key)
        if database is not None and database.adopted:
            return
        schemas: set[str | None] = {None}
        if self.settings.metadata or self.schema is not None:
            schemas |= {t.schema for md in self.metadatas() for t in md.tables.values()}

        def begin(conn: Connection) -> None:
            if key not in self.snapshots:
                self.snapshots[key] = commits.install(conn, schemas)
            commits.begin(conn)

        self._committer(key, url).run(begin, autocommit=False)

    def _committer(self, key: str, url: URL) -> commits.Committer:
        found = self._committers.get(key)
        if found is None:
            found = self._committers[key] = commits.Committer(url)
        return found

    def end_commit_test(self, key: str, url: URL) -> None:
        """After a commit test: put back what it wrote on database ``key``: its tables one by
        one, or the whole database when the test changed the schema (or it is adopted)."""
        snapshot = self.snapshots.get(key)
        if snapshot is None:
            self.restore_whole(key, url)
            return
        try:
            commits.restore_at(self._committer(key, url), snapshot)
        except commits.SchemaChanged:
            self.restore_whole(key, url)

    def push_layer(self, key: str, url: URL) -> None:
        """A layer fixture committed its rows on database ``key`` (see commits.py); the
        sandboxes' id counters are read again (they are put back to the layer's values)."""
        snapshot = self.snapshots[key]
        self._committer(key, url).run(
            lambda conn: commits.push_layer(conn, snapshot), autocommit=False
        )
        self._counters.pop(database_key(url), None)

    def pop_layer(self, key: str, url: URL) -> None:
        """The scope of the last layer on database ``key`` ended: undo it."""
        snapshot = self.snapshots.get(key)
        self._counters.pop(database_key(url), None)
        if snapshot is None or not snapshot.layers:
            return  # the database was made anew meanwhile (an escape): nothing of it is left
        try:
            commits.restore_at(self._committer(key, url), snapshot, commits.pop_layer)
        except commits.SchemaChanged:
            self.restore_whole(key, url)

    def restore_whole(self, key: str, url: URL) -> str:
        """Make the database ``key`` anew (see :meth:`restore`); the sentence saying so."""
        self._give_up_connections()
        database = self._databases.get(key)
        if database is not None:
            return self._reprovision(database)
        databases.run_with_connection(url, self._rebuild, autocommit=False)
        return f" The test database {mask(url)} was built again, so no later test sees it."

    def _give_up_connections(self) -> None:
        self.snapshots.clear()  # the database is made anew: notes and snapshot are gone
        committers, self._committers = self._committers, {}
        for committer in committers.values():
            committer.close()
        if self._keeper is not None:
            self._keeper.close()
        if self._engine is not None:
            self._engine.dispose()
        self.loops.expire()

    def _rebuild(self, connection: Connection) -> None:
        """Drop every table of a database that is the plugin's own (the default file, memory),
        and build the schema again."""
        from sqlalchemy import MetaData

        found = MetaData()
        found.reflect(connection)
        found.drop_all(connection)
        recipe = self._recipe
        if recipe is not None:
            recipe.fill(connection)

    # -- end ----------------------------------------------------------------------------------

    def close(self) -> list[str]:
        """Close kept connections, drop the tables this run created; returns problems."""
        problems: list[str] = []
        self._heartbeats.stop()
        for committer in self._committers.values():
            committer.close()
        self._committers.clear()
        if self._keeper is not None:
            self._keeper.close()
        try:
            self.loops.close()
        except Exception as exc:
            problems.append(f"closing the async connections failed: {_first_line(exc)}")
        for empty in self._filled.values():
            try:
                empty()
            except Exception as exc:
                problems.append(f"dropping the test tables failed: {_first_line(exc)}")
        self._filled.clear()
        if self._engine is not None:
            self._engine.dispose()
        for database in self._databases.values():
            try:
                databases.release(database, self.settings.run_id)
            except Exception as exc:
                problems.append(
                    f"dropping the test database {mask(database.url)} failed: {_first_line(exc)}"
                )
        self._databases.clear()
        if self._server is not None:  # the run's last target (see Targets.close)
            self._server.stop()
            self.templates.clear()  # they were on that server
        return problems


def _run_sync(engine: Engine, fn: Callable[[Connection], Any]) -> None:
    with engine.begin() as conn:
        fn(conn)


class Targets:
    """The run's targets: the ini's schema's, and one per schema that some tests give
    themselves by overriding the ``alchemy_metadata`` fixture (each its own test database,
    named with the schema's key, on the same server)."""

    def __init__(self, default: Target) -> None:
        self.default = default
        self._by_key: dict[str, Target] = {}
        self._named: dict[str, Target] = {}  # the application's other databases, by name
        self._databases = {d.name: d for d in default.settings.databases}
        self._given: dict[tuple[object, ...], Target] = {}  # what a fixture returned: its target

    def for_value(self, value: object, where: str) -> Target:
        """The target of what an ``alchemy_metadata`` fixture returned (None: the default)."""
        if value is None:
            return self.default
        items = value if isinstance(value, (list, tuple)) else (value,)
        given = tuple(item if isinstance(item, str) else id(item) for item in items)
        found = self._given.get(given)
        if found is None:
            found = self._given[given] = self._for_schema(schema.schema_of(value, where))
        return found

    def _for_schema(self, wanted: Schema | None) -> Target:
        if wanted is None:
            return self.default
        ini = {id(m) for m in self.default.metadatas()}
        if ini and {id(m) for m in wanted.metadatas} == ini:
            return self.default  # the ini's schema, by another name
        found = self._by_key.get(wanted.key)
        if found is None:
            base = self.default
            found = self._by_key[wanted.key] = Target(
                base.settings, base._tmp_dir, base._report, schema=wanted, parent=base
            )
        return found

    def named(self, name: str) -> Target:
        """The target of the database ``alchemy_databases`` names ``name``."""
        found = self._named.get(name)
        if found is None:
            database = self._databases[name]
            base = self.default
            key = f"{DATABASES_INI} ({name})"
            option = Option(key, None, key)
            settings = dataclasses.replace(
                base.settings,
                url=Setting(database.url, "ini", option),
                async_url=Setting(None, "default", option),
                metadata=database.metadata,
                seed=None,
                alembic=None,
                test_database=None,
                databases=(),
            )
            found = self._named[name] = Target(settings, base._tmp_dir, base._report)
            found.on_ready = base.on_ready
        return found

    def database_of(self, url: URL) -> tuple[str, str | None]:
        """The name of the database an engine at ``url`` works on (``"default"``: alchemy_url's,
        or one not named), and, for a read replica, the replica's name."""
        key = database_key(url)
        for database in self._databases.values():
            if key is not None and database_key(database.url) == key:
                if database.replica_of is not None:
                    return database.replica_of, database.name
                return database.name, None
        return "default", None

    def all(self) -> list[Target]:
        return [self.default, *self._by_key.values(), *self._named.values()]

    def of_engine(self, engine: Engine) -> Target:
        """The target whose engine ``engine`` is (the default for an engine of the user's)."""
        for target in self.all():
            if target._engine is engine:
                return target
        return self.default

    def of_async_engine(self, engine: AsyncEngine) -> Target:
        for target in self.all():
            state = target.loops.peek()
            if state is not None and state.engine is engine:
                return target
        return self.default

    @property
    def known_urls(self) -> tuple[URL, ...]:
        return tuple(url for target in self.all() for url in target.known_urls)

    @property
    def known_base(self) -> tuple[URL, ...]:
        targets = self.all()
        if len(targets) == 1:  # nothing to merge (a URL's hash renders it: asked every test)
            return targets[0].known_base
        return tuple(dict.fromkeys(url for target in targets for url in target.known_base))

    def written(self, keys: set[tuple[Any, ...]]) -> list[Target]:
        """The targets whose test database is one of ``keys`` (see routing.database_key)."""
        return [
            target
            for target in self.all()
            if any(database_key(url) in keys for url in target.known_urls)
        ]

    @property
    def templates(self) -> dict[URL, bool]:
        return {url: kept for target in self.all() for url, kept in target.templates.items()}

    def close(self) -> list[str]:
        """Close every target, the default last (it stops a throwaway server)."""
        problems: list[str] = []
        for target in [*self._named.values(), *self._by_key.values(), self.default]:
            problems += target.close()
        return problems
