"""alchemy_alembic: the schema comes from `alembic upgrade head`, sync or async env.py."""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

import pytest
from conftest import Driver, Project, project_for

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


def test_xdist_workers_clone_the_migrated_template(project: Project) -> None:
    result = project.pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2")
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
            "*ProvisioningError: alchemy_alembic = * `alembic upgrade head` ran, but the test "
            "database * is still empty*env.py must connect to the URL the plugin sets*"
        ]
    )
    assert "built the migrations" not in result.stdout.str()


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
