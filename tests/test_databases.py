"""Test databases: created per run (and per xdist worker), marked, dropped, never trespassing."""

from __future__ import annotations

import pytest
from conftest import (
    Driver,
    Project,
    admin,
    database_exists,
    derived_name,
    project_for,
)
from sqlalchemy import create_engine, inspect, text

DRIVERS = [
    Driver("sqlite-pysqlite", "sqlite", "sqlite+pysqlite", False),
    Driver("postgresql-psycopg", "postgresql", "postgresql+psycopg", False),
    Driver("postgresql-asyncpg", "postgresql", "postgresql+asyncpg", True),
    Driver("mysql-pymysql", "mysql", "mysql+pymysql", False),
    Driver("mysql-asyncmy", "mysql", "mysql+asyncmy", True),
]

# Each test records the database it ran on, from inside the run (xdist hides print output).
RECORDING = """
import os
import pytest
from sqlalchemy import inspect

SYNC = {sync}


def record(url, tables):
    with open(os.path.join({root!r}, "seen.txt"), "a") as seen:
        seen.write(f"{{os.path.basename(url.database)}} {{' '.join(sorted(tables))}}\\n")


if SYNC:
    @pytest.mark.parametrize("n", range(4))
    def test_records_its_database(db_session, n):
        record(db_session.bind.engine.url, inspect(db_session.connection()).get_table_names())
else:
    @pytest.mark.asyncio
    @pytest.mark.parametrize("n", range(4))
    async def test_records_its_database(async_db_session, n):
        conn = await async_db_session.connection()
        tables = await conn.run_sync(lambda c: inspect(c).get_table_names())
        record(conn.engine.url, tables)
"""


@pytest.fixture(params=DRIVERS, ids=lambda d: d.id)
def project(
    request: pytest.FixtureRequest, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> Project:
    project = project_for(request.param, scratch_databases, pytester)
    project.ini()
    project.tests(RECORDING.format(sync=not request.param.is_async, root=str(pytester.path)))
    return project


def seen(project: Project) -> set[tuple[str, str]]:
    lines = (project.pytester.path / "seen.txt").read_text().splitlines()
    return {tuple(line.split(" ", 1)) for line in lines}  # type: ignore[misc]


def base_name(project: Project) -> str:
    url = project.sync_url()
    assert url is not None
    return derived_name(url, "").rsplit("/", 1)[-1]


def test_a_test_database_is_created_marked_and_dropped(project: Project) -> None:
    project.run().assert_outcomes(passed=4)
    name = base_name(project)
    tables = "alchemy_item alchemy_tag pytest_alchemy_marker"
    assert seen(project) == {(name, tables)}
    assert project.leftover_tables() == []


def test_each_xdist_worker_gets_its_own_database(project: Project) -> None:
    result = project.pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(passed=4)
    stem, dot, ext = base_name(project).partition(".")
    names = {name for name, _ in seen(project)}
    assert names == {f"{stem}_gw0{dot}{ext}", f"{stem}_gw1{dot}{ext}"}
    url = project.sync_url()
    assert url is not None
    for name in names:
        path = name if url.get_backend_name() != "sqlite" else str(project.pytester.path / name)
        assert not database_exists(url, path)


def test_suffix_and_name_settings(project: Project) -> None:
    url = project.sync_url()
    assert url is not None
    project.run("--alchemy-database-suffix", "shard1").assert_outcomes(passed=4)
    stem = base_name(project).partition(".")[0]
    custom = f"custom_{stem}"
    project.run("-o", f"alchemy_test_database={custom}").assert_outcomes(passed=4)
    names = {name.partition(".")[0] for name, _ in seen(project)}
    assert names == {f"{stem}_shard1", custom}
    assert project.leftover_tables() == []


def _create_foreign(url_text: str, name: str, *, marker: bool, table: bool) -> None:
    """Make a database the plugin will find under its test database's name."""
    from sqlalchemy.engine import make_url

    url = make_url(url_text)
    if url.get_backend_name() != "sqlite":
        engine = admin(url)
        with engine.connect() as conn:
            conn.execute(text(f"CREATE DATABASE {name}"))
        engine.dispose()
        url = url.set(database=name)
    else:
        url = url.set(database=name)
    engine = create_engine(url)
    with engine.begin() as conn:
        if table:
            conn.execute(text("CREATE TABLE precious (id INTEGER PRIMARY KEY)"))
            conn.execute(text("INSERT INTO precious VALUES (42)"))
        if marker:
            conn.execute(text("CREATE TABLE pytest_alchemy_marker (run_id VARCHAR(32))"))
    engine.dispose()


def _drop_foreign(url_text: str, name: str) -> None:
    from pathlib import Path

    from sqlalchemy.engine import make_url

    url = make_url(url_text)
    if url.get_backend_name() == "sqlite":
        Path(name).unlink(missing_ok=True)
        return
    engine = admin(url)
    with engine.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
    engine.dispose()


def _foreign_name(project: Project) -> tuple[str, str]:
    url = project.sync_url()
    assert url is not None
    return url.render_as_string(hide_password=False), derived_name(url, "")


def test_a_database_without_the_marker_that_holds_tables_is_refused(project: Project) -> None:
    url, name = _foreign_name(project)
    _create_foreign(url, name, marker=False, table=True)
    try:
        result = project.run()
        result.assert_outcomes(errors=4)
        result.stdout.fnmatch_lines(
            ["*ProvisioningError: The test database * already exists and holds tables (precious)*"]
        )
        from sqlalchemy.engine import make_url

        engine = create_engine(make_url(url).set(database=name))
        with engine.connect() as conn:
            assert conn.execute(text("SELECT id FROM precious")).scalars().all() == [42]
        engine.dispose()
    finally:
        _drop_foreign(url, name)


def test_a_leftover_of_an_earlier_run_is_replaced(project: Project) -> None:
    url, name = _foreign_name(project)
    _create_foreign(url, name, marker=True, table=True)
    try:
        project.run().assert_outcomes(passed=4)
        assert all("precious" not in tables for _, tables in seen(project))
        assert project.leftover_tables() == []
    finally:
        _drop_foreign(url, name)


def test_an_empty_database_is_adopted_and_left_in_place(project: Project) -> None:
    url, name = _foreign_name(project)
    _create_foreign(url, name, marker=False, table=False)
    try:
        project.run().assert_outcomes(passed=4)
        assert database_exists(project.sync_url(), name)  # type: ignore[arg-type]
        from sqlalchemy.engine import make_url

        engine = create_engine(make_url(url).set(database=name))
        assert inspect(engine).get_table_names() == []  # our tables and marker are gone
        engine.dispose()
    finally:
        _drop_foreign(url, name)


def test_a_bad_suffix_is_a_usage_error(pytester: pytest.Pytester) -> None:
    project = Project(pytester, None)
    project.ini(metadata=False)
    project.tests("def test_x():\n    pass\n")
    result = project.run("--alchemy-database-suffix", "a-b")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--alchemy-database-suffix = 'a-b': use only letters*"])
