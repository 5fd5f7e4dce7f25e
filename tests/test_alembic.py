"""alchemy_alembic: the schema comes from `alembic upgrade head`, sync or async env.py."""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

import pytest
from conftest import Driver, Project, flask_migrations, project_for
from sqlalchemy import create_engine, inspect

if TYPE_CHECKING:
    from pathlib import Path

DRIVERS = [
    Driver("sqlite-pysqlite", "sqlite", "sqlite+pysqlite", False),
    Driver("sqlite-aiosqlite", "sqlite", "sqlite+aiosqlite", True),
    Driver("postgresql-psycopg", "postgresql", "postgresql+psycopg", False),
    Driver("postgresql-asyncpg", "postgresql", "postgresql+asyncpg", True),
    Driver("mysql-pymysql", "mysql", "mysql+pymysql", False),
    Driver("mysql-asyncmy", "mysql", "mysql+asyncmy", True),
]
#: One driver per backend for the xdist run: which worker migrates and who clones is decided
#: in provisioning, the same for an async env.py (every driver migrates in
#: test_upgrade_head_builds_the_schema_once).
ONE_PER_BACKEND = pytest.mark.parametrize(
    "project", [d for d in DRIVERS if not d.is_async], ids=lambda d: d.id, indirect=True
)

ALEMBIC_INI = """
[alembic]
script_location = %(here)s/migrations
sqlalchemy.url = driver://set-by-the-plugin
"""

SYNC_ENV = """
from alembic import context
from sqlalchemy import engine_from_config, pool

config = context.config
engine = engine_from_config(
    config.get_section(config.config_ini_section), prefix="sqlalchemy.", poolclass=pool.NullPool
)
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
"""

ASYNC_ENV = """
import asyncio

from alembic import context
from sqlalchemy import pool
from sqlalchemy.ext.asyncio import async_engine_from_config

config = context.config


def migrate(connection):
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()


async def main():
    engine = async_engine_from_config(
        config.get_section(config.config_ini_section), prefix="sqlalchemy.",
        poolclass=pool.NullPool,
    )
    async with engine.connect() as connection:
        await connection.run_sync(migrate)
    await engine.dispose()


asyncio.run(main())
"""

FIRST = """
revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

import sqlalchemy as sa
from alembic import op


def upgrade():
    op.create_table(
        "alchemy_item",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(50), unique=True),
    )


def downgrade():
    op.drop_table("alchemy_item")
"""

# A revision that needs the database URL from the Alembic config, and counts its runs.
SECOND = """
revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

import os

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.engine import make_url


def upgrade():
    url = make_url(context.config.get_main_option("sqlalchemy.url"))
    database = os.path.basename(url.database)
    op.execute(sa.text(f"INSERT INTO alchemy_item (name) VALUES ('migrated in {{database}}')"))
    with open(os.path.join({root!r}, "migrations-run.txt"), "a") as runs:
        runs.write(database + "\\n")


def downgrade():
    pass
"""

TESTS = """
import pytest
from sqlalchemy import delete, inspect, select, text

SYNC = {sync}


def check(tables, names):
    assert {{"alembic_version", "alchemy_item"}} <= set(tables)
    assert len(names) == 1 and names[0].startswith("migrated in test_")


if SYNC:
    @pytest.mark.parametrize("n", range(4))
    def test_sees_the_migrated_schema(db_session, n):
        tables = inspect(db_session.connection()).get_table_names()
        check(tables, db_session.scalars(text("SELECT name FROM alchemy_item")).all())
        db_session.execute(text("DELETE FROM alchemy_item"))
        db_session.commit()
else:
    @pytest.mark.asyncio
    @pytest.mark.parametrize("n", range(4))
    async def test_sees_the_migrated_schema(async_db_session, n):
        conn = await async_db_session.connection()
        tables = await conn.run_sync(lambda c: inspect(c).get_table_names())
        names = (await async_db_session.scalars(text("SELECT name FROM alchemy_item"))).all()
        check(tables, names)
        await async_db_session.execute(text("DELETE FROM alchemy_item"))
        await async_db_session.commit()
"""


@pytest.fixture(params=DRIVERS, ids=lambda d: d.id)
def project(
    request: pytest.FixtureRequest, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> Project:
    driver: Driver = request.param
    project = project_for(driver, scratch_databases, pytester)
    project.ini("alchemy_alembic = alembic.ini\n", metadata=False)
    root = pytester.path
    (root / "alembic.ini").write_text(textwrap.dedent(ALEMBIC_INI))
    versions = root / "migrations" / "versions"
    versions.mkdir(parents=True)
    (root / "migrations" / "env.py").write_text(ASYNC_ENV if driver.is_async else SYNC_ENV)
    (versions / "0001_items.py").write_text(FIRST)
    (versions / "0002_row.py").write_text(SECOND.format(root=str(root)))
    project.tests(TESTS.format(sync=not driver.is_async))
    return project


def migration_runs(project: Project) -> list[str]:
    return (project.pytester.path / "migrations-run.txt").read_text().split()


def test_upgrade_head_builds_the_schema_once(project: Project) -> None:
    result = project.run()
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["alchemy: built the migrations of *alembic.ini (upgrade head)*"])
    assert len(migration_runs(project)) == 1
    assert project.leftover_tables() == []


@ONE_PER_BACKEND
def test_xdist_workers_clone_the_migrated_template(project: Project) -> None:
    result = project.pytester.runpytest_inprocess("-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(passed=4)
    (ran_on,) = migration_runs(project)
    assert "_template" in ran_on
    assert project.leftover_tables() == []


def test_a_new_revision_changes_the_fingerprint(project: Project) -> None:
    project.run("--alchemy-reuse").assert_outcomes(passed=4)
    project.run("--alchemy-reuse").assert_outcomes(passed=4)
    assert len(migration_runs(project)) == 1
    third = project.pytester.path / "migrations" / "versions" / "0003_noop.py"
    third.write_text(
        'revision = "0003"\ndown_revision = "0002"\nbranch_labels = None\ndepends_on = None\n'
        "def upgrade():\n    pass\n"
    )
    project.run("--alchemy-reuse").assert_outcomes(passed=4)
    assert len(migration_runs(project)) == 2
    project.run().assert_outcomes(passed=4)  # without reuse: replaced and dropped
    assert project.leftover_tables() == []


def test_alembic_and_metadata_together_is_a_usage_error(pytester: pytest.Pytester) -> None:
    project = Project(pytester, None)
    project.ini("alchemy_alembic = alembic.ini\n")
    (pytester.path / "alembic.ini").write_text(textwrap.dedent(ALEMBIC_INI))
    project.tests("def test_x(db_session):\n    pass\n")
    result = project.run()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*Both alchemy_metadata and alchemy_alembic are set*"])


def test_missing_alembic_ini_is_a_usage_error(pytester: pytest.Pytester) -> None:
    project = Project(pytester, None)
    project.ini("alchemy_alembic = nowhere/alembic.ini\n", metadata=False)
    project.tests("def test_x():\n    pass\n")
    result = project.run()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*alchemy_alembic = 'nowhere/alembic.ini': no such file*"])


# An env.py that reads the application's settings instead of the URL the plugin sets.
STUBBORN_ENV = """
from alembic import context
from sqlalchemy import create_engine

import settings

engine = create_engine(settings.DATABASE_URL)
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
"""


def test_an_env_py_that_ignores_the_url_stops_the_run_with_the_fix(
    pytester: pytest.Pytester,
) -> None:
    project = Project(pytester, f"sqlite:///{pytester.path}/app.sqlite3")
    project.ini("alchemy_alembic = alembic.ini\n", metadata=False)
    root = pytester.path
    dev = root / "dev.sqlite3"
    pytester.makepyfile(settings=f"DATABASE_URL = 'sqlite:///{dev}'")
    (root / "alembic.ini").write_text(textwrap.dedent(ALEMBIC_INI))
    (root / "migrations" / "versions").mkdir(parents=True)
    (root / "migrations" / "env.py").write_text(STUBBORN_ENV)
    (root / "migrations" / "versions" / "0001_items.py").write_text(FIRST)
    project.tests("def test_x(db_session):\n    pass\n")
    result = project.run()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ProvisioningError: alchemy_alembic = * `alembic upgrade head` raised "
            "UnsandboxedEngineError: While the plugin migrated the test database *, "
            f"sqlite:///{dev} connected to another database*env.py must migrate the URL the "
            "plugin sets*"
        ]
    )
    assert "built the migrations" not in result.stdout.str()
    # The database the settings name was refused before the migrations could change it.
    dev_engine = create_engine(f"sqlite:///{dev}")
    try:
        assert inspect(dev_engine).get_table_names() == []
    finally:
        dev_engine.dispose()


@pytest.mark.parametrize(
    "locations",
    [
        "version_locations = %(here)s/migrations/versions %(here)s/extra",
        "version_path_separator = os\n"
        "version_locations = %(here)s/migrations/versions:%(here)s/extra",
    ],
    ids=["spaces", "os-separator"],
)
def test_the_fingerprint_covers_alembic_version_locations(tmp_path: Path, locations: str) -> None:
    from pytest_alchemy.schema import fingerprint

    ini = tmp_path / "alembic.ini"
    ini.write_text(textwrap.dedent(ALEMBIC_INI) + locations + "\n")
    (tmp_path / "migrations" / "versions").mkdir(parents=True)
    (tmp_path / "migrations" / "env.py").write_text(SYNC_ENV)
    (tmp_path / "extra").mkdir()
    before = fingerprint([], None, str(ini))
    (tmp_path / "extra" / "0009_more.py").write_text("revision = '0009'\n")
    assert fingerprint([], None, str(ini)) != before


# -- Flask-Migrate: env.py needs the app context and migrates through the app's own engine ----

FLASK_APP = """
from flask import Flask
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import select

db = SQLAlchemy()
migrate = Migrate()


class Item(db.Model):
    __tablename__ = "alchemy_item"
    id = db.Column(db.Integer, primary_key=True)
    name = db.Column(db.String(50), unique=True)


def create_app():
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = APP_URL
    db.init_app(app)
    migrate.init_app(app, db)

    @app.post("/items/<name>")
    def create(name):
        db.session.add(Item(name=name))
        db.session.commit()
        return {"names": sorted(db.session.scalars(select(Item.name)))}

    return app
"""

# The usual Flask fixture: the app for the run, its context pushed while the run lasts.
FLASK_CONFTEST = """
import pytest

from app import create_app


@pytest.fixture(scope="session", autouse=True)
def app():
    app = create_app()
    with app.app_context():
        yield app
"""

FLASK_TESTS = """
import pytest
from sqlalchemy import text


@pytest.mark.parametrize("n", range(3))
def test_the_app_commits_into_the_migrated_schema(app, db_session, n):
    response = app.test_client().post(f"/items/test{n}")
    assert response.json == {"names": ["migrated", f"test{n}"]}
    assert db_session.scalars(text("SELECT name FROM alchemy_item ORDER BY name")).all() == [
        "migrated", f"test{n}"
    ]
"""

MIGRATED_ROW = FIRST.replace(
    '        sa.Column("name", sa.String(50), unique=True),\n    )\n',
    '        sa.Column("name", sa.String(50), unique=True),\n    )\n'
    "    op.execute(\"INSERT INTO alchemy_item (name) VALUES ('migrated')\")\n",
)


def _flask_migrate_project(project: Project, conftest: str = FLASK_CONFTEST) -> Path:
    """A Flask app whose migrations folder is Flask-Migrate's own template, as ``flask db
    init`` writes it (alembic.ini without script_location; env.py reads current_app)."""
    pytester = project.pytester
    pytester.makepyfile(app=FLASK_APP.replace("APP_URL", repr(project.url)))
    pytester.makeconftest(conftest)
    migrations = flask_migrations(pytester.path)
    (migrations / "versions" / "0001_items.py").write_text(MIGRATED_ROW)
    # Run from another folder than the ini's, as a suite run from the repository root is.
    project.ini(
        "alchemy_alembic = migrations/alembic.ini\nalchemy_engines = app:db\n", metadata=False
    )
    # Flask-Migrate 4.1's env.py tries Flask-SQLAlchemy's deprecated get_engine() first.
    ini = pytester.path / "pytest.ini"
    ini.write_text(
        ini.read_text().replace(
            "filterwarnings = error",
            "filterwarnings =\n    error\n    ignore:'get_engine' is deprecated:DeprecationWarning",
        )
    )
    project.tests(FLASK_TESTS)
    return migrations


FLASK_DRIVERS = [d for d in DRIVERS if not d.is_async]


@pytest.mark.parametrize("driver", FLASK_DRIVERS, ids=lambda d: d.id)
def test_flask_migrate_builds_the_test_database_through_the_apps_engine(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = project_for(driver, scratch_databases, pytester)
    _flask_migrate_project(project)
    # env.py's fileConfig() reconfigures logging: a process of its own.
    result = project.run(subprocess=True)
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["alchemy: built the migrations of *alembic.ini (upgrade head)*"])
    assert project.leftover_tables() == []
    assert project.base_tables() == []  # the app's own database was never migrated


def test_flask_migrate_works_under_xdist(
    scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = project_for(FLASK_DRIVERS[0], scratch_databases, pytester)
    _flask_migrate_project(project)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(passed=3)
    assert project.leftover_tables() == []


@pytest.mark.parametrize("driver", FLASK_DRIVERS, ids=lambda d: d.id)
def test_flask_migrate_without_alchemy_engines_never_migrates_the_apps_database(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = project_for(driver, scratch_databases, pytester)
    _flask_migrate_project(project)
    ini = pytester.path / "pytest.ini"
    ini.write_text(ini.read_text().replace("alchemy_engines = app:db", ""))
    result = project.run(subprocess=True)
    result.assert_outcomes(errors=3)
    result.stdout.fnmatch_lines(
        [
            "*UnsandboxedEngineError: While the plugin migrated the test database *add "
            "`alchemy_engines = myapp:db`*"
        ]
    )
    assert project.base_tables() == []  # the app's own database: untouched
    assert project.leftover_tables() == []


def test_flask_migrate_without_an_app_context_says_how_to_provide_one(
    pytester: pytest.Pytester,
) -> None:
    project = Project(pytester, f"sqlite:///{pytester.path}/app.sqlite3")
    _flask_migrate_project(
        project, conftest=FLASK_CONFTEST.replace("with app.app_context():", "if True:")
    )
    result = project.run(subprocess=True)
    result.assert_outcomes(errors=3)
    result.stdout.fnmatch_lines(
        [
            "*ProvisioningError: alchemy_alembic = * `alembic upgrade head` raised RuntimeError: "
            "Working outside of application context.*session-scoped*app_context()*"
        ]
    )
