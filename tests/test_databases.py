"""Test databases: created per run (and per xdist worker), marked, dropped, never trespassing."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import pytest
from conftest import (
    MODELS,
    Driver,
    Project,
    admin,
    database_exists,
    derived_name,
    project_for,
)
from sqlalchemy import create_engine, inspect, text

if TYPE_CHECKING:
    from pathlib import Path

DRIVERS = [
    Driver("sqlite-pysqlite", "sqlite", "sqlite+pysqlite", False),
    Driver("postgresql-psycopg", "postgresql", "postgresql+psycopg", False),
    Driver("postgresql-asyncpg", "postgresql", "postgresql+asyncpg", True),
    Driver("mysql-pymysql", "mysql", "mysql+pymysql", False),
    Driver("mysql-asyncmy", "mysql", "mysql+asyncmy", True),
]
#: One driver per backend, for the slowest scenarios (pytest runs under xdist, runs after
#: runs): what they check happens in provisioning, which serves async URLs through their sync
#: twin; async tests on each async driver use what it provisions in the scenarios above.
ONE_PER_BACKEND = pytest.mark.parametrize(
    "project", [d for d in DRIVERS if not d.is_async], ids=lambda d: d.id, indirect=True
)

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


@ONE_PER_BACKEND
def test_each_xdist_worker_gets_its_own_database(project: Project) -> None:
    result = project.pytester.runpytest_inprocess("-p", "no:cacheprovider", "-n", "2")
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


def _dead_pid() -> int:
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(finished.stdout)


def _create_foreign(
    url_text: str,
    name: str,
    *,
    marker: bool,
    table: bool,
    pid: int | None = None,
    legacy: bool = False,
    **holder: Any,
) -> None:
    """Make a database the plugin will find under its test database's name.

    With ``marker``, it is marked as held by a run of ``pid`` (by default one that is gone) on
    this host; ``holder`` overrides marker columns (host, heartbeat, adopted, ...). ``legacy``
    writes the marker of older releases, which did not say who holds the database.
    """
    from sqlalchemy.engine import make_url

    from pytest_alchemy import databases, ownership

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
        if marker and legacy:
            conn.execute(
                text(
                    "CREATE TABLE pytest_alchemy_marker "
                    "(run_id VARCHAR(32), host VARCHAR(255), pid INTEGER)"
                )
            )
        elif marker:
            databases._marker.create(conn)
            values = ownership.Owner("earlier", pid or _dead_pid()).marker_values()
            values.update(started=None, **holder)
            conn.execute(databases._marker.insert().values(**values))
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
            [
                "*ProvisioningError: The test database * already exists and holds objects "
                "(table *precious)*"
            ]
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


SEED = """
import os


def seed(connection):
    from sqlalchemy import insert

    from models import Item

    connection.execute(insert(Item).values(name="seeded"))
    with open(os.path.join({root!r}, "seed-calls.txt"), "a") as calls:
        calls.write(str(os.getpid()) + "\\n")
"""

SEEDED_TESTS = """
import pytest
from sqlalchemy import delete, select

from models import Item

SYNC = {sync}

if SYNC:
    @pytest.mark.parametrize("n", range(4))
    def test_sees_the_seed_and_may_destroy_it(db_session, n):
        assert db_session.scalars(select(Item.name)).all() == ["seeded"]
        db_session.execute(delete(Item))
        db_session.commit()
else:
    @pytest.mark.asyncio
    @pytest.mark.parametrize("n", range(4))
    async def test_sees_the_seed_and_may_destroy_it(async_db_session, n):
        assert (await async_db_session.scalars(select(Item.name))).all() == ["seeded"]
        await async_db_session.execute(delete(Item))
        await async_db_session.commit()
"""


@pytest.fixture
def seeded_project(project: Project) -> Project:
    root = str(project.pytester.path)
    project.pytester.makepyfile(seeding=SEED.format(root=root))
    project.ini("alchemy_seed = seeding:seed\n")
    url = project.sync_url()
    assert url is not None
    is_async = any(d in (project.url or "") for d in ("asyncpg", "asyncmy"))
    project.tests(SEEDED_TESTS.format(sync=not is_async))
    return project


def seed_calls(project: Project) -> int:
    return len((project.pytester.path / "seed-calls.txt").read_text().splitlines())


def template_left(project: Project) -> bool:
    url = project.sync_url()
    assert url is not None
    stem, dot, ext = derived_name(url, "").partition(".")
    return database_exists(url, f"{stem}_template{dot}{ext}")


def test_the_seed_is_built_once_and_every_test_sees_it(seeded_project: Project) -> None:
    result = seeded_project.run()
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(
        ["alchemy: built the schema of models:Base and the rows of seeding:seed (2 tables) *s"]
    )
    assert seed_calls(seeded_project) == 1
    # In one process the test database itself is built: no template to clone it from (one
    # CREATE DATABASE, not two).
    assert "_template" not in result.stdout.str()
    assert seeded_project.leftover_tables() == []
    assert not template_left(seeded_project)


@ONE_PER_BACKEND
def test_xdist_workers_clone_one_template_built_once(seeded_project: Project) -> None:
    """One worker builds the template, saying so before and after (on standard error, which
    is the terminal's under xdist); the other clones it."""
    result = seeded_project.pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(passed=4)
    result.stderr.fnmatch_lines(
        [
            "alchemy [[]gw?[]]: building the schema of models:Base and the rows of seeding:seed"
            " (2 tables) into *_template* ...",
            "alchemy [[]gw?[]]: built the schema of models:Base * into *_template* in *s",
        ]
    )
    assert result.stderr.str().count("building the schema") == 1
    assert seed_calls(seeded_project) == 1  # by one worker; the other cloned its template
    assert seeded_project.leftover_tables() == []
    assert not template_left(seeded_project)


def test_a_bad_seed_path_names_the_key(pytester: pytest.Pytester) -> None:
    project = Project(pytester, None)
    project.ini("alchemy_seed = models:nothing\n")
    project.tests("def test_x(db_session):\n    pass\n")
    result = project.run()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*alchemy_seed = 'models:nothing': module 'models' has no*"])


def test_fingerprint_follows_the_schema_and_the_seed() -> None:
    from sqlalchemy import Column, Integer, MetaData, String, Table

    from pytest_alchemy.schema import fingerprint

    def metadata(width: int) -> MetaData:
        md = MetaData()
        Table("t", md, Column("id", Integer, primary_key=True), Column("name", String(width)))
        return md

    assert fingerprint([metadata(10)], None) == fingerprint([metadata(10)], None)
    assert fingerprint([metadata(10)], None) != fingerprint([metadata(20)], None)
    assert fingerprint([metadata(10)], None) != fingerprint([metadata(10)], seed_stand_in)


def seed_stand_in(connection: object) -> None:
    """Stands in for a seed function in the fingerprint test above."""


@ONE_PER_BACKEND
def test_reuse_skips_the_build_until_the_schema_changes(seeded_project: Project) -> None:
    project = seeded_project
    project.run("--alchemy-reuse").assert_outcomes(passed=4)
    assert seed_calls(project) == 1
    again = project.run("--alchemy-reuse")
    again.assert_outcomes(passed=4)
    again.stdout.fnmatch_lines(["alchemy: reusing * (schema unchanged)"])
    assert seed_calls(project) == 1

    workers = ("-p", "no:cacheprovider", "-n", "2", "--alchemy-reuse")
    project.pytester.runpytest_inprocess(*workers).assert_outcomes(passed=4)
    assert seed_calls(project) == 1  # the kept template was cloned, not rebuilt

    project.pytester.makepyfile(models=MODELS.replace("String(50)", "String(60)"))
    project.run("--alchemy-reuse").assert_outcomes(passed=4)
    assert seed_calls(project) == 2  # the schema changed: rebuilt
    project.run("--alchemy-reuse", "--alchemy-recreate").assert_outcomes(passed=4)
    assert seed_calls(project) == 3

    # Without reuse, what was kept is replaced and dropped at the end.
    project.run().assert_outcomes(passed=4)
    project.pytester.runpytest_inprocess("-p", "no:cacheprovider", "-n", "2").assert_outcomes(
        passed=4
    )
    assert project.leftover_tables() == []
    assert not template_left(project)


def test_databases_left_by_dead_runs_are_swept_and_nothing_else(project: Project) -> None:
    url, name = _foreign_name(project)
    stem, dot, ext = name.partition(".")
    dead_pid = _dead_pid()
    dead, alive, foreign = (f"{stem}_{part}{dot}{ext}" for part in ("gw7", "gw8", "gw9"))
    _create_foreign(url, dead, marker=True, table=True, pid=dead_pid)
    _create_foreign(url, alive, marker=True, table=True, pid=os.getpid())
    _create_foreign(url, foreign, marker=False, table=True)
    sync_url = project.sync_url()
    assert sync_url is not None
    try:
        result = project.run()
        result.assert_outcomes(passed=4)
        result.stdout.fnmatch_lines(["alchemy: dropped *_gw7*, left by a run that is gone"])
        assert not database_exists(sync_url, dead)
        assert database_exists(sync_url, alive)  # its process is still running
        assert database_exists(sync_url, foreign)  # no marker: never ours
    finally:
        for name in (dead, alive, foreign):
            _drop_foreign(url, name)


def test_a_test_database_named_like_the_base_one_is_refused(pytester: pytest.Pytester) -> None:
    project = Project(pytester, "postgresql+psycopg://postgres@127.0.0.1:1/app")
    project.ini("alchemy_test_database = app\n")
    project.tests("def test_x(db_session):\n    pass\n")
    result = project.run()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*alchemy_test_database = 'app' is the database named in*"])


@pytest.mark.parametrize("driver", ["sqlite+pysqlite", "sqlite+aiosqlite"])
def test_looking_at_a_vanished_sqlite_file_does_not_create_it(tmp_path: Path, driver: str) -> None:
    # Another xdist worker may drop its file between our listing and our look (a real race:
    # the look used to create an empty file that nobody removed).
    from sqlalchemy.engine import make_url

    from pytest_alchemy import databases

    gone = tmp_path / "test_app_gw1.sqlite3"
    with pytest.raises(Exception, match="unable to open database file"):
        databases._objects(make_url(f"{driver}:///{gone}"))
    assert not gone.exists()


OBJECTS_SEED = """
def seed(connection):
    connection.exec_driver_sql("INSERT INTO alchemy_item (name) VALUES ('seeded')")
    connection.exec_driver_sql(
        "CREATE VIEW item_names AS SELECT name FROM alchemy_item"
    )
    connection.exec_driver_sql(
        "CREATE VIEW item_count AS SELECT COUNT(*) AS n FROM item_names"
    )
    connection.exec_driver_sql(
        "CREATE TRIGGER item_upper BEFORE INSERT ON alchemy_item FOR EACH ROW "
        "SET NEW.name = UPPER(NEW.name)"
    )
    connection.exec_driver_sql(
        "CREATE FUNCTION shout(word VARCHAR(50)) RETURNS VARCHAR(60) DETERMINISTIC "
        "RETURN CONCAT(word, '!')"
    )
    connection.exec_driver_sql("CREATE PROCEDURE add_item(n VARCHAR(50)) "
                               "INSERT INTO alchemy_item (name) VALUES (n)")
    connection.exec_driver_sql(
        "CREATE EVENT nightly ON SCHEDULE EVERY 1 DAY DISABLE DO DELETE FROM alchemy_tag"
    )
"""

OBJECTS_TESTS = """
from sqlalchemy import text


def test_the_clone_has_every_object_of_the_template(db_session):
    db_session.execute(text("CALL add_item('called')"))
    db_session.execute(text("INSERT INTO alchemy_item (name) VALUES ('inserted')"))
    names = db_session.execute(text("SELECT name FROM item_names ORDER BY name")).scalars()
    # The seed's row was copied as it was; the trigger fires in the clone, not while copying.
    assert names.all() == ["CALLED", "INSERTED", "seeded"]
    assert db_session.execute(text("SELECT n FROM item_count")).scalar() == 3
    assert db_session.execute(text("SELECT shout('hi')")).scalar() == "hi!"
    events = db_session.execute(text("SHOW EVENTS")).all()
    assert [row[1] for row in events] == ["nightly"]
"""


@pytest.mark.parametrize(
    "driver",
    [d for d in DRIVERS if d.backend == "mysql"],
    ids=lambda d: d.id,
)
def test_a_mysql_clone_has_the_templates_views_routines_triggers_and_events(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = project_for(driver, scratch_databases, pytester)
    project.pytester.makepyfile(seeding=OBJECTS_SEED)
    project.ini("alchemy_seed = seeding:seed\n")
    project.tests(OBJECTS_TESTS)
    # Under xdist: a worker's database is a clone of the template (in one process, the
    # test database is built directly).
    project.pytester.runpytest_inprocess("-p", "no:cacheprovider", "-n", "2").assert_outcomes(
        passed=1
    )


def _fingerprint_of(backend: str, *columns: object, **table: object) -> str:
    from sqlalchemy import Column, Integer, MetaData, Table

    from pytest_alchemy.schema import fingerprint

    md = MetaData()
    Table("t", md, Column("id", Integer, primary_key=True), *columns, **table)  # type: ignore[arg-type]
    return fingerprint([md], None, None, backend)


def test_the_fingerprint_compiles_dialect_types_with_the_targets_dialect() -> None:
    from sqlalchemy import JSON, Column, Enum, Index, String, text
    from sqlalchemy.dialects.postgresql import ARRAY, INET, JSONB, TSVECTOR
    from sqlalchemy.types import TypeDecorator

    class Tags(TypeDecorator[str]):
        impl = String(20)
        cache_ok = True

    class LongTags(TypeDecorator[str]):
        impl = String(40)
        cache_ok = True

    pg = [
        Column("doc", JSONB),
        Column("tags", ARRAY(String(10))),
        Column("ip", INET),
        Column("search", TSVECTOR),
    ]
    assert _fingerprint_of("postgresql", *pg)  # the generic dialect raised CompileError here
    for backend in ("sqlite", "mysql", "mariadb", "postgresql"):
        assert _fingerprint_of(backend, Column("doc", JSON))

    def differ(a: list[object], b: list[object], backend: str = "postgresql") -> bool:
        return _fingerprint_of(backend, *a) != _fingerprint_of(backend, *b)

    assert differ([Column("s", String(5), server_default="a")], [Column("s", String(5))])
    assert differ([Column("m", Enum("a", "b", name="m"))], [Column("m", Enum("a", "c", name="m"))])
    assert differ([Column("x", Tags)], [Column("x", LongTags)])
    name = Column("name", String(20))
    partial = _fingerprint_of(
        "postgresql", name, Index("ix", "name", postgresql_where=text("name <> ''"))
    )
    name = Column("name", String(20))
    other = _fingerprint_of(
        "postgresql", name, Index("ix", "name", postgresql_where=text("name <> 'x'"))
    )
    assert partial != other
    expression = Column("name", String(20))
    assert _fingerprint_of(
        "postgresql", expression, Index("ix_lower", text("lower(name)"))
    ) != _fingerprint_of("postgresql", Column("name", String(20)))


JSONB_MODELS = """
from sqlalchemy import String
from sqlalchemy.dialects.postgresql import ARRAY, INET, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Doc(Base):
    __tablename__ = "alchemy_doc"
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[dict] = mapped_column(JSONB)
    tags: Mapped[list] = mapped_column(ARRAY(String(10)))
    ip: Mapped[str] = mapped_column(INET, nullable=True)
"""


def test_a_postgresql_schema_with_jsonb_and_arrays_is_provisioned(
    scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    driver = next(d for d in DRIVERS if d.id == "postgresql-psycopg")
    project = project_for(driver, scratch_databases, pytester)
    pytester.makepyfile(models=JSONB_MODELS)
    project.ini()
    project.tests(
        """
from models import Doc


def test_stores_a_document(db_session):
    db_session.add(Doc(body={"a": [1, 2]}, tags=["x", "y"]))
    db_session.commit()
    assert db_session.query(Doc).one().body == {"a": [1, 2]}
"""
    )
    project.run().assert_outcomes(passed=1)
