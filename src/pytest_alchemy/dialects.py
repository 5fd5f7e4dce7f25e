"""Per-backend quirks, behind one small dispatch keyed on the dialect name.

Everything here is pure knowledge about a backend or a driver: how to derive the async URL
from a sync one (and back), which options make an engine safe for a sandbox, how to fix
pysqlite's transaction handling, which statements end a transaction behind SQLAlchemy's back,
and which package to install for a driver.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.pool import StaticPool

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.engine import URL, Connection, Engine
    from sqlalchemy.engine.interfaces import (
        DBAPIConnection,
        DBAPICursor,
        Dialect,
        ExecutionContext,
    )
    from sqlalchemy.pool import ConnectionPoolEntry

#: Seconds a connection attempt may take before the test fails, unless the URL sets its own.
CONNECT_TIMEOUT = 5

#: Key in a pooled connection's ``info``: a transaction has begun and BEGIN is not sent yet.
_BEGIN_PENDING = "alchemy_sqlite_begin_pending"


@dataclass(frozen=True)
class _Driver:
    package: str  # what `pip install` needs
    sync_twin: str  # the sync driver for an async one (or itself)
    async_twin: str  # the async driver for a sync one (or itself)
    timeout_arg: str | None  # connect argument that bounds a connection attempt


# Keyed by (backend, driver) as SQLAlchemy names them; "" is the backend's default driver.
_DRIVERS: dict[tuple[str, str], _Driver] = {
    ("postgresql", "psycopg"): _Driver(
        "psycopg[binary]", "psycopg", "psycopg_async", "connect_timeout"
    ),
    ("postgresql", "psycopg_async"): _Driver(
        "psycopg[binary]", "psycopg", "psycopg_async", "connect_timeout"
    ),
    ("postgresql", "psycopg2"): _Driver(
        "psycopg2-binary", "psycopg2", "asyncpg", "connect_timeout"
    ),
    ("postgresql", "asyncpg"): _Driver("asyncpg", "psycopg", "asyncpg", "timeout"),
    ("sqlite", "pysqlite"): _Driver("(the standard library)", "pysqlite", "aiosqlite", None),
    ("sqlite", "aiosqlite"): _Driver("aiosqlite", "pysqlite", "aiosqlite", None),
    ("mysql", "pymysql"): _Driver("pymysql", "pymysql", "asyncmy", "connect_timeout"),
    ("mysql", "mysqldb"): _Driver("mysqlclient", "mysqldb", "asyncmy", "connect_timeout"),
    ("mysql", "asyncmy"): _Driver("asyncmy", "pymysql", "asyncmy", "connect_timeout"),
    ("mysql", "aiomysql"): _Driver("aiomysql", "pymysql", "aiomysql", "connect_timeout"),
}
_DEFAULT_DRIVER = {"postgresql": "psycopg2", "sqlite": "pysqlite", "mysql": "mysqldb"}


def _split(url: URL) -> tuple[str, str]:
    backend = url.get_backend_name()
    family = "mysql" if backend == "mariadb" else backend
    driver = url.get_driver_name() if "+" in url.drivername else _DEFAULT_DRIVER.get(family, "")
    return family, driver


def _driver(url: URL) -> _Driver | None:
    return _DRIVERS.get(_split(url))


def with_driver(url: URL, driver: str) -> URL:
    """The same URL with another driver, keeping the backend name as written."""
    return url.set(drivername=f"{url.get_backend_name()}+{driver}")


def is_async(url: URL) -> bool:
    """Whether the URL names an asyncio driver (asyncpg, aiosqlite, asyncmy, psycopg_async)."""
    family, driver = _split(url)
    known = _DRIVERS.get((family, driver))
    if known is not None:
        return known.async_twin == driver and known.sync_twin != driver
    return bool(getattr(url.get_dialect(), "is_async", False))


def async_twin(url: URL) -> URL:
    """The async URL derived from a sync one (an async URL is returned as it is)."""
    if is_async(url):
        return url
    known = _driver(url)
    return with_driver(url, known.async_twin) if known else url


def sync_twin(url: URL) -> URL:
    """The sync URL derived from an async one (a sync URL is returned as it is)."""
    if not is_async(url):
        return url
    known = _driver(url)
    return with_driver(url, known.sync_twin) if known else url


def install_hint(url: URL) -> str:
    """The pip command that installs the URL's driver."""
    known = _driver(url)
    package = known.package if known else f"the DBAPI driver for {url.drivername!r}"
    if is_async(url):
        return f"pip install {package} 'sqlalchemy[asyncio]'"
    return f"pip install {package}"


#: Async drivers whose connections are not tied to the loop that opened them: aiosqlite runs
#: each connection in a thread of its own and answers each call on the caller's loop.
_LOOP_FREE = frozenset({"aiosqlite"})


def loop_bound(driver: str) -> bool:
    """Whether an async driver's connection may only be used on the loop that opened it."""
    return driver not in _LOOP_FREE


def begins_implicitly(dialect: Dialect) -> bool:
    """Whether the driver begins a transaction by itself with the first statement after a
    rollback (PostgreSQL's and MySQL's drivers; the plugin's SQLite connections begin with
    an explicit BEGIN, and a rollback would leave them in autocommit)."""
    return dialect.name in ("postgresql", "mysql", "mariadb")


def begin_with_savepoints(dbapi_connection: Any, names: list[str]) -> bool:
    """Send the BEGIN a driver would send before the next statement together with the
    SAVEPOINTs ``names``, in one round trip; False where it cannot (nothing is sent).

    psycopg 3 only: it sends its BEGIN as a round trip of its own, and skips it when libpq
    reports a transaction open, as it does after this. Not when an isolation level, read-only
    or deferrable mode makes its BEGIN say more. On an async connection this one round trip
    blocks the loop (libpq's ``PQexec``): BEGIN and SAVEPOINT never wait for a lock, so nothing
    the loop would run meanwhile can be what they wait for.
    """
    raw = getattr(dbapi_connection, "driver_connection", None) or dbapi_connection
    if type(raw).__module__.partition(".")[0] != "psycopg":
        return False
    import psycopg

    if not isinstance(raw, (psycopg.Connection, psycopg.AsyncConnection)) or raw.autocommit:
        return False
    if (raw.isolation_level, raw.read_only, raw.deferrable) != (None, None, None):
        return False
    pgconn = raw.pgconn
    if pgconn.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        return False
    query = "; ".join(["BEGIN", *(f"SAVEPOINT {name}" for name in names)])
    result = pgconn.exec_(query.encode())
    if result.status != psycopg.pq.ExecStatus.COMMAND_OK:
        message = (result.error_message or b"").decode(errors="replace").strip()
        raise psycopg.OperationalError(f"{query!r} failed: {message or 'no answer'}")
    return True


def is_memory(url: URL) -> bool:
    """Whether the URL is an in-memory SQLite database (one per engine)."""
    if url.get_backend_name() != "sqlite":
        return False
    database = url.database or ""
    return database in ("", ":memory:") or url.query.get("mode") == "memory"


def engine_options(url: URL) -> tuple[URL, dict[str, Any]]:
    """Options that make an engine fit for sandboxes; the URL's own settings win."""
    options: dict[str, Any] = {}
    connect_args: dict[str, Any] = {}
    known = _driver(url)
    if known and known.timeout_arg and known.timeout_arg not in url.query:
        connect_args[known.timeout_arg] = CONNECT_TIMEOUT
    if is_memory(url) and not is_async(url):
        # One in-memory database per connection otherwise; a thread (TestClient) would see
        # an empty database. StaticPool shares the one connection.
        options["poolclass"] = StaticPool
        connect_args["check_same_thread"] = False
    sqlite3 = url.get_backend_name() == "sqlite" and not is_async(url)
    if sqlite3 and "cached_statements" not in url.query:
        # Threads share the sandbox's connection one statement at a time, but sqlite3 fetches
        # rows after its statement ran, outside that turn. Python 3.12+ shares one cached
        # statement between two cursors that run the same SQL, and one thread's reset of it,
        # as its fetch ends, wipes the other's rows (a COUNT(*) gave None). A statement of its
        # own per execution costs about 5 us.
        connect_args["cached_statements"] = 0
    if connect_args:
        options["connect_args"] = connect_args
    return url, options


def check_greeting(url: URL, timeout: float = CONNECT_TIMEOUT) -> None:
    """Fail fast against a MySQL/MariaDB server that accepts TCP and never answers.

    The server speaks first on a new connection. The drivers bound only the TCP connect with
    ``connect_timeout``; waiting for the greeting, PyMySQL, asyncmy and aiomysql hang for good.
    The wait is the URL's own connect timeout where it sets one. Raises TimeoutError or
    ConnectionError; does nothing for other backends and sockets.
    """
    if _split(url)[0] != "mysql" or "unix_socket" in url.query:
        return
    import socket

    known = _driver(url)
    if known and known.timeout_arg and known.timeout_arg in url.query:  # the URL's own bound
        with contextlib.suppress(TypeError, ValueError):
            timeout = float(url.query[known.timeout_arg])  # type: ignore[arg-type]

    host, port = url.host or "localhost", url.port or 3306
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        try:
            greeting = sock.recv(1)
        except TimeoutError:
            raise TimeoutError(
                f"the server at {host}:{port} accepted the connection but sent no greeting "
                f"within {timeout:.0f} s"
            ) from None
    if not greeting:
        raise ConnectionError(f"the server at {host}:{port} closed the connection at once")


def _socket_fd(dbapi_connection: Any) -> int | None:
    """The file descriptor of a driver connection's socket, where the driver shows it."""
    raw = getattr(dbapi_connection, "driver_connection", None) or dbapi_connection
    try:
        if callable(getattr(raw, "fileno", None)):  # psycopg 3 (sync and async), psycopg2
            return int(raw.fileno())
        sock = getattr(raw, "_sock", None)  # PyMySQL, asyncmy
        if sock is not None and callable(getattr(sock, "fileno", None)):
            return int(sock.fileno())
        transport = getattr(raw, "_transport", None)  # asyncpg
        if transport is None:
            transport = getattr(getattr(raw, "_writer", None), "transport", None)  # aiomysql
        if transport is not None:
            sock = transport.get_extra_info("socket")
            return int(sock.fileno()) if sock is not None else None
    except Exception:  # closed, or a driver that does not work this way
        return None
    return None


def looks_dead(dbapi_connection: Any) -> bool:
    """Whether an idle connection was closed under us (server restart, ``wait_timeout``,
    ``pg_terminate_backend``), told with no round trip: an idle connection's socket has
    nothing to read unless the server said goodbye (or sent something unasked, which as
    well makes the connection one to replace). SQLite and unknown drivers: False."""
    fd = _socket_fd(dbapi_connection)
    if fd is None or fd < 0:
        return fd is not None
    import select

    try:
        poller = select.poll()
    except AttributeError:  # Windows
        readable, _, _ = select.select([fd], [], [], 0)
        return bool(readable)
    poller.register(fd, select.POLLIN | select.POLLPRI)
    return bool(poller.poll(0))


def prepare_engine(engine: Engine) -> None:
    """Install what the backend needs for SAVEPOINTs to work; idempotent.

    For an AsyncEngine pass ``engine.sync_engine``.
    """
    if engine.dialect.name == "sqlite" and not event.contains(engine, "begin", _sqlite_begin):
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        event.listen(engine, "before_cursor_execute", _sqlite_send_begin)
        event.listen(engine, "commit", _sqlite_transaction_ended)
        event.listen(engine, "rollback", _sqlite_transaction_ended)


def _sqlite_connect(dbapi_connection: DBAPIConnection, record: ConnectionPoolEntry) -> None:
    # pysqlite defers BEGIN and does not count SAVEPOINT as starting a transaction, so
    # RELEASE SAVEPOINT commits for real. Take BEGIN into our own hands instead.
    # https://docs.sqlalchemy.org/en/20/dialects/sqlite.html#serializable-isolation-savepoints-transactional-ddl
    if getattr(dbapi_connection, "autocommit", None) is False:
        return  # Python 3.12+ autocommit=False: sqlite3 already keeps a transaction open
    dbapi_connection.isolation_level = None


def _sqlite_begin(connection: Connection) -> None:
    # BEGIN goes out with the transaction's first statement, so a test that never touches
    # the database costs neither BEGIN nor ROLLBACK (sqlite3 skips ROLLBACK outside a
    # transaction).
    if getattr(connection.connection.dbapi_connection, "autocommit", None) is not False:
        connection.info[_BEGIN_PENDING] = True


def _sqlite_send_begin(
    connection: Connection,
    cursor: DBAPICursor,
    statement: str,
    parameters: Any,
    context: ExecutionContext | None,
    executemany: bool,
) -> None:
    info = connection.info
    if info.get(_BEGIN_PENDING):
        info[_BEGIN_PENDING] = False
        cursor.execute("BEGIN")


def begin_now(connection: Connection) -> None:
    """Send a BEGIN that waits for the transaction's first statement now: a sandbox's outer
    transaction must be open before the test runs, for raw DBAPI cursors too, which
    SQLAlchemy's events do not see (in autocommit, their writes would be committed)."""
    info = connection.info
    if info.get(_BEGIN_PENDING):
        info[_BEGIN_PENDING] = False
        cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute("BEGIN")
        finally:
            cursor.close()


def _sqlite_transaction_ended(connection: Connection) -> None:
    if not connection.invalidated:  # an invalidated connection's pool record is gone
        connection.info.pop(_BEGIN_PENDING, None)


# Statements that end the outer transaction whatever SQLAlchemy believes.
_ENDS_TRANSACTION = (
    r"COMMIT|END|ABORT|ROLLBACK(?!\s+(?:WORK\s+)?TO\b)|BEGIN|START\s+TRANSACTION"
    r"|SET\s+(?:SESSION\s+|@@(?:SESSION\.)?)?AUTOCOMMIT\b"
)
# MySQL and MariaDB commit implicitly before (and after) these.
# https://mariadb.com/kb/en/sql-statements-that-cause-an-implicit-commit/
_MYSQL_IMPLICIT_COMMIT = (
    r"(?:CREATE|DROP)(?!\s+TEMPORARY\b)(?!\s+OR\s+REPLACE\s+TEMPORARY\b)"
    r"|ALTER|TRUNCATE|RENAME|LOCK\s+TABLES?|UNLOCK\s+TABLES?|GRANT|REVOKE|ANALYZE|OPTIMIZE"
    r"|REPAIR|FLUSH|INSTALL|UNINSTALL|LOAD\s+INDEX|CACHE\s+INDEX|XA\b"
)
# Whitespace and comments before the statement's first word (MySQL's executable comments,
# /*! ... */, are statements: not skipped).
_LEAD = r"(?:\s|/\*(?!!).*?\*/|--[^\n]*(?:\n|$)|#[^\n]*(?:\n|$))*"
_TRANSACTION_CONTROL = re.compile(rf"{_LEAD}(?:{_ENDS_TRANSACTION})\b", re.I | re.S)
_IMPLICIT_COMMIT = re.compile(rf"{_LEAD}(?:{_MYSQL_IMPLICIT_COMMIT})\b", re.I | re.S)
_GUARDS = {
    "mysql": re.compile(rf"{_LEAD}(?:{_ENDS_TRANSACTION}|{_MYSQL_IMPLICIT_COMMIT})\b", re.I | re.S)
}


def statement_guard(dialect_name: str) -> re.Pattern[str]:
    """A pattern matching statements that would end the sandbox's outer transaction."""
    family = "mysql" if dialect_name == "mariadb" else dialect_name
    return _GUARDS.get(family, _TRANSACTION_CONTROL)


# MySQL and MariaDB keep session settings (SET SESSION ..., user variables, USE) across a
# rollback; PostgreSQL rolls SET back with the transaction.
_MYSQL_SESSION_STATE = re.compile(r"\s*(?:SET\b(?!\s+TRANSACTION\b)|USE\b)", re.I)


def session_state_pattern(dialect_name: str) -> re.Pattern[str] | None:
    """Statements whose effect outlives a rollback, so the connection must not be reused."""
    return _MYSQL_SESSION_STATE if dialect_name in ("mysql", "mariadb") else None


def refusal_advice(statement: str) -> str:
    """What to do instead of a statement the guard refused."""
    if not _TRANSACTION_CONTROL.match(statement) and _IMPLICIT_COMMIT.match(statement):
        return (
            "MySQL and MariaDB commit implicitly on DDL (CREATE, ALTER, DROP, TRUNCATE, ...), "
            "so a sandbox cannot undo it. Build tables once, through alchemy_metadata (a "
            "create_all/drop_all of them in a test then sends nothing); use CREATE TEMPORARY "
            "TABLE for scratch tables; use DELETE instead of TRUNCATE."
        )
    return (
        "Commit through the Session (session.commit() releases the sandbox's savepoint), or "
        "use `with db_connection.begin_nested():` for Core work."
    )


# -- is the outer transaction still open? (asked of the driver, not guessed from text) --------

#: What a transaction probe reports.
IN_TRANSACTION, NO_TRANSACTION, AUTOCOMMIT = 1, 0, 2

_PG_OPEN = {1, 2, 3}  # libpq: ACTIVE, INTRANS, INERROR (IDLE = 0, UNKNOWN = 4: broken)
_MYSQL_IN_TRANS, _MYSQL_AUTOCOMMIT = 0x0001, 0x0002  # SERVER_STATUS_* flags of OK packets


def transaction_probe(dialect_name: str, dbapi_connection: Any) -> Callable[[], int | None] | None:
    """A function telling, from the driver's own state and with no round trip, whether the
    connection is in a transaction; None where the driver cannot tell.

    - psycopg 3 and psycopg2: libpq's transaction status, updated by every server reply;
    - asyncpg: the protocol's transaction state;
    - PyMySQL and aiomysql: the server status flags of the last reply, which
      also say when autocommit was switched on. asyncmy's flags are kept by a statement
      whose reply carries none (``COMMIT`` as text leaves them set): they tell that a
      transaction began, or that autocommit is on, but not that one ended (see
      :func:`ends_unseen`). That none began is told while nothing has used the connection
      since the probe was made: asyncmy notes the time each cursor is made, and whatever
      else could begin one (``begin()``, a write through ``query()``) sets the flags;
    - sqlite3 and aiosqlite: ``in_transaction``.
    """
    raw = getattr(dbapi_connection, "driver_connection", None) or dbapi_connection
    family = "mysql" if dialect_name == "mariadb" else dialect_name
    if family == "postgresql":
        info = getattr(raw, "info", None)
        if info is not None and hasattr(info, "transaction_status"):
            return lambda: _pg_state(info)
        if callable(getattr(raw, "is_in_transaction", None)):
            return lambda: IN_TRANSACTION if raw.is_in_transaction() else NO_TRANSACTION
        return None
    if family == "mysql":
        if type(raw).__module__.startswith("asyncmy"):
            made = getattr(raw, "last_usage", None)  # None: an asyncmy that does not note it
            return lambda: _asyncmy_state(
                raw.server_status, made is not None and raw.last_usage == made
            )
        if hasattr(raw, "server_status"):
            return lambda: _mysql_state(raw.server_status)
        return None
    if family == "sqlite" and hasattr(raw, "in_transaction"):
        return lambda: IN_TRANSACTION if raw.in_transaction else NO_TRANSACTION
    return None


def ends_unseen(dialect_name: str, dbapi_connection: Any) -> str | None:
    """For a driver whose probe cannot see a transaction end: the query that asks the server
    (one round trip, at teardown, only after a transaction was seen open)."""
    raw = getattr(dbapi_connection, "driver_connection", None) or dbapi_connection
    if dialect_name in ("mysql", "mariadb") and type(raw).__module__.startswith("asyncmy"):
        return "SELECT @@in_transaction"
    return None


def _asyncmy_state(status: int, unused: bool) -> int | None:
    if status & _MYSQL_AUTOCOMMIT:
        return AUTOCOMMIT
    if status & _MYSQL_IN_TRANS:
        return IN_TRANSACTION
    return NO_TRANSACTION if unused else None


def _pg_state(info: Any) -> int | None:
    try:
        status = int(info.transaction_status)
    except Exception:  # closed
        return None
    if status in _PG_OPEN:
        return IN_TRANSACTION
    return NO_TRANSACTION if status == 0 else None


def _mysql_state(status: int) -> int:
    if status & _MYSQL_AUTOCOMMIT:
        return AUTOCOMMIT
    return IN_TRANSACTION if status & _MYSQL_IN_TRANS else NO_TRANSACTION
