"""Build the schema from ``alchemy_metadata`` once, and drop only what was built."""

from __future__ import annotations

import configparser
import contextvars
import functools
import hashlib
import importlib
import inspect as inspect_module
import os
import re
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import MetaData, inspect
from sqlalchemy.engine import default
from sqlalchemy.exc import DBAPIError
from sqlalchemy.schema import CreateIndex, CreateTable

from pytest_alchemy import dialects, inventory, routing
from pytest_alchemy.config import (
    ALEMBIC_INI,
    METADATA_INI,
    SEED_INI,
    Settings,
    mask,
    validate_import_paths,
)
from pytest_alchemy.databases import MARKER_TABLE, Recipe, run_with_connection
from pytest_alchemy.errors import ProvisioningError, SchemaConflictError

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.engine import URL, Connection, Dialect


def load_object(key: str, path: str, expected: str) -> object:
    """Import ``module:attr.path``; a usage error naming ``key`` if it cannot be found."""
    module_name, _, attr_path = path.partition(":")
    try:
        obj: object = importlib.import_module(module_name)
    except Exception as exc:
        raise pytest.UsageError(
            f"{key} = {path!r}: cannot import module {module_name!r} "
            f"({type(exc).__name__}: {exc}). Check the module path and that it is importable "
            f"from the test run (pytest's 'pythonpath' ini key can add a source folder)."
        ) from None
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise pytest.UsageError(
                f"{key} = {path!r}: module {module_name!r} has no attribute {attr_path!r}. "
                f"Name {expected}."
            ) from None
    return obj


def load_metadata(paths: tuple[str, ...]) -> list[MetaData]:
    """Import each ``module:attr`` and return its MetaData (a MetaData or anything with one)."""
    given = [
        (
            path,
            load_object(
                METADATA_INI,
                path,
                "a MetaData or a declarative base, for example 'myapp.models:Base'",
            ),
        )
        for path in paths
    ]
    return _metadatas(given, METADATA_INI, f"-o {METADATA_INI}=...")


def _metadatas(given: list[tuple[str, object]], where: str, advice: str) -> list[MetaData]:
    """The MetaData of each (label, object), each once; a usage error for an object that has
    none, and for two of them defining the same table (they would share one database)."""
    found: list[MetaData] = []
    owners: dict[str, str] = {}  # table: the label of the metadata that defines it
    for label, obj in given:
        metadata = obj if isinstance(obj, MetaData) else getattr(obj, "metadata", None)
        if not isinstance(metadata, MetaData):
            raise pytest.UsageError(
                f"{where} = {label!r} is a {type(obj).__name__}, not a MetaData or a "
                f"declarative base. Name a MetaData or a class with a .metadata attribute."
            )
        if any(metadata is m for m in found):
            continue  # the same MetaData by another path
        for table in metadata.tables:
            other = owners.get(table)
            if other is not None:
                raise pytest.UsageError(
                    f"{where}: {other!r} and {label!r} both define the table {table!r}, and "
                    f"they are built into one test database. List one of them, or give the "
                    f"tests of each schema their own: override the {METADATA_INI} fixture in "
                    f"the conftest.py of their directory ({advice})."
                )
            owners[table] = label
        found.append(metadata)
    return found


@dataclass(frozen=True)
class Schema:
    """A schema some tests ask for through the ``alchemy_metadata`` fixture: its own test
    database, named with ``key``."""

    labels: tuple[str, ...]  # import paths, or what names the objects given
    metadatas: tuple[MetaData, ...]

    @property
    def key(self) -> str:
        """The database name part of this schema: stable while its labels are."""
        digest = hashlib.sha256("\n".join(sorted(self.labels)).encode()).hexdigest()
        return f"s{digest[:8]}"


def _label(obj: object) -> str:
    if isinstance(obj, str):
        return obj
    if isinstance(obj, type):
        return f"{obj.__module__}:{obj.__qualname__}"
    if isinstance(obj, MetaData):
        return f"MetaData({', '.join(sorted(obj.tables))})"
    return repr(obj)


def schema_of(value: object, where: str) -> Schema | None:
    """The schema an ``alchemy_metadata`` fixture returned (None: the ini's).

    ``value`` is a MetaData, a declarative base, an import path ``module:attr``, or a list or
    tuple of these; ``where`` names the fixture for the errors.
    """
    if value is None:
        return None
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise pytest.UsageError(
            f"{where} returned an empty {type(value).__name__}. Return a MetaData, a declarative "
            f"base or an import path 'module:attr' (or a list of them); None keeps the ini's "
            f"{METADATA_INI}."
        )
    given: list[tuple[str, object]] = []
    for item in items:
        label = _label(item)
        if isinstance(item, str):
            paths = validate_import_paths(where, [item])
            item = load_object(where, paths[0], "a MetaData or a declarative base")
        given.append((label, item))
    metadatas = _metadatas(given, where, "one schema per directory, module or class")
    return Schema(tuple(label for label, _ in given), tuple(metadatas))


def build(connection: Connection, metadatas: list[MetaData], where: str) -> None:
    """Create every table of ``metadatas``; refuse if any of them already exists.

    ``where`` names the database (masked URL) for the error message.
    """
    inspector = inspect(connection)
    tables = [t for md in metadatas for t in md.sorted_tables]
    existing = [t for t in tables if inspector.has_table(t.name, schema=t.schema)]
    if existing:
        names = ", ".join(repr(t.fullname) for t in existing)
        raise SchemaConflictError(
            f"{METADATA_INI}: table(s) {names} already exist in {where}. pytest-alchemy builds "
            f"the schema itself and never drops tables it did not create. Point alchemy_url at "
            f"an empty database, drop those tables, or remove {METADATA_INI} if the schema is "
            f"already in place."
        )
    for metadata in metadatas:
        try:
            metadata.create_all(connection, checkfirst=False)
        except DBAPIError as exc:  # the server refused a table: not a connection problem
            raise user_code_failed(f"{METADATA_INI}: creating the tables", exc) from None


def load_seed(path: str | None) -> Callable[[Connection], object] | None:
    """The ``alchemy_seed`` function, if one is configured."""
    if path is None:
        return None
    seed = load_object(SEED_INI, path, "a function taking a Connection")
    if not callable(seed):
        raise pytest.UsageError(
            f"{SEED_INI} = {path!r} is a {type(seed).__name__}, not a function. Name a function "
            f"that takes a SQLAlchemy Connection, for example 'myapp.testing:seed'."
        )
    return seed


def recipe(
    metadatas: list[MetaData],
    seed: Callable[[Connection], object] | None,
    settings: Settings,
    configured: URL | None = None,
) -> Recipe | None:
    """How to fill a new test database from alchemy_metadata / alchemy_alembic and alchemy_seed."""
    if settings.alembic and metadatas:
        raise pytest.UsageError(
            f"Both {METADATA_INI} and {ALEMBIC_INI} are set: choose one way to build the schema "
            f"(Alembic migrations usually create the tables the metadata describes)."
        )
    if not metadatas and seed is None and not settings.alembic:
        return None

    def fill(connection: Connection) -> None:
        if metadatas:
            build(connection, metadatas, mask(connection.engine.url))
        if seed is not None:
            try:
                seed(connection)
            except Exception as exc:
                raise user_code_failed(f"{SEED_INI} = {settings.seed!r}", exc) from None

    def empty(connection: Connection) -> None:
        if settings.alembic:  # what the migrations made: everything in this (adopted) database
            reflected = MetaData()
            reflected.reflect(connection)
            reflected.drop_all(connection)
        for metadata in reversed(metadatas):
            metadata.drop_all(connection)

    parts = [f"the schema of {', '.join(settings.metadata)}"] if metadatas else []
    migrate = None
    if settings.alembic:
        parts.append(f"the migrations of {settings.alembic} (upgrade head)")
        migrate = functools.partial(_upgrade, settings.alembic, configured)
    if seed is not None:
        parts.append(f"the rows of {settings.seed}")
    tables = sum(len(md.tables) for md in metadatas)
    plural = "" if tables == 1 else "s"
    describe = " and ".join(parts) + (f" ({tables} table{plural})" if metadatas else "")
    backend = configured.get_backend_name() if configured is not None else "sqlite"
    digest = fingerprint(metadatas, seed, settings.alembic, backend)
    return Recipe(fill, empty, digest, describe, migrate)


def _upgrade(ini: str, configured: URL | None, url: URL) -> None:
    """``alembic upgrade head`` on ``url``, which env.py reads from ``sqlalchemy.url``.

    The URL keeps the driver of the configured alchemy_url, which is what the project's env.py
    is written for (sync or async). It runs in a thread of its own without an event loop: an
    async env.py calls asyncio.run().
    """
    if dialects.is_memory(url):
        raise pytest.UsageError(
            f"{ALEMBIC_INI} needs a database that outlives a connection; in-memory SQLite gives "
            f"every connection its own. Use a SQLite file or a server in alchemy_url."
        )
    if configured is not None:
        url = url.set(drivername=configured.drivername)
    try:
        from alembic import command
        from alembic.config import Config
    except ImportError:
        raise pytest.UsageError(
            f"{ALEMBIC_INI} = {ini!r} needs Alembic: pip install alembic"
        ) from None
    config = Config(ini)
    config.set_main_option(
        "sqlalchemy.url", url.render_as_string(hide_password=False).replace("%", "%%")
    )
    location = _script_location(Path(ini), config.get_main_option("script_location"))
    if location is not None:
        config.set_main_option("script_location", location.replace("%", "%%"))
    errors: list[BaseException] = []

    def run() -> None:
        try:
            command.upgrade(config, "head")
        except BaseException as exc:
            errors.append(exc)

    # The caller's context variables go along: an app context the suite pushed (Flask's
    # current_app, which Flask-Migrate's env.py reads) is there in the thread too.
    context = contextvars.copy_context()
    thread = threading.Thread(target=context.run, args=(run,), name="pytest-alchemy-alembic")
    with routing.building(url):  # an env.py that migrates through the application's engine
        thread.start()
        thread.join()
    if errors:
        if not isinstance(errors[0], Exception):
            raise errors[0]  # KeyboardInterrupt, SystemExit
        advice = ""
        if "application context" in str(errors[0]):
            advice = (
                " env.py needs the Flask app's context (Flask-Migrate's does): push it for the "
                "run in a session-scoped autouse fixture of your conftest.py, `app = "
                "create_app()` then `with app.app_context(): yield app`, and list the app's "
                "db in alchemy_engines so its engine migrates the test database."
            )
        raise user_code_failed(
            f"{ALEMBIC_INI} = {ini!r}: `alembic upgrade head`", errors[0], advice
        )
    _check_upgraded(ini, config, url)


_LIBRARIES = tuple(
    f"{os.sep}{name}{os.sep}" for name in ("sqlalchemy", "alembic", "pytest_alchemy", "asyncio")
)


def user_code_failed(what: str, exc: BaseException, advice: str = "") -> ProvisioningError:
    """The error of the user's seed or migrations, with the user's own frames in it (not the
    plugin's, SQLAlchemy's or Alembic's), and not mistaken for a connection failure."""
    frames = [
        frame
        for frame in traceback.extract_tb(exc.__traceback__)
        if not frame.filename.endswith("threading.py")
        and not frame.filename.startswith("<frozen")
        and not any(part in frame.filename for part in _LIBRARIES)
    ]
    text = str(getattr(exc, "orig", None) or exc).strip()
    first = text.splitlines()[0] if text else ""
    error = ProvisioningError(f"{what} raised {type(exc).__name__}: {first}{advice}")
    error.details = "".join(traceback.format_list(frames[-8:])).rstrip()
    return error


def _check_upgraded(ini: str, config: object, url: URL) -> None:
    """Stop if the migrations did not land in the test database: an env.py that reads the URL
    from the application's settings has just migrated that database instead."""
    from alembic.script import ScriptDirectory

    if not ScriptDirectory.from_config(config).get_heads():  # type: ignore[arg-type]
        return  # no revision: nothing to find
    found = run_with_connection(
        url, lambda c: inventory.objects(c, skip=MARKER_TABLE), autocommit=True
    )
    if not found:
        raise ProvisioningError(
            f"{ALEMBIC_INI} = {ini!r}: `alembic upgrade head` ran, but the test database "
            f"{mask(url)} is still empty, so the migrations went to another database: most "
            f"likely the one env.py reads from the application's settings, which they have now "
            f"upgraded. env.py must connect to the URL the plugin sets in the Alembic config: "
            f"engine_from_config(config.get_section(config.config_ini_section), "
            f"prefix='sqlalchemy.'), or config.get_main_option('sqlalchemy.url'); or migrate "
            f"through the application's engine and list it in alchemy_engines (the plugin "
            f"points it at the test database while migrating, as Flask-Migrate needs)."
        )


def fingerprint(
    metadatas: list[MetaData],
    seed: Callable[..., object] | None,
    alembic: str | None = None,
    backend: str = "sqlite",
) -> str:
    """A digest of what the recipe builds: every table's and index's DDL as ``backend``
    compiles it, enum values, the Alembic scripts (alembic.ini and every file of its script
    and version locations), and the seed's module source.

    Compiled with the target's dialect (by backend, not driver: the sync and async URLs of one
    database share it): the generic one cannot compile JSONB, ARRAY, INET and other dialect
    types, and would miss what only the target's DDL shows (partial index conditions).
    """
    digest = hashlib.sha256()
    if alembic is not None:
        for path in _alembic_files(alembic):
            digest.update(str(path).encode())
            digest.update(path.read_bytes())
    dialect = _dialect(backend)
    for metadata in metadatas:
        for table in metadata.sorted_tables:
            digest.update(str(CreateTable(table).compile(dialect=dialect)).encode())
            for index in sorted(table.indexes, key=lambda i: i.name or ""):
                digest.update(str(CreateIndex(index).compile(dialect=dialect)).encode())
            for column in table.columns:
                kind = column.type
                values = getattr(getattr(kind, "impl", kind), "enums", None)
                if values:  # a native enum's values are in CREATE TYPE, not in CREATE TABLE
                    digest.update(repr((column.key, list(values))).encode())
    if seed is not None:
        module = inspect_module.getmodule(seed)
        try:
            digest.update(inspect_module.getsource(module or seed).encode())
        except (OSError, TypeError):
            digest.update(repr(seed).encode())
    return digest.hexdigest()


def _dialect(backend: str) -> Dialect:
    """The dialect of ``backend`` (its default driver's: DDL does not depend on the driver)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(f"{backend}://").get_dialect()()
    except Exception:  # a third-party backend that cannot load without its driver
        return default.DefaultDialect()


def _alembic_files(ini: str) -> list[Path]:
    """alembic.ini and the files of its script and version locations, in a stable order."""
    ini_path = Path(ini)
    parser = configparser.ConfigParser(defaults={"here": str(ini_path.parent)})  # as Alembic
    parser.read(ini_path)
    location = _script_location(ini_path, parser.get("alembic", "script_location", fallback=""))
    locations = [location or "alembic", *_version_locations(parser)]
    files: set[Path] = set()
    for place in locations:
        folder = Path(place) if Path(place).is_absolute() else ini_path.parent / place
        if folder.is_dir():
            files |= {p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    return [ini_path, *sorted(files)]


def _script_location(ini: Path, configured: str | None) -> str | None:
    """Where the migration scripts are, as the plugin runs them.

    Flask-Migrate's alembic.ini names no ``script_location`` (its ``flask db`` commands set
    it): then the ini's own folder, when env.py is there. A relative path is taken from the
    ini's folder when it is there; Alembic takes it from the current directory, which changes
    with where pytest is started.
    """
    if not configured:
        return str(ini.parent) if (ini.parent / "env.py").is_file() else None
    if not Path(configured).is_absolute() and (ini.parent / configured).is_dir():
        return str(ini.parent / configured)
    return configured  # absolute, a package resource ('myapp:migrations'), or as Alembic finds


def _version_locations(parser: configparser.ConfigParser) -> list[str]:
    """Alembic's ``version_locations``, split as Alembic splits them."""
    raw = parser.get("alembic", "version_locations", fallback="").strip()
    if not raw:
        return []
    separator = parser.get("alembic", "version_path_separator", fallback="").strip()
    chosen = {"os": os.pathsep, "space": " ", "newline": "\n", "": None}.get(separator, separator)
    if chosen is None:  # older Alembic: spaces or commas
        return [p for p in re.split(r"[,\s]+", raw) if p]
    return [p.strip() for p in raw.split(chosen) if p.strip()]
