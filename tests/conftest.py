"""Shared helpers: the backend x driver matrix and a pytester wrapper that writes a project.

Server backends run on scratch databases this suite creates for itself (one per xdist
worker), so the plugin's tables never meet anything else. Outside CI a backend whose server
does not answer is skipped with the reason; in CI (``CI`` set) it fails.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.pool import NullPool

if TYPE_CHECKING:
    from collections.abc import Iterator

# pytester's in-process runs drop the modules first imported inside them; importing a driver's
# C extension a second time crashed asyncpg (a segfault in its SSL negotiation), and importing
# sqlalchemy.orm a second time fails ("Type <class 'object'> is already registered"). Loading
# them here keeps them loaded across runs; the web frameworks only to save re-importing them
# (not sqlmodel: its one global MetaData must start empty in each run). Hypothesis's pytest
# plugin imports hypothesis at the end of every run (its statistics): 77 modules, each
# rewritten by pytest's assertion rewriting, which cost about 0.8 s per in-process run.
for _driver in (
    "sqlalchemy.orm",
    "sqlalchemy.ext.asyncio",
    # A dialect package imported a second time registers its SQL functions again (SAWarning).
    "sqlalchemy.dialects.postgresql",
    "sqlalchemy.dialects.mysql",
    "sqlalchemy.dialects.sqlite",
    "alembic.command",
    "alembic.script",
    "fastapi",
    "flask",
    "flask_sqlalchemy",
    "httpx",
    "ssl",
    "asyncpg",
    "psycopg",
    "psycopg2",
    "pymysql",
    "asyncmy",
    "aiomysql",
    "aiosqlite",
    "hypothesis",
    "hypothesis.statistics",  # what its plugin imports: see above
):
    importlib.import_module(_driver)

PG_SERVER = os.environ.get("ALCHEMY_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MY_SERVER = os.environ.get("ALCHEMY_TEST_MYSQL", "mysql+pymysql://root@127.0.0.1:3306/test")


@dataclass(frozen=True)
class Driver:
    """One row of the matrix: how the inner project's URL is written."""

    id: str
    backend: str  # sqlite, postgresql, mysql
    drivername: str  # as in a SQLAlchemy URL
    is_async: bool
    memory: bool = False

    def url(self, databases: dict[str, str], tmp: str) -> str:
        if self.backend == "sqlite":
            if self.memory:
                return f"{self.drivername}://"
            return f"{self.drivername}:///{tmp}/test.sqlite3"
        server = make_url(databases[self.backend])
        return server.set(drivername=self.drivername).render_as_string(hide_password=False)


SYNC_DRIVERS = [
    Driver("sqlite-pysqlite", "sqlite", "sqlite+pysqlite", False),
    Driver("sqlite-memory", "sqlite", "sqlite+pysqlite", False, memory=True),
    Driver("postgresql-psycopg", "postgresql", "postgresql+psycopg", False),
    Driver("postgresql-psycopg2", "postgresql", "postgresql+psycopg2", False),
    Driver("mysql-pymysql", "mysql", "mysql+pymysql", False),
]
ASYNC_DRIVERS = [
    Driver("sqlite-aiosqlite", "sqlite", "sqlite+aiosqlite", True),
    Driver("sqlite-aiosqlite-memory", "sqlite", "sqlite+aiosqlite", True, memory=True),
    Driver("postgresql-asyncpg", "postgresql", "postgresql+asyncpg", True),
    Driver("postgresql-psycopg_async", "postgresql", "postgresql+psycopg_async", True),
    Driver("mysql-asyncmy", "mysql", "mysql+asyncmy", True),
    Driver("mysql-aiomysql", "mysql", "mysql+aiomysql", True),
]


def subset(drivers: list[Driver], *ids: str) -> list[Driver]:
    """The drivers of the matrix named ``ids``."""
    return [driver for driver in drivers if driver.id in ids]


#: One driver per backend, for scenarios whose point is not the driver.
SYNC_BACKENDS = subset(SYNC_DRIVERS, "sqlite-pysqlite", "postgresql-psycopg", "mysql-pymysql")
ASYNC_BACKENDS = subset(ASYNC_DRIVERS, "sqlite-aiosqlite", "postgresql-asyncpg", "mysql-asyncmy")

_SCRATCH = "alchemy_selftest_"


def _scratch_name() -> str:
    # The process id keeps concurrent runs of this suite (and xdist workers) apart.
    return f"{_SCRATCH}{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unavailable(backend: str, exc: Exception) -> None:
    message = f"{backend} server not reachable ({type(exc).__name__}: {str(exc).splitlines()[0]})"
    if os.environ.get("CI"):
        pytest.fail(message + "; CI must test every backend", pytrace=False)
    pytest.skip(message)


#: Plugins of this environment that the runs a test starts do without, unless it is marked
#: ``@pytest.mark.inner_plugins(name, ...)``: each costs every pytest process it loads into,
#: in-process or not (xdist workers too), time for nothing. Faker's (installed with
#: polyfactory) imports faker at start-up, about 0.4 s; pytest-factoryboy's imports
#: factory_boy and faker, and adds an autouse fixture (seen in --setup-show); Hypothesis's
#: imports hypothesis when the run ends, about 0.6 s.
LEAN = ("faker", "pytest-factoryboy", "hypothesispytest")


@pytest.fixture(autouse=True)
def _lean_inner_runs(request: pytest.FixtureRequest) -> None:
    """Turn the LEAN plugins off in the pytest runs of a pytester test (through
    PYTEST_ADDOPTS, which pytester clears when it is set up, so after it)."""
    if "pytester" not in request.fixturenames:
        return
    request.getfixturevalue("pytester")
    marker = request.node.get_closest_marker("inner_plugins")
    wanted = set(marker.args) if marker is not None else set()
    off = [f"-p no:{name}" for name in LEAN if name not in wanted]
    request.getfixturevalue("monkeypatch").setenv("PYTEST_ADDOPTS", " ".join(off))


@pytest.fixture(scope="session")
def scratch_databases() -> Iterator[dict[str, str]]:
    """A scratch database per server backend, created for this test run and dropped after.

    Values are URLs (sync driver) of the scratch databases; a backend whose server is down
    maps to an error string that ``databases`` turns into a skip (or a CI failure).
    """
    name = _scratch_name()
    made: dict[str, str] = {}
    engines = {}
    for backend, server in (("postgresql", PG_SERVER), ("mysql", MY_SERVER)):
        engine = create_engine(server, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                _drop_ours(conn, name)
                conn.execute(text(f"CREATE DATABASE {name}"))
        except Exception as exc:
            made[backend] = f"!{type(exc).__name__}: {str(exc).splitlines()[0]}"
            engine.dispose()
            continue
        engines[backend] = engine
        made[backend] = make_url(server).set(database=name).render_as_string(hide_password=False)
    yield made
    for engine in engines.values():
        with engine.connect() as conn:
            _drop_ours(conn, name)
        engine.dispose()


def _drop_ours(conn: Connection, name: str) -> None:
    """Drop the scratch database, the databases tests derived from its name, and those of
    earlier runs of this suite whose process is gone."""
    if conn.dialect.name == "postgresql":
        query, force = "SELECT datname FROM pg_database", " WITH (FORCE)"
    else:
        query, force = "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA", ""
    for (found,) in conn.execute(text(query)).all():
        digits = found.partition(_SCRATCH)[2].split("_")[0]
        stale = digits.isdigit() and not _alive(int(digits))
        if name in found or stale:
            conn.execute(text(f"DROP DATABASE IF EXISTS {found}{force}"))


MODELS = """
from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "alchemy_item"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50), unique=True)


class Tag(Base):
    __tablename__ = "alchemy_tag"
    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("alchemy_item.id"))
"""


#: Said, in a run's output or at its interpreter's exit, when loops are mishandled.
LOOP_TROUBLE = (
    "Exception ignored",
    "Event loop is closed",
    "Task was destroyed",
    "was never awaited",
    "attached to a different loop",
)


class Project:
    """A small application project run through the plugin with pytester."""

    def __init__(self, pytester: pytest.Pytester, url: str | None) -> None:
        self.pytester = pytester
        self.url = url
        pytester.makepyfile(models=MODELS)

    def ini(self, extra: str = "", *, metadata: bool = True, loop_scopes: str = "session") -> None:
        lines = ["[pytest]", "pythonpath = .", "filterwarnings = error"]
        if metadata:
            lines.append("alchemy_metadata = models:Base")
        if self.url:
            lines.append(f"alchemy_url = {self.url}")
        if loop_scopes:
            lines.append(f"asyncio_default_fixture_loop_scope = {loop_scopes}")
            lines.append(f"asyncio_default_test_loop_scope = {loop_scopes}")
        self.pytester.makefile(".ini", pytest="\n".join(lines) + "\n" + textwrap.dedent(extra))

    def tests(self, source: str, name: str = "test_app") -> None:
        self.pytester.makepyfile(**{name: textwrap.dedent(source)})

    def into_folder(self, name: str) -> None:
        """Move what was written for the project so far into a folder of its own (the
        models are copied: the next one starts with them), for :func:`run_in_one_process`."""
        folder = self.pytester.path / name
        folder.mkdir()
        for path in list(self.pytester.path.iterdir()):
            if path.is_file() and path.suffix in (".py", ".ini"):
                if path.name == "models.py":
                    shutil.copy2(path, folder / path.name)
                else:
                    path.rename(folder / path.name)

    def run(self, *args: str, subprocess: bool = False) -> pytest.RunResult:
        base = ("-p", "no:cacheprovider", "-p", "no:randomly", "-p", "no:xdist")
        if subprocess:
            return self.pytester.runpytest_subprocess(*base, *args, timeout=300)
        return self.pytester.runpytest_inprocess(*base, *args)

    def sync_url(self) -> URL | None:
        """The configured URL with a sync driver, for looking at the database from outside."""
        if not self.url or make_url(self.url).database in (None, "", ":memory:"):
            return None
        url = make_url(self.url)
        sync = {"asyncpg": "psycopg", "psycopg_async": "psycopg", "aiosqlite": "pysqlite"}.get(
            url.get_driver_name(), "pymysql" if url.get_backend_name() == "mysql" else None
        )
        return url.set(drivername=f"{url.get_backend_name()}+{sync}") if sync else url

    def base_tables(self) -> list[str]:
        """Every table in the database the project's URL names (the application's own)."""
        engine = create_engine(self.sync_url() or "")
        try:
            return sorted(inspect(engine).get_table_names())
        finally:
            engine.dispose()

    def leftover_tables(self) -> list[str]:
        """What the run left behind: the models' tables, or the test database itself."""
        url = self.sync_url()
        if url is None:
            return []
        if database_exists(url, derived_name(url)):
            return [f"database {derived_name(url)}"]
        engine = create_engine(url)
        try:
            names = set(inspect(engine).get_table_names())
        finally:
            engine.dispose()
        return sorted(names & {"alchemy_item", "alchemy_tag"})


def derived_name(url: URL, name: str = "") -> str:
    """The test database the plugin derives from ``url`` (a file path for SQLite)."""
    database = url.database or ""
    if url.get_backend_name() == "sqlite":
        path = Path(database)
        return str(path.with_name(f"{name or 'test_' + path.stem}{path.suffix}"))
    return name or f"test_{database}"


def admin(url: URL) -> Engine:
    """An AUTOCOMMIT engine on the server of ``url`` (not on its database)."""
    if url.get_backend_name() == "postgresql":
        server = url.set(database="postgres")
    else:
        server = url._replace(database=None)
    return create_engine(server, isolation_level="AUTOCOMMIT", poolclass=NullPool)


def database_exists(url: URL, name: str) -> bool:
    if url.get_backend_name() == "sqlite":
        return Path(name).exists()
    engine = admin(url)
    query = (
        "SELECT 1 FROM pg_database WHERE datname = :n"
        if url.get_backend_name() == "postgresql"
        else "SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = :n"
    )
    try:
        with engine.connect() as conn:
            return conn.execute(text(query), {"n": name}).first() is not None
    finally:
        engine.dispose()


def run_in_one_process(
    pytester: pytest.Pytester, runs: dict[str, list[str]]
) -> tuple[dict[str, pytest.RunResult], str]:
    """Run pytest with ``runs[name]`` in each folder ``name`` (see Project.into_folder), all
    in one interpreter started for them (see one_process.py): each run's result, and what the
    interpreter printed outside the runs (at its exit)."""
    script = Path(__file__).with_name("one_process.py")
    done = subprocess.run(
        [sys.executable, str(script), json.dumps(runs)],
        cwd=pytester.path,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    results = {}
    for name in runs:
        code = (pytester.path / f"{name}.code").read_text() if done.returncode == 0 else ""
        if not code:
            pytest.fail(f"the runs stopped at {name}:\n{done.stdout}\n{done.stderr}")
        output = (pytester.path / f"{name}.out").read_text().splitlines()
        results[name] = pytest.RunResult(int(code), output, [], 0.0)
    return results, done.stdout + done.stderr


def collected_ids(project: Project) -> list[str]:
    """The node ids of the project's tests, in collection order."""
    collected = project.run("--collect-only", "-q")
    return [line for line in collected.outlines if line.startswith("test_app.py::")]


def project_for(driver: Driver, scratch: dict[str, str], pytester: pytest.Pytester) -> Project:
    """A project whose alchemy_url points at ``driver`` (skips or fails if its server is down)."""
    if driver.backend != "sqlite" and scratch[driver.backend].startswith("!"):
        _unavailable(driver.backend, RuntimeError(scratch[driver.backend][1:]))
    return Project(pytester, driver.url(scratch, str(pytester.path)))


@pytest.fixture(params=SYNC_DRIVERS, ids=lambda d: d.id)
def sync_project(
    request: pytest.FixtureRequest, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> Project:
    """A project on each sync driver of the matrix."""
    return project_for(request.param, scratch_databases, pytester)


@pytest.fixture(params=ASYNC_DRIVERS, ids=lambda d: d.id)
def async_project(
    request: pytest.FixtureRequest, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> Project:
    """A project on each async driver of the matrix."""
    return project_for(request.param, scratch_databases, pytester)


def flask_migrations(folder: Path) -> Path:
    """Flask-Migrate's migrations folder in ``folder``, as ``flask db init`` writes it
    (alembic.ini without script_location; env.py reads current_app), with no revision yet."""
    import shutil

    import flask_migrate

    template = Path(flask_migrate.__file__).parent / "templates" / "flask"
    migrations = folder / "migrations"
    (migrations / "versions").mkdir(parents=True)
    shutil.copy(template / "alembic.ini.mako", migrations / "alembic.ini")
    shutil.copy(template / "env.py", migrations / "env.py")
    shutil.copy(template / "script.py.mako", migrations / "script.py.mako")
    return migrations
