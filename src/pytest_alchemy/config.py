"""One frozen settings object, resolved once from CLI, environment, ini and defaults."""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

if TYPE_CHECKING:
    from collections.abc import Sequence

#: Where a setting may come from, highest precedence first.
SOURCES = ("cli", "env", "ini", "default")

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@dataclass(frozen=True)
class Option:
    """The names one setting goes by, in each place it can be given."""

    cli: str
    env: str | None
    ini: str

    @property
    def dest(self) -> str:
        return self.cli.lstrip("-").replace("-", "_")

    def spelled(self, source: str) -> str:
        """How the user wrote the setting that came from ``source``."""
        return {"cli": self.cli, "env": self.env or "", "ini": f"{self.ini} (ini)"}.get(
            source, "the default"
        )


URL_OPTION = Option("--alchemy-url", "PYTEST_ALCHEMY_URL", "alchemy_url")
ASYNC_URL_OPTION = Option("--alchemy-async-url", "PYTEST_ALCHEMY_ASYNC_URL", "alchemy_async_url")
METADATA_INI = "alchemy_metadata"
TEST_DATABASE_INI = "alchemy_test_database"
SEED_INI = "alchemy_seed"
REUSE_INI = "alchemy_reuse"
ALEMBIC_INI = "alchemy_alembic"
ENGINES_INI = "alchemy_engines"
BLOCK_INI = "alchemy_block_unsandboxed"
RESET_SEQUENCES_INI = "alchemy_reset_sequences"
COMMIT_LAST_INI = "alchemy_commit_tests_last"
NPLUSONE_INI = "alchemy_nplusone"
FACTORIES_INI = "alchemy_factories"
REQUIRE_MARKER_INI = "alchemy_require_marker"
#: The values of ini alchemy_nplusone and of the marker option nplusone.
NPLUSONE_MODES = ("off", "warn", "fail")
THREAD_WAIT_INI = "alchemy_thread_wait"
DATABASES_INI = "alchemy_databases"
_DATABASE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: Seconds a thread waits for another thread's statement on the shared connection.
THREAD_WAIT_DEFAULT = 10.0
SUFFIX_OPTION = Option(
    "--alchemy-database-suffix", "PYTEST_ALCHEMY_DATABASE_SUFFIX", "alchemy_database_suffix"
)
RUN_ID_KEY = "alchemy_run_id"
RUN_PID_KEY = "alchemy_run_pid"
_NAME_PART = re.compile(r"^[A-Za-z0-9_]+$")


@dataclass(frozen=True)
class Setting:
    """A resolved URL and where it came from (``cli``, ``env``, ``ini`` or ``default``)."""

    url: URL | None
    source: str
    option: Option

    @property
    def origin(self) -> str:
        """Human-readable provenance, for the report header and error messages."""
        return self.option.spelled(self.source)


@dataclass(frozen=True)
class Settings:
    """Everything the plugin was told, resolved with precedence CLI > env > ini > default.

    ``url.url`` is None for the default: a SQLite file in pytest's temporary directory, whose
    path is only known once the session starts.
    """

    url: Setting
    async_url: Setting
    metadata: tuple[str, ...]
    test_database: str | None = None
    database_suffix: str | None = None
    worker: str | None = None  # pytest-xdist worker id
    seed: str | None = None
    alembic: str | None = None  # absolute path of alembic.ini
    reuse: bool = False
    recreate: bool = False
    run_id: str = ""  # shared by the xdist controller with its workers
    engines: tuple[str, ...] = ()  # the application's engines routed into every sandbox
    block_unsandboxed: bool = False
    run_pid: int = 0  # the process that started the run (the xdist controller)
    reset_sequences: bool = False  # the default of the marker option of the same name
    session_options: tuple[tuple[str, Any], ...] = ()  # see sessions.py
    session_class: str | None = None
    async_session_class: str | None = None
    thread_wait: float = THREAD_WAIT_DEFAULT  # see sandbox.TurnLock
    databases: tuple[Database, ...] = ()  # the application's other databases
    commit_tests_last: bool = True  # tests of the commit strategy run after the others
    nplusone: str = "off"  # N+1 detection: the default of the marker option of the same name
    factories: tuple[str, ...] = ()  # factory modules and base classes bound to the sandbox
    require_marker: bool = False  # tests that do not ask for the database may not use it

    @property
    def configured(self) -> bool:
        """Whether the suite configured the plugin (a URL, a schema, engines, ...): only then
        does it appear in the report header."""
        return bool(
            self.url.source != "default"
            or self.async_url.source != "default"
            or self.metadata
            or self.alembic
            or self.seed
            or self.engines
            or self.databases
        )


@dataclass(frozen=True)
class Database:
    """One of the application's other databases (``alchemy_databases``): its base URL and the
    metadata its test database is built from; or, with ``replica_of``, a read replica that
    tests see as that database, read-only."""

    name: str
    url: URL
    metadata: tuple[str, ...] = ()
    replica_of: str | None = None


def parse_databases(lines: Sequence[str], default_name: str = "default") -> tuple[Database, ...]:
    """``name = URL [module:attr ...]`` and ``name = URL replica of other`` lines."""
    found: dict[str, Database] = {}
    for line in lines:
        if not line.strip():
            continue
        name, sep, rest = (part.strip() for part in line.partition("="))
        words = rest.split()
        if not sep or not _DATABASE_NAME.match(name) or not words:
            raise pytest.UsageError(
                f"{DATABASES_INI}: {_masked_line(line)!r} is not 'name = URL [module:Base ...]'. "
                f"For example 'analytics = postgresql+psycopg://localhost/analytics "
                f"myapp.analytics:Base', or 'reader = postgresql+psycopg://replica/myapp "
                f"replica of default' for a read replica."
            )
        if name == default_name or name in found:
            raise pytest.UsageError(
                f"{DATABASES_INI}: the name {name!r} is given twice ('{default_name}' is "
                f"alchemy_url's database). Give each database a name of its own."
            )
        option = Option(f"{DATABASES_INI} ({name})", None, f"{DATABASES_INI} ({name})")
        url = _parse_url(words[0], "ini", option).url
        assert url is not None
        replica_of = None
        if words[1:3] == ["replica", "of"] and len(words) == 4:
            replica_of = words[3]
            paths: tuple[str, ...] = ()
        else:
            paths = validate_import_paths(f"{DATABASES_INI} ({name})", words[1:])
        found[name] = Database(name, url, paths, replica_of)
    for database in found.values():
        target = database.replica_of
        if (
            target is not None
            and target != default_name
            and (target not in found or found[target].replica_of is not None)
        ):
            raise pytest.UsageError(
                f"{DATABASES_INI} ({database.name}): 'replica of {target}' names no database "
                f"of {DATABASES_INI} (or '{default_name}', alchemy_url's). Name the primary "
                f"the replica copies."
            )
    return tuple(found.values())


def _masked_line(line: str) -> str:
    """An ini line with any password in a URL hidden."""
    return re.sub(r"(://[^:/@\s]+:)[^@\s]+@", r"\1***@", line.strip())


def _lookup(config: pytest.Config, option: Option) -> tuple[str | None, str]:
    cli = config.getoption(option.dest)
    if cli is not None:
        return str(cli), "cli"
    if option.env and os.environ.get(option.env):
        return os.environ[option.env], "env"
    ini = config.getini(option.ini)
    if ini:
        return str(ini), "ini"
    return None, "default"


def _parse_url(raw: str | None, source: str, option: Option) -> Setting:
    if raw is None:
        return Setting(None, source, option)
    try:
        url = make_url(raw.strip())
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        # No echo of the raw value: it may hold a password.
        raise pytest.UsageError(
            f"{option.spelled(source)}: not a SQLAlchemy URL. Expected a URL such as "
            f"'postgresql+psycopg://user@localhost/myapp' or 'sqlite:///test.db'."
        ) from None
    if url.port is not None and not 0 < url.port < 65536:
        raise pytest.UsageError(
            f"{option.spelled(source)}: port {url.port} is out of range (1-65535). "
            f"PostgreSQL listens on 5432 by default, MySQL and MariaDB on 3306."
        )
    if url.drivername != "postgresql+ephemeral":  # the plugin's own, no SQLAlchemy dialect
        try:
            url.get_dialect()
        except NoSuchModuleError:
            raise pytest.UsageError(
                f"{option.spelled(source)}: SQLAlchemy has no dialect {url.drivername!r}. "
                f"Write the backend as postgresql, mysql, mariadb or sqlite, optionally with a "
                f"driver: 'postgresql+psycopg://…', 'mysql+pymysql://…', 'sqlite:///…'; or "
                f"install the package that provides that dialect."
            ) from None
        except Exception:  # the dialect is there but cannot load now (greenlet): later
            pass
    return Setting(url, source, option)


def validate_import_paths(key: str, values: Sequence[str]) -> tuple[str, ...]:
    """Check that every value looks like ``package.module:attribute``."""
    paths = tuple(v.strip() for v in values if v.strip())
    for path in paths:
        if not _IMPORT_PATH.match(path):
            raise pytest.UsageError(
                f"{key} = {path!r} is not an import path. Write it as 'package.module:attribute', "
                f"for example 'myapp.models:Base'."
            )
    return paths


def resolve(config: pytest.Config) -> Settings:
    """Resolve the settings once; raises pytest.UsageError on a bad value."""
    from pytest_alchemy import sessions

    url = _parse_url(*_lookup(config, URL_OPTION), URL_OPTION)
    async_url = _parse_url(*_lookup(config, ASYNC_URL_OPTION), ASYNC_URL_OPTION)
    metadata = validate_import_paths(METADATA_INI, config.getini(METADATA_INI))
    test_database = _name_part(TEST_DATABASE_INI, config.getini(TEST_DATABASE_INI) or None)
    raw_suffix, suffix_source = _lookup(config, SUFFIX_OPTION)
    suffix = _name_part(SUFFIX_OPTION.spelled(suffix_source), raw_suffix)
    workerinput = getattr(config, "workerinput", {})
    seeds = validate_import_paths(SEED_INI, [config.getini(SEED_INI) or ""])
    return Settings(
        url,
        async_url,
        metadata,
        test_database,
        suffix,
        workerinput.get("workerid"),
        seeds[0] if seeds else None,
        _alembic_ini(config),
        _flag(config.getoption("alchemy_reuse"), config.getini(REUSE_INI)),
        bool(config.getoption("alchemy_recreate")),
        workerinput.get(RUN_ID_KEY) or uuid.uuid4().hex,
        validate_import_paths(ENGINES_INI, config.getini(ENGINES_INI)),
        bool(config.getini(BLOCK_INI)),
        int(workerinput.get(RUN_PID_KEY) or os.getpid()),
        reset_sequences=bool(config.getini(RESET_SEQUENCES_INI)),
        session_options=sessions.parse_options(config.getini(sessions.OPTIONS_INI)),
        session_class=_one_path(config, sessions.CLASS_INI),
        async_session_class=_one_path(config, sessions.ASYNC_CLASS_INI),
        thread_wait=_seconds(THREAD_WAIT_INI, config.getini(THREAD_WAIT_INI)),
        databases=_distinct(url, parse_databases(config.getini(DATABASES_INI))),
        commit_tests_last=bool(config.getini(COMMIT_LAST_INI)),
        nplusone=_nplusone(config.getini(NPLUSONE_INI)),
        factories=tuple(p.strip() for p in config.getini(FACTORIES_INI) if p.strip()),
        require_marker=bool(config.getini(REQUIRE_MARKER_INI)),
    )


def _nplusone(value: object) -> str:
    mode = str(value or "off").strip().lower()
    if mode not in NPLUSONE_MODES:
        raise pytest.UsageError(
            f"ini {NPLUSONE_INI} = {value!r}: must be one of "
            f"{', '.join(NPLUSONE_MODES)} (N+1 queries are ignored, warned about, or fail "
            f"the test)."
        )
    return mode


def _distinct(url: Setting, databases: tuple[Database, ...]) -> tuple[Database, ...]:
    """Refuse two databases at one URL: engines are told apart by the database they name."""
    from pytest_alchemy.routing import database_key

    seen = {database_key(url.url): "default"} if url.url is not None else {}
    for database in databases:
        key = database_key(database.url)
        other = seen.get(key) if key is not None else None
        if other is not None:
            raise pytest.UsageError(
                f"{DATABASES_INI}: {database.name} ({mask(database.url)}) is the database of "
                f"{other} as well, and the plugin tells the application's engines apart by the "
                f"database their URL names. Give {database.name} a URL of its own in the test "
                f"settings (a replica's engine pointing at the primary is just the primary's "
                f"engine: leave it out of {DATABASES_INI})."
            )
        if key is not None:
            seen[key] = database.name
    return databases


def _one_path(config: pytest.Config, key: str) -> str | None:
    paths = validate_import_paths(key, [config.getini(key) or ""])
    return paths[0] if paths else None


def _alembic_ini(config: pytest.Config) -> str | None:
    value = (config.getini(ALEMBIC_INI) or "").strip()
    if not value:
        return None
    path = Path(value) if Path(value).is_absolute() else config.rootpath / value
    if not path.is_file():
        raise pytest.UsageError(
            f"{ALEMBIC_INI} = {value!r}: no such file ({path}). Give the path of alembic.ini, "
            f"absolute or relative to the rootdir {config.rootpath}."
        )
    return str(path)


def _flag(cli: bool | None, ini: bool) -> bool:
    return bool(ini) if cli is None else cli


def _seconds(key: str, value: str) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not seconds > 0:
        raise pytest.UsageError(f"{key} = {value!r}: give a number of seconds above 0, e.g. 10.")
    return seconds


def _name_part(key: str, value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    value = value.strip()
    if not _NAME_PART.match(value):
        raise pytest.UsageError(
            f"{key} = {value!r}: use only letters, digits and underscores, so the database "
            f"name needs no quoting on any backend."
        )
    return value


def mask(url: URL) -> str:
    """The URL as text with its password hidden."""
    return url.render_as_string(hide_password=True)


def describe(settings: Settings) -> list[str]:
    """Report-header lines: each URL, password masked, and where it came from."""
    url = settings.url
    shown = "sqlite:///<pytest tmp>/alchemy.sqlite3" if url.url is None else mask(url.url)
    lines = [f"alchemy: url={shown} (from {url.origin})"]
    if settings.async_url.url is not None:
        lines.append(
            f"alchemy: async url={mask(settings.async_url.url)} (from {settings.async_url.origin})"
        )
    if settings.metadata:
        lines.append(f"alchemy: metadata={', '.join(settings.metadata)}")
    if settings.engines:
        lines.append(f"alchemy: engines={', '.join(settings.engines)}")
    for database in settings.databases:
        what = f"replica of {database.replica_of}" if database.replica_of else "database"
        lines.append(f"alchemy: {what} {database.name}={mask(database.url)}")
    return lines
