"""Databases that are not ours stay untouched: foreign objects, adopted databases, concurrent
runs, other hosts, system databases, lock files."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from datetime import timedelta
from typing import TYPE_CHECKING

import pytest
from conftest import Driver, Project, admin, database_exists, derived_name, project_for
from sqlalchemy import create_engine, text
from test_databases import _create_foreign, _drop_foreign

if TYPE_CHECKING:
    from pathlib import Path

    from sqlalchemy.engine import URL, Connection

DRIVERS = [
    Driver("sqlite-pysqlite", "sqlite", "sqlite+pysqlite", False),
    Driver("postgresql-psycopg", "postgresql", "postgresql+psycopg", False),
    Driver("mysql-pymysql", "mysql", "mysql+pymysql", False),
]

USES_DB = """
def test_uses_the_database(db_session):
    from sqlalchemy import select
    from models import Item
    db_session.add(Item(name="a"))
    db_session.commit()
    assert db_session.scalars(select(Item.name)).all() == ["a"]
"""


@pytest.fixture(params=DRIVERS, ids=lambda d: d.id)
def project(
    request: pytest.FixtureRequest, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> Project:
    project = project_for(request.param, scratch_databases, pytester)
    project.ini()
    project.tests(USES_DB)
    return project


def _target(project: Project, name: str = "") -> tuple[URL, str]:
    """The project's sync URL, and the test database it derives (or ``name``'s variant)."""
    url = project.sync_url()
    assert url is not None
    derived = derived_name(url, "")
    if name:
        stem, dot, ext = derived.partition(".")
        derived = f"{stem}_{name}{dot}{ext}"
    return url, derived


def _engine_on(url: URL, name: str):  # type: ignore[no-untyped-def]
    return create_engine(url.set(database=name))


def _marker_rows(url: URL, name: str) -> list[dict[str, object]]:
    engine = _engine_on(url, name)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT * FROM pytest_alchemy_marker ORDER BY id"))
            return [dict(row) for row in rows.mappings()]
    finally:
        engine.dispose()


def _test_tables(url: URL, name: str) -> set[str]:
    from sqlalchemy import inspect

    engine = _engine_on(url, name)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


# -- 1. "empty" means no user object at all ----------------------------------------------------

FOREIGN_OBJECTS = {
    "postgresql": {
        "table in another schema": (
            "CREATE SCHEMA ledger; CREATE TABLE ledger.entries (id int); "
            "INSERT INTO ledger.entries VALUES (1)",
            "SELECT count(*) FROM ledger.entries",
        ),
        "view": ("CREATE VIEW answer AS SELECT 42 AS n", "SELECT n FROM answer"),
        "sequence": ("CREATE SEQUENCE invoice_numbers", "SELECT nextval('invoice_numbers')"),
        "function": (
            "CREATE FUNCTION answer() RETURNS int LANGUAGE sql AS 'SELECT 42'",
            "SELECT answer()",
        ),
        "type": (
            "CREATE TYPE mood AS ENUM ('sad', 'ok')",
            "SELECT 'ok'::mood",
        ),
        "empty schema": (
            "CREATE SCHEMA reports",
            "SELECT 1 FROM pg_namespace WHERE nspname = 'reports'",
        ),
    },
    "mysql": {
        "view": ("CREATE VIEW answer AS SELECT 42 AS n", "SELECT n FROM answer"),
        "procedure": (
            "CREATE PROCEDURE answer() SELECT 42",
            "SELECT 1 FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = DATABASE()",
        ),
    },
    "sqlite": {
        "view": ("CREATE VIEW answer AS SELECT 42 AS n", "SELECT n FROM answer"),
    },
}
FOREIGN_CASES = [
    pytest.param(driver, kind, id=f"{driver.id}-{kind.replace(' ', '_')}")
    for driver in DRIVERS
    for kind in FOREIGN_OBJECTS[driver.backend]
]


@pytest.mark.parametrize(("driver", "kind"), FOREIGN_CASES)
def test_a_database_holding_any_user_object_is_not_adopted(
    driver: Driver, kind: str, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = project_for(driver, scratch_databases, pytester)
    project.ini()
    project.tests(USES_DB)
    url, name = _target(project)
    _create_foreign(url.render_as_string(hide_password=False), name, marker=False, table=False)
    create, probe = FOREIGN_OBJECTS[driver.backend][kind]
    engine = _engine_on(url, name)
    try:
        with engine.begin() as conn:
            for statement in create.split("; "):
                conn.exec_driver_sql(statement)
        result = project.run()
        result.assert_outcomes(errors=1)
        result.stdout.fnmatch_lines(
            ["*already exists and holds objects (*) but no pytest-alchemy*"]
        )
        with engine.connect() as conn:
            assert conn.exec_driver_sql(probe).first() is not None  # still there
    finally:
        engine.dispose()
        _drop_foreign(url.render_as_string(hide_password=False), name)


# -- 1. an adopted database is never dropped ----------------------------------------------------

KILLED = """
import os, signal

def test_dies_mid_run(db_session):
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _killed_run(project: Project) -> None:
    """A run that dies by SIGKILL in its first test, as `kill -9` would end it."""
    project.tests(KILLED, name="test_killed")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:xdist",
            "-q",
            "test_killed.py",
        ],
        cwd=project.pytester.path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr
    (project.pytester.path / "test_killed.py").unlink()


def test_an_adopted_database_outlives_a_killed_run_and_the_next_run(project: Project) -> None:
    # A DBA made an empty database for a role that may not create databases.
    url, name = _target(project)
    sibling = _target(project, "gw7")[1]
    raw = url.render_as_string(hide_password=False)
    _create_foreign(raw, name, marker=False, table=False)
    try:
        _killed_run(project)
        rows = _marker_rows(url, name)
        assert [bool(row["adopted"]) for row in rows] == [True]
        assert {"alchemy_item", "alchemy_tag"} <= _test_tables(url, name)

        project.run().assert_outcomes(passed=1)  # the next run takes it over, and ends
        assert database_exists(url, name)
        assert _test_tables(url, name) == set()  # only what the plugin created went

        _create_foreign(raw, sibling, marker=True, table=False, adopted=True)
        project.run().assert_outcomes(passed=1)  # the sweep does not drop it either
        assert database_exists(url, sibling)
    finally:
        _drop_foreign(raw, name)
        _drop_foreign(raw, sibling)


# -- 2. concurrent runs -----------------------------------------------------------------------

HOLDING = """
import os, pathlib, time

def test_holds_its_database_until_told(db_session):
    from sqlalchemy import select
    from models import Item
    db_session.add(Item(name="from-a"))
    db_session.commit()
    root = pathlib.Path({root!r})
    (root / "a-ready").write_text(str(db_session.bind.engine.url.database))
    deadline = time.monotonic() + 120
    while not (root / "go").exists():
        assert time.monotonic() < deadline, "never told to go on"
        time.sleep(0.05)
    assert db_session.scalars(select(Item.name)).all() == ["from-a"]
"""


def _start_holding_run(project: Project, *args: str) -> subprocess.Popen[str]:
    root = project.pytester.path
    project.tests(HOLDING.format(root=str(root)), name="test_a")
    run = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args, "test_a.py"],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (root / "a-ready").exists():
        if run.poll() is not None or time.monotonic() > deadline:
            run.kill()
            pytest.fail(f"run A did not get going: {run.communicate()[0]}")
        time.sleep(0.05)
    return run


def _finish(project: Project, run: subprocess.Popen[str]) -> str:
    (project.pytester.path / "go").write_text("")
    output = run.communicate(timeout=120)[0]
    assert run.returncode == 0, output
    return output


def _derived_databases(url: URL, name: str) -> list[str]:
    """Every database (or file) whose name starts with the derived one."""
    stem = name.partition(".")[0]
    if url.get_backend_name() == "sqlite":
        from pathlib import Path

        return sorted(str(p) for p in Path(stem).parent.glob(f"{Path(stem).name}*"))
    engine = admin(url)
    query = (
        "SELECT datname FROM pg_database"
        if url.get_backend_name() == "postgresql"
        else "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA"
    )
    try:
        with engine.connect() as conn:
            return sorted(n for (n,) in conn.execute(text(query)) if n.startswith(stem))
    finally:
        engine.dispose()


def test_two_concurrent_runs_both_pass_on_databases_of_their_own(project: Project) -> None:
    url, name = _target(project)
    project.tests(USES_DB, name="test_b")
    first = _start_holding_run(project)
    try:
        second = project.run("test_b.py")
        second.assert_outcomes(passed=1)
        second.stdout.fnmatch_lines(
            ["alchemy: * is in use by run * (pid * on *): this run uses *_r* instead"]
        )
        assert database_exists(url, name)  # the first run's, untouched
    finally:
        output = _finish(project, first)
    assert "1 passed" in output
    assert _derived_databases(url, name) == []  # each dropped its own, and only its own


def test_a_kept_database_in_use_is_not_reused_by_another_run(project: Project) -> None:
    url, name = _target(project)
    project.tests(USES_DB, name="test_b")
    project.run("--alchemy-reuse", "test_b.py").assert_outcomes(passed=1)  # kept
    first = _start_holding_run(project, "--alchemy-reuse")
    try:
        assert (
            (project.pytester.path / "a-ready").read_text().endswith(name.rpartition("/")[2])
        )  # the kept one, reused
        second = project.run("--alchemy-reuse", "test_b.py")
        second.assert_outcomes(passed=1)
        second.stdout.fnmatch_lines(["alchemy: * is in use by run *: this run uses *_r* instead"])
    finally:
        _finish(project, first)
    try:
        assert [n.rpartition("/")[2] for n in _derived_databases(url, name)] == [
            name.rpartition("/")[2],
            f"{name.partition('.')[0].rpartition('/')[2]}_template"
            + ("." + name.partition(".")[2] if "." in name else ""),
        ]  # kept by the first run; the second dropped its own names
        again = project.run("--alchemy-reuse", "test_b.py")  # free again: reused
        again.assert_outcomes(passed=1)
        again.stdout.fnmatch_lines(["alchemy: reusing * (schema unchanged)"])
    finally:
        project.run("test_b.py").assert_outcomes(passed=1)  # without reuse: dropped
    assert _derived_databases(url, name) == []


# -- 2. other hosts: the heartbeat ------------------------------------------------------------


@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_another_hosts_database_is_left_while_its_heartbeat_is_recent(
    backend: str, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    from pytest_alchemy import ownership

    driver = next(d for d in DRIVERS if d.backend == backend)
    project = project_for(driver, scratch_databases, pytester)
    project.ini()
    project.tests(USES_DB)
    url, _ = _target(project)
    raw = url.render_as_string(hide_password=False)
    live, gone = (_target(project, part)[1] for part in ("gw5", "gw6"))
    elsewhere = {"host": "ci-runner-7/pid:[1]", "pid": 4242}
    _create_foreign(raw, live, marker=True, table=True, **elsewhere)
    stale = ownership.now() - ownership.HEARTBEAT_STALE - timedelta(minutes=1)
    _create_foreign(raw, gone, marker=True, table=True, heartbeat=stale, **elsewhere)
    try:
        result = project.run()
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines([f"alchemy: dropped *{gone}, left by a run that is gone"])
        assert database_exists(url, live)
        assert not database_exists(url, gone)
    finally:
        _drop_foreign(raw, live)
        _drop_foreign(raw, gone)


BEATING = """
import time


def test_lives_a_while(db_session):
    from sqlalchemy import text
    url = db_session.bind.engine.url
    time.sleep(1.0)
    with open("beat.txt", "w") as out:
        out.write(url.database)
"""


def test_a_live_run_keeps_its_heartbeat_fresh(
    scratch_databases: dict[str, str], pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pytest_alchemy import ownership

    # Set from here, and so undone after: the run is in this process, and a heartbeat every
    # 0.1 s left behind added round trips to every later run in it (tests/test_round_trips.py).
    monkeypatch.setattr(ownership, "HEARTBEAT_EVERY", 0.1)
    driver = next(d for d in DRIVERS if d.backend == "postgresql")
    project = project_for(driver, scratch_databases, pytester)
    project.ini()
    # The heartbeat is read from inside the run, before the database is dropped at its end.
    project.tests(
        BEATING
        + """
    from sqlalchemy import create_engine
    engine = create_engine(url)
    with engine.connect() as conn:
        created, beat = conn.execute(
            text("SELECT created_at, heartbeat FROM pytest_alchemy_marker")
        ).one()
    engine.dispose()
    assert beat - created >= __import__("datetime").timedelta(seconds=0.5)
"""
    )
    project.run().assert_outcomes(passed=1)


# -- 3. system databases ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("postgresql+psycopg://postgres@127.0.0.1:5432/app", "template1"),
        ("postgresql+psycopg://postgres@127.0.0.1:5432/app", "template0"),
        ("postgresql+psycopg://postgres@127.0.0.1:5432/app", "postgres"),
        ("mysql+pymysql://root@127.0.0.1:3306/app", "mysql"),
        ("mysql+pymysql://root@127.0.0.1:3306/app", "information_schema"),
        ("mysql+pymysql://root@127.0.0.1:3306/app", "performance_schema"),
        ("mysql+pymysql://root@127.0.0.1:3306/app", "sys"),
    ],
)
def test_a_system_database_is_refused_as_test_database(
    pytester: pytest.Pytester, url: str, name: str
) -> None:
    project = Project(pytester, url)
    project.ini(f"alchemy_test_database = {name}\n")
    project.tests("def test_x(db_session):\n    pass\n")
    result = project.run()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*alchemy_test_database = '{name}' is a system database*"])


# -- 12. lock files ---------------------------------------------------------------------------


def test_lock_files_are_private_to_the_user_and_removed_when_done(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    project = Project(pytester, f"sqlite:///{pytester.path}/app.sqlite3")
    project.ini()
    project.tests(USES_DB)
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
            cwd=pytester.path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    done = run("-n", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    folder = temp / f"pytest-alchemy-{os.getuid()}"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert list(folder.iterdir()) == []

    folder.chmod(0o777)  # someone else could plant or hold locks here: refused, with the fix
    done = run()
    assert done.returncode != 0
    assert f"The lock folder {folder} is not private to this user" in done.stdout


# -- 14. interrupts and crashed workers -------------------------------------------------------

CRASHING = """
import os, pathlib, time

import pytest


@pytest.mark.parametrize("n", range(4))
def test_work(db_session, n):
    from sqlalchemy import text
    db_session.execute(text("SELECT 1"))
    if n == 0:
        os._exit(3)  # the worker dies, its database left behind


def test_waits_to_be_interrupted(db_session):
    root = pathlib.Path({root!r})
    if not (root / "interrupt").exists():
        return
    (root / "a-ready").write_text("")
    time.sleep(120)
"""


@pytest.mark.parametrize("how", ["crashed-worker", "ctrl-c"])
def test_crashed_and_interrupted_xdist_runs_leave_nothing(project: Project, how: str) -> None:
    url, name = _target(project)
    root = project.pytester.path
    project.tests(CRASHING.format(root=str(root)))
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "-q"]
    if how == "crashed-worker":
        done = subprocess.run(
            command, cwd=root, capture_output=True, text=True, timeout=300, check=False
        )
        assert "crashed" in done.stdout, done.stdout
    else:
        (root / "interrupt").write_text("")
        run = subprocess.Popen(
            [*command, "-k", "interrupted"],
            cwd=root,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a process group of its own, as a terminal's job is
        )
        deadline = time.monotonic() + 120
        while not (root / "a-ready").exists():
            if run.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the run did not get going: {run.communicate()[0]}")
            time.sleep(0.05)
        os.killpg(run.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole job
        output = run.communicate(timeout=120)[0]
        assert "KeyboardInterrupt" in output, output
    assert _derived_databases(url, name) == []


@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_a_database_another_run_created_meanwhile_is_theirs(
    backend: str, scratch_databases: dict[str, str]
) -> None:
    """Two runs reaching one server by different addresses (127.0.0.1 and localhost, two CI
    machines) share no lock file: both may see a name free and both CREATE it. The one whose
    CREATE fails must take the database for the other's (Busy: it moves to names of its own),
    never drop it, which used to end the other run's tests (DROP ... WITH (FORCE))."""
    from sqlalchemy.engine import make_url

    from pytest_alchemy import databases

    if scratch_databases[backend].startswith("!"):
        pytest.fail(scratch_databases[backend][1:], pytrace=False)
    url = make_url(scratch_databases[backend])
    name = f"{url.database}_taken"
    server = databases._Server(url)
    server.create(name)  # the other run's
    try:
        with pytest.raises(databases.Busy, match="just created by another run"):
            server.create(name)
        if backend == "postgresql":
            with pytest.raises(databases.Busy):
                server.create(name, template=url.database)
        assert server.exists(name)
    finally:
        server.drop(name)


@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_a_turn_works_on_its_lock_session_and_goes_on_without_it_if_it_dies(
    backend: str, scratch_databases: dict[str, str]
) -> None:
    """A provisioning turn's administrative work runs on the session holding the server's
    lock (one connection per turn, not one per statement). If that session dies (killed,
    a restarted server), the work goes on, on connections of its own, as before the lending."""
    from sqlalchemy.engine import make_url

    from pytest_alchemy import databases

    if scratch_databases[backend].startswith("!"):
        pytest.fail(scratch_databases[backend][1:], pytrace=False)
    url = make_url(scratch_databases[backend])
    name = f"{url.database}_lent"
    server = databases._Server(url)
    pg = backend == "postgresql"
    session_id = "SELECT pg_backend_pid()" if pg else "SELECT CONNECTION_ID()"

    def session(conn: Connection) -> int:
        return int(conn.exec_driver_sql(session_id).scalar_one())

    server.drop(name)
    try:
        with databases._turn(url.set(database=name), lambda line: None):
            holder = server.run(session)
            assert server.run(session) == holder  # the lock's session, lent
            killer = admin(url)
            try:
                with killer.connect() as conn:
                    conn.exec_driver_sql(
                        f"SELECT pg_terminate_backend({holder})" if pg else f"KILL {holder}"
                    )
                    conn.commit()
            finally:
                killer.dispose()
            server.create(name)  # on a connection of its own: the lock's session is gone
            assert server.exists(name)
            assert server.run(session) != holder
        assert server.exists(name)
    finally:
        server.drop(name)


@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_a_database_another_run_has_created_but_not_yet_marked_is_not_adopted(
    backend: str, scratch_databases: dict[str, str]
) -> None:
    """Between one run's CREATE DATABASE and its marker, the database is empty and unmarked:
    a run reaching the server by another address (no shared lock file) used to adopt it then,
    and both ran on it. It now waits for the server's lock the creating run holds, then finds
    the marker of a live run and moves to names of its own."""
    import threading

    from sqlalchemy.engine import make_url

    from pytest_alchemy import databases, ownership

    if scratch_databases[backend].startswith("!"):
        pytest.fail(scratch_databases[backend][1:], pytrace=False)
    url = make_url(scratch_databases[backend])
    target = url.set(database=f"{url.database}_unmarked")
    server = databases._Server(url)
    creator = ownership.Owner("a" * 32, os.getpid())  # alive: this process
    outcome: list[BaseException | databases.ProvisionedDatabase] = []
    lines: list[str] = []

    def other_run() -> None:
        try:
            owner = ownership.Owner("b" * 32, os.getpid())
            outcome.append(databases.provision(target, owner, report=lines.append))
        except BaseException as exc:
            outcome.append(exc)

    server.drop(target.database or "")
    try:
        # The creating run, midway: its database exists, its marker not yet.
        with ownership.server_lock(target.database or "", server.family, server.hold):
            server.create(target.database or "")
            other = threading.Thread(target=other_run)
            other.start()
            other.join(timeout=2)
            assert other.is_alive(), f"did not wait for the creating run: {outcome}"
            databases._mark(target, creator, None)
        other.join(timeout=60)
        assert len(outcome) == 1
        assert isinstance(outcome[0], databases.Busy), outcome[0]
        assert "run aaaaaaaa" in str(outcome[0])
        assert databases._look(target).holder["run_id"] == creator.run_id
    finally:
        server.drop(target.database or "")
    assert lines == [f"waiting for another run provisioning {target.database} on this server"]
