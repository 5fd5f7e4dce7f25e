"""Misuse and broken setups get a short error that names the option and the fix."""

from __future__ import annotations

import socket
import sys
import threading
from typing import TYPE_CHECKING

import pytest
from conftest import ASYNC_DRIVERS, SYNC_DRIVERS, Driver, Project, project_for
from sqlalchemy import create_engine, text

if TYPE_CHECKING:
    from collections.abc import Iterator


class RefusingServer:
    """A TCP server on loopback that accepts connections, counts them and hangs up."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            self.answer(conn)

    def answer(self, conn: socket.socket) -> None:
        conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def refusing_server() -> Iterator[RefusingServer]:
    server = RefusingServer()
    yield server
    server.close()


THREE_TESTS = """
import pytest

@pytest.mark.parametrize("n", range({count}))
def test_uses_the_database(db_session, n):
    pass
"""

THREE_ASYNC_TESTS = """
import pytest

@pytest.mark.asyncio
@pytest.mark.parametrize("n", range({count}))
async def test_uses_the_database(async_db_session, n):
    pass
"""


@pytest.mark.parametrize(
    ("driver", "source"),
    [("postgresql+psycopg", THREE_TESTS), ("postgresql+asyncpg", THREE_ASYNC_TESTS)],
    ids=["sync", "async"],
)
def test_unreachable_server_fails_fast_once_with_masked_url(
    pytester: pytest.Pytester, refusing_server: RefusingServer, driver: str, source: str
) -> None:
    url = f"{driver}://postgres:s3cret@127.0.0.1:{refusing_server.port}/app"
    attempts = []
    for count in (1, 3):
        before = refusing_server.accepted
        project = Project(pytester, url)
        project.ini(metadata=False)
        project.tests(source.format(count=count))
        result = project.run(subprocess=True)
        result.assert_outcomes(errors=count)
        attempts.append(refusing_server.accepted - before)
        result.stdout.fnmatch_lines(
            [
                "*DatabaseUnavailableError: Cannot connect to the test database "
                f"{driver}://postgres:***@127.0.0.1:{refusing_server.port}/test_app "
                "(derived from alchemy_url (ini))*--alchemy-url / PYTEST_ALCHEMY_URL / alchemy_url*"
            ]
        )
        assert "s3cret" not in result.stdout.str()
    assert attempts[0] > 0
    assert attempts[1] == attempts[0], "later tests must reuse the first failure, not reconnect"


def test_plugin_is_inert_for_tests_that_do_not_ask(
    pytester: pytest.Pytester, refusing_server: RefusingServer
) -> None:
    project = Project(pytester, f"postgresql+psycopg://postgres@127.0.0.1:{refusing_server.port}/x")
    project.ini()  # even a metadata path that is never imported
    pytester.makepyfile(models="raise RuntimeError('imported')")
    project.tests("def test_plain():\n    assert True\n")
    project.run().assert_outcomes(passed=1)
    assert refusing_server.accepted == 0


def test_missing_driver_names_the_pip_command(pytester: pytest.Pytester) -> None:
    pytest.importorskip("pytest_alchemy")
    try:
        import MySQLdb  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("mysqlclient is installed here; the test needs a driver that is missing")
    project = Project(pytester, "mysql+mysqldb://root@127.0.0.1/test")
    project.ini(metadata=False)
    project.tests(THREE_TESTS.format(count=1))
    result = project.run()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*DriverMissingError*not installed*pip install mysqlclient*"])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("nomodule_here:Base", "*alchemy_metadata = 'nomodule_here:Base': cannot import module*"),
        ("models:Missing", "*alchemy_metadata = 'models:Missing': module 'models' has no attr*"),
        ("models:Item", "*alchemy_metadata = 'models:Item' is a *not a MetaData*"),
    ],
)
def test_bad_metadata_path_names_the_key(
    pytester: pytest.Pytester, value: str, message: str
) -> None:
    project = Project(pytester, None)
    project.ini(f"alchemy_metadata = {value}\n", metadata=False)
    pytester.makepyfile(models="class Item:\n    pass\n")
    project.tests(THREE_TESTS.format(count=2))
    result = project.run()
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines([message])


def test_metadata_value_that_is_not_an_import_path_is_a_usage_error(
    pytester: pytest.Pytester,
) -> None:
    project = Project(pytester, None)
    project.ini("alchemy_metadata = models.Base\n", metadata=False)
    project.tests(THREE_TESTS.format(count=1))
    result = project.run()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*alchemy_metadata = 'models.Base' is not an import path*"])


def test_bad_url_is_a_usage_error_without_echoing_it(pytester: pytest.Pytester) -> None:
    project = Project(pytester, None)
    project.ini(metadata=False)
    project.tests(THREE_TESTS.format(count=1))
    result = project.run("--alchemy-url", "not a url:pw")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--alchemy-url: not a SQLAlchemy URL*"])
    assert "pw" not in result.stderr.str()


def test_async_fixture_without_an_async_runner_says_what_to_install(
    pytester: pytest.Pytester,
) -> None:
    project = Project(pytester, None)
    project.ini(loop_scopes="")
    project.tests("async def test_async(async_db_session):\n    pass\n")
    result = project.run("-p", "no:asyncio", "-p", "no:anyio", "-W", "ignore")
    result.stdout.fnmatch_lines(
        ["*needs an async test runner*pip install 'pytest-alchemy[[]asyncio]'*"]
    )
    assert result.ret != 0


def test_the_base_database_is_never_touched(pytester: pytest.Pytester) -> None:
    url = f"sqlite:///{pytester.path}/app.sqlite3"
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE alchemy_item (id INTEGER PRIMARY KEY, name TEXT)"))
        conn.execute(text("INSERT INTO alchemy_item VALUES (1, 'precious')"))
    project = Project(pytester, url)
    project.ini()
    project.tests(THREE_TESTS.format(count=2))
    project.run().assert_outcomes(passed=2)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT name FROM alchemy_item")).scalars().all() == ["precious"]
    engine.dispose()
    assert not (pytester.path / "test_app.sqlite3").exists()


def test_sync_suite_needs_no_greenlet(pytester: pytest.Pytester) -> None:
    # SQLAlchemy 2.1 no longer installs greenlet; a sync-only user must not need it.
    project = Project(pytester, None)
    project.ini(loop_scopes="")
    project.tests("def test_sync(db_session):\n    assert db_session.connection()\n")
    runner = pytester.makepyfile(
        run_without_greenlet="""
        import sys
        sys.modules["greenlet"] = None  # any import of greenlet now fails
        import pytest
        sys.exit(pytest.main(["-p", "no:asyncio", "-p", "no:anyio", "-p", "no:cacheprovider",
                              "test_app.py"]))
        """
    )
    result = pytester.run(sys.executable, str(runner))
    assert result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines(["*1 passed*"])


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresq://u:pw@127.0.0.1/app", "*SQLAlchemy has no dialect 'postgresq'*"),
        ("postgresql+psycopg://u:pw@127.0.0.1:99999/app", "*port 99999 is out of range*"),
        ("postgresql+psycopg://u:pw@127.0.0.1:54x/app", "*not a SQLAlchemy URL*"),
    ],
    ids=["unknown-dialect", "port-out-of-range", "port-not-a-number"],
)
def test_a_url_that_cannot_work_is_a_usage_error(
    pytester: pytest.Pytester, url: str, message: str
) -> None:
    project = Project(pytester, None)
    project.ini(metadata=False)
    project.tests(THREE_TESTS.format(count=2))
    result = project.run("--alchemy-url", url)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    assert "pw" not in result.stderr.str()
    assert "Traceback" not in result.stderr.str() + result.stdout.str()


def test_a_provisioning_error_is_shown_once_per_test(pytester: pytest.Pytester) -> None:
    project = Project(pytester, "postgresql+psycopg://postgres@127.0.0.1:5432/app")
    project.ini("alchemy_test_database = template1\n", metadata=False)
    project.tests(THREE_TESTS.format(count=2))
    result = project.run()
    result.assert_outcomes(errors=2)
    output = result.stdout.str()
    assert "During handling of the above exception" not in output
    # Once in each error's report (the short summary repeats it, in full where CI is set).
    reports = output.split("short test summary info")[0]
    assert reports.count("is a system database") == 2


class SilentServer(RefusingServer):
    """Accepts connections and never says a word (a hung server, a firewall's black hole)."""

    def __init__(self) -> None:
        self.held: list[socket.socket] = []
        super().__init__()

    def answer(self, conn: socket.socket) -> None:
        self.held.append(conn)

    def close(self) -> None:
        super().close()
        for conn in self.held:
            conn.close()


@pytest.mark.parametrize(
    ("driver", "source", "query", "waited"),
    [
        ("mysql+pymysql", THREE_TESTS, "", 5),  # the default bound
        ("mysql+asyncmy", THREE_ASYNC_TESTS, "?connect_timeout=1", 1),  # the URL's own
        ("mysql+aiomysql", THREE_ASYNC_TESTS, "?connect_timeout=1", 1),
    ],
    ids=["pymysql", "asyncmy", "aiomysql"],
)
def test_a_mysql_server_that_never_answers_fails_fast(
    pytester: pytest.Pytester, driver: str, source: str, query: str, waited: int
) -> None:
    server = SilentServer()
    try:
        url = f"{driver}://root:s3cret@127.0.0.1:{server.port}/app{query}"
        project = Project(pytester, url)
        project.ini(metadata=False)
        project.tests(source.format(count=3))
        result = project.run(subprocess=True)  # would hang for good without the check
        result.assert_outcomes(errors=3)
        result.stdout.fnmatch_lines(
            [
                "*DatabaseUnavailableError: Cannot connect to the test database "
                f"{driver}://root:***@127.0.0.1:{server.port}/test_app* *accepted the "
                f"connection but sent no greeting within {waited} s*"
            ]
        )
        assert server.accepted == 1  # later tests reuse the first failure
        assert "s3cret" not in result.stdout.str()
    finally:
        server.close()


# The first test's teardown ends its (kept, idle) connection from outside, as a server
# restart, wait_timeout or pg_terminate_backend would; the next test is innocent.
KILLED_WHILE_IDLE = """
import time

import pytest
from sqlalchemy import create_engine, text

SEEN = {{}}


@pytest.fixture
def kill_after():
    yield
    engine = create_engine({admin!r})
    with engine.connect() as conn:
        conn.execute(text({kill!r}), {{"id": SEEN["id"]}})
        conn.commit()
    engine.dispose()
    time.sleep(0.3)  # the server ends the connection asynchronously


{tests}
"""
SYNC_KILLED = """
def test_1_holds_the_kept_connection(kill_after, db_session):
    SEEN["id"] = db_session.execute(text({whoami!r})).scalar()


def test_2_is_innocent(db_session):
    assert db_session.execute(text({whoami!r})).scalar() != SEEN["id"]
"""
ASYNC_KILLED = """
@pytest.mark.asyncio
async def test_1_holds_the_kept_connection(kill_after, async_db_session):
    SEEN["id"] = (await async_db_session.execute(text({whoami!r}))).scalar()


@pytest.mark.asyncio
async def test_2_is_innocent(async_db_session):
    assert (await async_db_session.execute(text({whoami!r}))).scalar() != SEEN["id"]
"""
WHOAMI = {"postgresql": "SELECT pg_backend_pid()", "mysql": "SELECT CONNECTION_ID()"}
KILL = {"postgresql": "SELECT pg_terminate_backend(:id)", "mysql": "KILL :id"}


@pytest.mark.parametrize(
    "driver",
    [d for d in SYNC_DRIVERS + ASYNC_DRIVERS if d.backend != "sqlite"],
    ids=lambda d: d.id,
)
def test_a_connection_closed_by_the_server_between_tests_fails_no_test(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = project_for(driver, scratch_databases, pytester)
    project.ini(metadata=False)
    tests = (ASYNC_KILLED if driver.is_async else SYNC_KILLED).format(whoami=WHOAMI[driver.backend])
    admin = scratch_databases[driver.backend]
    project.tests(KILLED_WHILE_IDLE.format(admin=admin, kill=KILL[driver.backend], tests=tests))
    project.run("-p", "no:randomly").assert_outcomes(passed=2)


FAILING_SEED = """
def helper(connection):
    connection.exec_driver_sql("INSERT INTO nowhere VALUES (1)")


def seed(connection):
    helper(connection)
"""


def test_a_failing_seed_shows_its_own_frames_once_not_cannot_connect(
    pytester: pytest.Pytester,
) -> None:
    project = Project(pytester, f"sqlite:///{pytester.path}/app.sqlite3")
    pytester.makepyfile(seeding=FAILING_SEED)
    project.ini("alchemy_seed = seeding:seed\n")
    project.tests(THREE_TESTS.format(count=3))
    result = project.run()
    result.assert_outcomes(errors=3)
    output = result.stdout.str()
    assert "Cannot connect" not in output
    result.stdout.fnmatch_lines(
        [
            "alchemy: alchemy_seed = 'seeding:seed' raised OperationalError: no such "
            "table: nowhere, at:",
            '  File "*seeding.py", line 6, in seed',
            "    helper(connection)",
            '  File "*seeding.py", line 2, in helper',
        ]
    )
    assert output.count('seeding.py", line 2, in helper') == 1  # once for the run
    reports = output.split("short test summary info")[0]
    assert reports.count("ProvisioningError: alchemy_seed = 'seeding:seed' raised") == 3
    assert "pytest_alchemy" not in output.split("short test summary")[0]


FAILING_MIGRATION = """
revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

from alembic import op


def upgrade():
    op.execute("CREATE TABLE broken (")


def downgrade():
    pass
"""


def test_a_failing_migration_shows_its_own_frames_not_a_missing_driver(
    pytester: pytest.Pytester,
) -> None:
    from test_alembic import ALEMBIC_INI, SYNC_ENV

    project = Project(pytester, f"sqlite:///{pytester.path}/app.sqlite3")
    project.ini("alchemy_alembic = alembic.ini\n", metadata=False)
    root = pytester.path
    (root / "alembic.ini").write_text(ALEMBIC_INI)
    (root / "migrations" / "versions").mkdir(parents=True)
    (root / "migrations" / "env.py").write_text("import no_such_module_here\n" + SYNC_ENV)
    (root / "migrations" / "versions" / "0001_broken.py").write_text(FAILING_MIGRATION)
    project.tests(THREE_TESTS.format(count=1))
    result = project.run()
    result.assert_outcomes(errors=1)
    output = result.stdout.str()
    assert "DriverMissingError" not in output
    assert "Cannot connect" not in output
    result.stdout.fnmatch_lines(
        [
            "ProvisioningError: alchemy_alembic = '*alembic.ini': `alembic upgrade head` raised "
            "ModuleNotFoundError: No module named 'no_such_module_here'",
        ]
    )


REFUSED_TABLE = """
from sqlalchemy import CheckConstraint, Column, Integer, MetaData, Table

metadata = MetaData()
Table("notes", metadata, Column("id", Integer, primary_key=True), CheckConstraint("id >>>> ("))
"""


@pytest.mark.parametrize(
    "driver",
    [d for d in SYNC_DRIVERS if d.id in ("sqlite-pysqlite", "postgresql-psycopg", "mysql-pymysql")],
    ids=lambda d: d.id,
)
def test_a_table_the_server_refuses_is_not_cannot_connect(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = project_for(driver, scratch_databases, pytester)
    pytester.makepyfile(notes=REFUSED_TABLE)
    project.ini("alchemy_metadata = notes:metadata\n", metadata=False)
    project.tests(THREE_TESTS.format(count=1))
    result = project.run()
    result.assert_outcomes(errors=1)
    assert "Cannot connect" not in result.stdout.str()
    result.stdout.fnmatch_lines(
        ["*ProvisioningError: alchemy_metadata: creating the tables raised *Error: *"]
    )


COLLIDING_MODELS = """
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "alchemy_user"
    id: Mapped[int] = mapped_column(primary_key=True)
    {column}: Mapped[str] = mapped_column(String(50))
"""


@pytest.mark.parametrize(
    "driver",
    [d for d in SYNC_DRIVERS if d.id in ("sqlite-pysqlite", "postgresql-psycopg", "mysql-pymysql")],
    ids=lambda d: d.id,
)
def test_colliding_tables_of_two_metadatas_are_a_usage_error_before_anything_is_built(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = project_for(driver, scratch_databases, pytester)
    pytester.makepyfile(
        legacy=COLLIDING_MODELS.format(column="login"),
        modern=COLLIDING_MODELS.format(column="email"),
    )
    project.ini("alchemy_metadata =\n    legacy:Base\n    modern:Base\n", metadata=False)
    project.tests(THREE_TESTS.format(count=2))
    result = project.run()
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(
        [
            "*alchemy_metadata: 'legacy:Base' and 'modern:Base' both define the table "
            "'alchemy_user', and they are built into one test database*"
        ]
    )
    assert "Cannot connect" not in result.stdout.str()
    assert project.leftover_tables() == []  # no test database was made


def test_one_metadata_listed_by_two_paths_is_no_collision(pytester: pytest.Pytester) -> None:
    project = Project(pytester, None)
    project.ini("alchemy_metadata =\n    models:Base\n    models:Base.metadata\n", metadata=False)
    project.tests(THREE_TESTS.format(count=2))
    project.run().assert_outcomes(passed=2)
