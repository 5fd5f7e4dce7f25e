"""The target: the database the tests run on, its engines, and its schema's lifetime.

The test database itself is created and dropped by :mod:`pytest_alchemy.databases`.

Nothing here connects until a test asks for a database fixture. The first failure (driver
missing, server unreachable, schema conflict) is remembered, so every later test fails with the
same short message instead of retrying the connection.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import NoSuchModuleError

from pytest_alchemy import databases, dialects, schema
from pytest_alchemy.aio import LoopEngines, LoopState
from pytest_alchemy.config import Setting, Settings, mask
from pytest_alchemy.errors import (
    AlchemyError,
    DatabaseUnavailableError,
    DriverMissingError,
)
from pytest_alchemy.sandbox import ConnectionKeeper

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from sqlalchemy import MetaData
    from sqlalchemy.engine import Connection, Engine
    from sqlalchemy.ext.asyncio import AsyncEngine

T = TypeVar("T")


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Target:
    """The configured test database: URLs, engines, kept connections and the built schema."""

    def __init__(self, settings: Settings, tmp_dir: Callable[[], Path]) -> None:
        self.settings = settings
        self._tmp_dir = tmp_dir
        self._urls: tuple[URL, URL] | None = None
        self._metadata: list[MetaData] | None = None
        self._built: dict[str, tuple[schema.BuiltSchema, Callable[[schema.BuiltSchema], None]]] = {}
        self._engine: Engine | None = None
        self._keeper: ConnectionKeeper | None = None
        self._sync_failure: AlchemyError | None = None
        self._async_failure: AlchemyError | None = None
        self._databases: dict[str, databases.ProvisionedDatabase] = {}
        self._run_id = uuid.uuid4().hex
        self.loops = LoopEngines(self._new_async_engine)

    # -- URLs -------------------------------------------------------------------------------

    @property
    def urls(self) -> tuple[URL, URL]:
        """(sync URL, async URL), with the default SQLite file resolved."""
        if self._urls is None:
            s = self.settings
            base = s.url.url
            if base is None:  # a file of our own in pytest's temporary directory, per worker
                base = make_url(f"sqlite:///{self._tmp_dir() / 'alchemy.sqlite3'}")
            sync_url = dialects.sync_twin(base)
            async_url = s.async_url.url or dialects.async_twin(base)
            if s.url.url is not None:
                naming = databases.Naming(s.test_database, s.database_suffix, s.worker)
                sync_url = databases.derive_test_url(sync_url, naming)
                async_url = databases.derive_test_url(async_url, naming)
            self._urls = (sync_url, async_url)
        return self._urls

    def _provision(self, url: URL) -> None:
        """Create the test database behind ``url`` once per run (not the default file)."""
        if self.settings.url.url is None or dialects.is_memory(url):
            return
        key = self._schema_key(url, None)
        if key not in self._databases:
            self._databases[key] = databases.provision(url, self._run_id)

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
        if isinstance(exc, AlchemyError):
            return exc
        if isinstance(exc, (ImportError, NoSuchModuleError)):
            return DriverMissingError(
                f"The driver for {mask(url)} ({origin}) is not installed: {_first_line(exc)}. "
                f"Install it with `{dialects.install_hint(url)}`, or change {option.cli} / "
                f"{option.env} / {option.ini}."
            )
        message = _first_line(exc)
        if url.password:
            message = message.replace(str(url.password), "***")
        return DatabaseUnavailableError(
            f"Cannot connect to the test database {mask(url)} ({origin}): {message}. Start the "
            f"server, or point {option.cli} / {option.env} / {option.ini} at a reachable database."
        )

    # -- schema -------------------------------------------------------------------------------

    def _metadatas(self) -> list[MetaData]:
        if self._metadata is None:
            self._metadata = schema.load_metadata(self.settings.metadata)
        return self._metadata

    def _schema_key(self, url: URL, engine: object) -> str:
        if dialects.is_memory(url):
            return f"memory:{id(engine)}"
        return url.set(drivername=url.get_backend_name(), password=None).render_as_string()

    def _remember(
        self, key: str, built: schema.BuiltSchema, drop: Callable[[schema.BuiltSchema], None]
    ) -> None:
        self._built[key] = (built, drop)

    # -- sync ---------------------------------------------------------------------------------

    def sync_engine(self) -> Engine:
        """The session's engine, connected and with its schema built."""
        if self._sync_failure is not None:
            raise self._sync_failure
        if self._engine is not None:
            return self._engine
        url = self.urls[0]
        metadatas = self._metadatas()
        engine: Engine | None = None
        try:
            self._provision(url)
            url, options = dialects.engine_options(url)
            engine = create_engine(url, **options)
            dialects.prepare_engine(engine)
            keeper = ConnectionKeeper(engine)
            keeper.acquire()
            key = self._schema_key(url, engine)
            if metadatas and key not in self._built:
                with engine.begin() as conn:
                    built = schema.build(conn, metadatas, mask(url))
                self._remember(key, built, lambda b: _run_sync(engine, b.drop))
        except Exception as exc:
            if engine is not None:
                engine.dispose()
            self._sync_failure = self._explain(exc, url, is_async=False)
            raise self._sync_failure from None
        self._engine, self._keeper = engine, keeper
        return engine

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

        metadatas = self._metadatas()
        self._provision(self.urls[1])  # blocks the loop once, while the database is created
        url, options = dialects.engine_options(self.urls[1])
        engine = create_async_engine(url, **options)
        try:
            dialects.prepare_engine(engine.sync_engine)
            key = self._schema_key(url, engine)
            if metadatas and key not in self._built:
                async with engine.begin() as conn:
                    built = await conn.run_sync(schema.build, metadatas, mask(url))
                if not dialects.is_memory(url):
                    self._remember(
                        key,
                        built,
                        lambda b: databases.run_with_connection(url, b.drop, autocommit=False),
                    )
            else:
                async with engine.connect():
                    pass  # fail here, with the URL, rather than inside the first test
        except BaseException:
            await engine.dispose()
            raise
        return engine

    # -- end ----------------------------------------------------------------------------------

    def close(self) -> list[str]:
        """Close kept connections, drop the tables this run created; returns problems."""
        problems: list[str] = []
        if self._keeper is not None:
            self._keeper.close()
        try:
            self.loops.close()
        except Exception as exc:
            problems.append(f"closing the async connections failed: {_first_line(exc)}")
        for key, (built, drop) in self._built.items():
            database = self._databases.get(key)
            if database is not None and database.created:
                continue  # the whole database goes below
            try:
                drop(built)
            except Exception as exc:
                problems.append(f"dropping the test tables failed: {_first_line(exc)}")
        self._built.clear()
        if self._engine is not None:
            self._engine.dispose()
        for database in self._databases.values():
            try:
                databases.release(database)
            except Exception as exc:
                problems.append(
                    f"dropping the test database {mask(database.url)} failed: {_first_line(exc)}"
                )
        self._databases.clear()
        return problems


def _run_sync(engine: Engine, fn: Callable[[Connection], Any]) -> None:
    with engine.begin() as conn:
        fn(conn)
