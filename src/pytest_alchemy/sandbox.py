"""The sync sandbox: one connection, an outer transaction, sessions that join it.

A test's sessions join the connection with ``join_transaction_mode="create_savepoint"``: a
session's commit releases its SAVEPOINT and the next use opens a fresh one, a rollback returns
to it, and teardown rolls back the outer transaction, which is never committed.

The connection itself is kept across tests (see :class:`ConnectionKeeper`): a test pays for
BEGIN/ROLLBACK and its sessions' savepoints, not for a pool checkout and reset.

Every savepoint on a sandbox's connection goes through one :class:`Savepoints` ledger, whoever
asks for it: the test's sessions, and the application's engines routed onto the same connection
(see :mod:`pytest_alchemy.routing`). Several parties then share one stack of savepoints, and the
ledger keeps it consistent when they do not finish in the order they started.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import weakref
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import event

from pytest_alchemy import dialects
from pytest_alchemy.config import THREAD_WAIT_DEFAULT
from pytest_alchemy.errors import EventLoopMismatchError, SandboxBrokenError
from pytest_alchemy.statements import counted_tables, proves_read_only

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from sqlalchemy.engine import Connection, Engine, RootTransaction
    from sqlalchemy.engine.interfaces import DBAPICursor, Dialect, ExecutionContext
    from sqlalchemy.orm import Session
    from sqlalchemy.pool import PoolProxiedConnection

    from pytest_alchemy.counters import Counters
    from pytest_alchemy.ddl import PendingDrop

M = TypeVar("M")

#: Statements that change the schema: after one, the built tables are no longer known as built.
_DDL = re.compile(r"\s*(?:CREATE|DROP|ALTER|RENAME|TRUNCATE|COMMENT\s+ON)\b", re.I)

#: The join mode every sandboxed session uses (see shared pitfalls 2-5 in the docs).
JOIN_MODE = "create_savepoint"


class Watch:
    """Listeners on one Connection that keep a test inside its sandbox.

    Installed once per Connection; the sandbox currently using the connection sets
    :attr:`owner`. Statements that would end the outer transaction (``COMMIT``, MySQL DDL, ...)
    and ``Connection.commit()`` are refused before they reach the database, and recorded so the
    test fails at teardown even if the code under test swallowed the error.
    """

    def __init__(self, connection: Connection, loop: asyncio.AbstractEventLoop | None) -> None:
        self.owner: Sandbox | None = None
        self.maker: tuple[Any, dict[str, Any]] | None = None  # see cached_maker()
        self.internal = False
        self.loop = loop
        self.driver = connection.dialect.driver
        self._deferred: list[str] | None = None  # see deferred_constraints()
        self.guard: re.Pattern[str] = dialects.statement_guard(connection.dialect.name)
        self.session_state = dialects.session_state_pattern(connection.dialect.name)
        install_savepoint_hooks(connection.dialect)
        event.listen(connection, "before_cursor_execute", self._before_cursor_execute)
        event.listen(connection, "after_execute", self._after_execute)
        event.listen(connection, "commit", self._commit)
        event.listen(connection, "rollback", self._rollback)

    def deferred_constraints(self, connection: Connection) -> list[str]:
        """The INITIALLY DEFERRED constraints of the connection's PostgreSQL database, asked
        once per connection (an empty list elsewhere, and where there are none)."""
        if self._deferred is None:
            self._deferred = []
            if connection.dialect.name == "postgresql":
                with self.own_statements():
                    rows = connection.exec_driver_sql(_DEFERRED_CONSTRAINTS).scalars()
                    self._deferred = sorted(set(rows))
        return self._deferred

    @contextlib.contextmanager
    def own_statements(self) -> Iterator[None]:
        """The plugin's own statements: neither guarded nor counted in the ledger."""
        internal, self.internal = self.internal, True
        try:
            yield
        finally:
            self.internal = internal

    def refuse(self, problem: str) -> None:
        """Fail now, and make the test fail at teardown even if the error is swallowed."""
        __tracebackhide__ = True
        owner = self.owner
        if owner is not None and owner.problem is None:
            owner.problem = problem
        raise SandboxBrokenError(problem)

    def _before_cursor_execute(
        self,
        conn: Connection,
        cursor: DBAPICursor,
        statement: str,
        parameters: Any,
        context: ExecutionContext | None,
        executemany: bool,
    ) -> None:
        if self.owner is None:
            return
        if self.loop is not None:
            self.check_loop()
        if self.session_state is not None and self.session_state.match(statement):
            self.owner.changed_session = True
        if self.guard.match(statement) and not self.internal:
            first_line = statement.strip().splitlines()[0][:80]
            self.refuse(
                f"pytest-alchemy refused to run {first_line!r}: it would end the test's "
                f"outer transaction, and what the test wrote would survive it. "
                f"{dialects.refusal_advice(statement)}"
            )

    def _after_execute(self, conn: Connection, *args: Any) -> None:
        if self.owner is not None:
            self.owner.savepoints.acting(None, "execute")  # an ORM execute ends with it

    def check_loop(self) -> None:
        __tracebackhide__ = True
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not self.loop:
            message = (
                "async_db_connection was opened on one event loop and is used from another. "
                f"A {self.driver} connection belongs to the loop it was opened on: the async "
                "fixtures and the test must share one loop. With pytest-asyncio set both "
                "asyncio_default_fixture_loop_scope and asyncio_default_test_loop_scope to "
                "'session' in your ini (or give the test's asyncio marker the same loop_scope "
                "as the fixtures); with anyio use one anyio_backend for fixtures and tests. "
                "Starlette's TestClient runs the app on its own loop: use "
                "httpx.AsyncClient(transport=httpx.ASGITransport(app)) instead."
            )
            # Raised inside an app on another loop it often becomes a bare HTTP 500: the test
            # fails with it at teardown all the same.
            owner = self.owner
            if owner is not None and owner.raised is None:
                owner.raised = f"EventLoopMismatchError: {message}"
            raise EventLoopMismatchError(message)

    def _commit(self, conn: Connection) -> None:
        if self.owner is not None and not self.internal:
            self.refuse(
                "pytest-alchemy refused Connection.commit() on the sandbox's connection: it "
                "would commit the test's outer transaction. Use session.commit() (it releases "
                "the session's savepoint), or `with db_connection.begin_nested():` for Core work."
            )

    def _rollback(self, conn: Connection) -> None:
        owner = self.owner
        if owner is not None and not self.internal and owner.problem is None:
            owner.problem = (
                "The test rolled back the sandbox's outer transaction (Connection.rollback() on "
                "db_connection), which also discarded what fixtures had written. Roll back a "
                "session instead, or use `with db_connection.begin_nested():` around Core work."
            )


_DEFERRED_CONSTRAINTS = (
    "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.conname) FROM pg_constraint c "
    "JOIN pg_namespace n ON n.oid = c.connamespace WHERE c.condeferred"
)

_watches: weakref.WeakKeyDictionary[Connection, Watch] = weakref.WeakKeyDictionary()


def watch(connection: Connection, loop: asyncio.AbstractEventLoop | None = None) -> Watch:
    """The Watch of ``connection``, installing it on first use."""
    found = _watches.get(connection)
    if found is None:
        found = _watches[connection] = Watch(connection, loop)
    return found


def cached_maker(connection: Connection, make: Callable[[], M]) -> M:
    """The session factory of ``connection``, made once and reset to its settings each test.

    A kept connection serves many tests; a new ``sessionmaker`` per test would also define a
    new Session subclass per test, whose event set-up made ``Session.close()`` cost ~0.35 ms.
    ``configure()`` calls a test makes on the factory are undone for the next test.
    """
    found = _watches.get(connection)
    if found is None:
        return make()
    if found.maker is None:
        maker = make()
        found.maker = (maker, dict(maker.kw))  # type: ignore[attr-defined]
        return maker
    maker, settings = found.maker
    maker.kw = dict(settings)
    return maker


def sandbox_of(connection: Connection) -> Sandbox | None:
    """The sandbox currently running on ``connection``, if any."""
    found = _watches.get(connection)
    return found.owner if found is not None else None


class Sandbox:
    """One test's transactional sandbox on ``connection``.

    Sync and async share this class: the async side drives teardown through its own awaits
    (see :mod:`pytest_alchemy.aio`) around :meth:`begin_teardown`.
    """

    def __init__(self, connection: Connection, loop: asyncio.AbstractEventLoop | None = None):
        self.connection = connection
        self.problem: str | None = None
        #: An error raised to code that may have swallowed it (an app on another loop turns
        #: it into an HTTP 500): the test fails with it at teardown unless it failed already.
        self.raised: str | None = None
        self.changed_session = False  # a MySQL SET that a rollback does not undo
        self._watch = watch(connection, loop)
        self._watch.owner = self
        tag_sessions()
        self._ended = False
        self.transaction: RootTransaction | None = None
        self.savepoints = Savepoints(self)
        #: The outer transaction ended behind the plugin's back: the database needs restoring.
        self.escaped = False
        self._probe: Callable[[], int | None] | None = None
        self.ask_at_teardown: str | None = None
        self._seen_open = False  # the driver has reported the outer transaction open
        #: Held around each statement and ledger change on the connection, which threads share.
        self.lock = TurnLock()
        #: Set for a test whose id counters are reset after it (see counters.py).
        self.counters: Counters | None = None
        self._counted: set[str] | None = set()  # tables inserted into; None: any table
        self._counters_reset = False
        #: The tables the plugin built into this database, as (schema, name): create_all and
        #: drop_all of them cost nothing here (see ddl.py).
        self.built_tables: frozenset[tuple[str | None, str]] = frozenset()
        self.ran_ddl = False  # the test ran DDL: the built tables may not be as built
        self.pending_drop: PendingDrop | None = None
        self._quiet: int | None = None  # see nothing_to_roll_back

    def count(self, statement: str) -> None:
        """Note the tables whose id counters ``statement`` may advance, if counters reset."""
        if self.counters is None or self._counted is None:
            return
        tables = counted_tables(statement)
        if tables is None:
            self._counted = None
        else:
            self._counted |= tables

    @property
    def counters_to_reset(self) -> bool:
        return self.counters is not None and self._counted != set() and not self._counters_reset

    def reset_counters(self, *, inside: bool) -> None:
        """Put back the id counters the test advanced: inside the outer transaction where
        the backend allows (PostgreSQL's setval is not undone by the rollback), else after
        the rollback. A failure inside is retried after; one after fails the test.
        """
        counters = self.counters
        if (
            counters is None
            or not self.counters_to_reset
            or (inside and not counters.resets_inside)
        ):
            return
        statements = counters.reset_statements(self._counted)
        try:
            for statement in statements:
                self.connection.exec_driver_sql(statement)
            if not inside:
                self.connection.rollback()  # ends what the statements began; commits nothing
            self._counters_reset = True
        except Exception as exc:
            if not inside:
                self.problem = self.problem or (
                    f"Resetting the test's id counters (alchemy_reset_sequences) failed: "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                )

    @property
    def watch(self) -> Watch:
        return self._watch

    def start(self) -> None:
        """Open the outer transaction (sync connections)."""
        if self.connection.in_transaction():  # left over by a test that escaped; never commit
            with self._watch.own_statements():
                self.connection.rollback()
        restart_savepoint_names(self.connection)
        self.transaction = self.connection.begin()
        dialects.begin_now(self.connection)
        self.watch_transaction()

    def watch_transaction(self) -> None:
        """From now on, ask the driver after each statement whether the outer transaction
        still stands (see :meth:`check_transaction`)."""
        dbapi_connection = self.connection.connection.dbapi_connection
        name = self.connection.dialect.name
        self._probe = dialects.transaction_probe(name, dbapi_connection)
        #: Asked of the server at teardown, where the driver cannot see an end (asyncmy).
        self.ask_at_teardown = dialects.ends_unseen(name, dbapi_connection)
        self._seen_open = False

    def transaction_begun(self) -> bool:
        """Whether the driver may have begun the outer transaction (True where it cannot
        tell)."""
        probe = self._probe
        return probe is None or probe() != dialects.NO_TRANSACTION

    def transaction_restarted(self) -> None:
        """The plugin rolled the driver's transaction back (see Savepoints): the end it
        will see is not an escape."""
        self._seen_open = False

    def nothing_to_roll_back(self) -> bool:
        """Whether the test ran no statement and the driver holds no transaction: the
        teardown's ROLLBACK would only cost a round trip (PyMySQL sends it regardless)."""
        return self.savepoints.statements == 0 and not self.transaction_begun()

    @property
    def asks_server(self) -> str | None:
        """The query to confirm at teardown that the outer transaction stands, if needed."""
        if self.ask_at_teardown and self._seen_open and not (self.escaped or self._ended):
            return self.ask_at_teardown
        return None

    def server_says(self, still_open: bool) -> None:
        """What the server answered to :attr:`asks_server`."""
        if not still_open:
            self._probe = lambda: dialects.NO_TRANSACTION
            self.check_transaction(None)

    def check_transaction(self, statement: str | None, *, before: bool = False) -> str | None:
        """Whether the outer transaction has ended; returns the problem if it just did.

        Asked of the driver's own state, with no round trip, before and after every statement
        on the connection and at teardown: so it catches what no statement text shows
        (``/* */ COMMIT``, ``SELECT 1; COMMIT``, ``dbapi_connection.commit()``, MySQL's
        ``SET autocommit=1`` and implicit commits). A driver may report no transaction until
        the first statement begins one; only an end after that counts.
        """
        probe = self._probe
        if probe is None or self.escaped:
            return None
        state = probe()
        if state == dialects.IN_TRANSACTION:
            self._seen_open = True
            return None
        if not (state == dialects.AUTOCOMMIT or (state is not None and self._seen_open)):
            return None
        self.escaped = True
        shown = repr(statement.strip().splitlines()[0][:80]) if statement else None
        if shown is None:
            where = "during the test, where no statement showed it (a commit or rollback on "
            where += "the raw DBAPI connection?)"
        elif before:
            where = f"before the statement {shown}, where no statement showed it (a commit "
            where += "or rollback on the raw DBAPI connection?)"
        else:
            where = f"with the statement {shown}"
        if state == dialects.AUTOCOMMIT:
            where += ", and autocommit is on"
        problem = (
            f"The test's outer transaction ended {where}: what the test wrote until then was "
            f"committed for real, and what came after ran outside the sandbox. Commit through "
            f"the Session (session.commit() releases the sandbox's savepoint), never with "
            f"COMMIT statements, dbapi_connection.commit() or SET autocommit."
        )
        if self.problem is None:
            self.problem = problem
        return problem

    def needs_invalidation(self) -> bool:
        """Whether teardown cannot trust the connection's state after a rollback."""
        trans = self.transaction
        if self.connection.closed or trans is None or not trans.is_active:
            return True
        return bool(self.problem) or self.changed_session

    def begin_teardown(self) -> str | None:
        """Decide how to end the sandbox: ``"rollback"``, ``"invalidate"``, ``"reset"`` or None.

        Idempotent: only the first call returns an action. Statements run by the action are
        the plugin's own, so the guard lets them through until :meth:`end_teardown`.
        """
        if self._ended:
            return None
        self._ended = True
        self.pending_drop = None  # the rollback undoes it: never sent
        self._watch.internal = True
        if self.connection.closed:
            self.problem = self.problem or (
                "The test closed the sandbox's connection (db_connection.close()); the "
                "connection belongs to the fixture, which closes it itself."
            )
            return None
        self.check_transaction(None)
        if not self.needs_invalidation():
            if self.nothing_to_roll_back():
                self._quiet = id(self.connection.connection)
                _quiet_rollbacks.add(self._quiet)
            return "rollback"
        # SQLAlchemy's view of the transaction can no longer be trusted (a refused commit, an
        # outer rollback): throwing the DBAPI connection away rolls back whatever the server
        # still holds. An in-memory SQLite connection *is* the database, so roll it back
        # at the DBAPI level instead.
        return "reset" if dialects.is_memory(self.connection.engine.url) else "invalidate"

    def teardown_failed(self, exc: BaseException) -> None:
        self.problem = self.problem or f"Rolling back the sandbox failed: {exc!r}"

    def end_teardown(self) -> None:
        if self._quiet is not None:
            _quiet_rollbacks.discard(self._quiet)
        self.savepoints.clear()
        self._watch.internal = False
        self._watch.owner = None

    def end(self) -> None:
        """Roll the outer transaction back; idempotent. Problems are left in :attr:`problem`."""
        action = self.begin_teardown()
        try:
            if action == "rollback":
                assert self.transaction is not None
                self.reset_counters(inside=True)
                self.transaction.rollback()
                self.reset_counters(inside=False)
            elif action == "invalidate":
                self.connection.invalidate()
            elif action == "reset":
                reset(self.connection)
        except Exception as exc:
            self.teardown_failed(exc)
            if not self.connection.closed:
                self.connection.invalidate()
        finally:
            self.end_teardown()


class _Savepoint:
    __slots__ = ("group", "live", "name", "owner", "party", "sent", "writers")

    def __init__(self, owner: object, party: object, name: str, *, sent: bool = True) -> None:
        self.owner = owner
        self.party = party  # the pooled connection whose code opened it
        self.name = name
        self.live = True
        #: Whether the SAVEPOINT was sent (see Savepoints: it waits for the first write).
        self.sent = sent
        self.writers: set[int] = set()  # ids of the writers (see Savepoints.wrote) it holds
        #: The session whose transaction it is, for sessions that share one connection.
        self.group: int | None = None

    @property
    def writer(self) -> int:
        """Who writes inside it: its session, or else its party."""
        return self.group if self.group is not None else id(self.party)


#: The statements of SQLAlchemy's do_savepoint & co. on the backends the plugin supports.
_SAVEPOINT_SQL = {
    "do_savepoint": "SAVEPOINT ",
    "do_release_savepoint": "RELEASE SAVEPOINT ",
    "do_rollback_to_savepoint": "ROLLBACK TO SAVEPOINT ",
}


class Savepoints:
    """The stack of savepoints on a sandbox's connection, shared by everyone using it.

    An *owner* is whoever opened a savepoint: a ``(Connection, name)`` pair for SQLAlchemy's
    own ``begin_nested()`` and session savepoints, or a pooled connection for an application
    transaction (see :mod:`pytest_alchemy.routing`); its *party* is the pooled connection its
    statements come from. Names are ``sa_savepoint_<depth>``, unique within the stack (MySQL
    replaces a savepoint of the same name) and the same in every test (asyncpg caches prepared
    statements by their text).

    Parties that finish out of order, as concurrent tasks, threads or a session held open
    across another one do, are handled as far as one connection allows:

    - releasing a savepoint with a live one above it is deferred until that one ends
      (``RELEASE`` would release both);
    - rolling back a savepoint whose party wrote nothing is a release: nothing is undone,
      nothing above it is disturbed (a read-only session closing late);
    - a savepoint that ends holding no writes stays established for the next one to reuse, so
      read-only transactions cost no round trips to end and begin;
    - rolling back one that does undoes everything written since it opened, by anyone; when
      that includes another party's work, :attr:`Sandbox.problem` says so and the test fails.

    Savepoints opened before anything was written in the outer transaction are *deferred*
    where the driver begins transactions by itself (PostgreSQL, MySQL): the SAVEPOINT is sent
    just before the first statement that may write (with any deferred below it), so a test
    that only reads never pays for one. Up to that write nothing is there to undo: the
    rollback of a deferred savepoint sends nothing, and after a failed read (PostgreSQL then
    refuses everything until a rollback) it rolls the driver's transaction back, which undoes
    nothing either, and the driver begins the next one by itself. The bottom one is never sent
    at all: it stands for the outer transaction's start, where nothing had been written, so
    rolling back to it rolls the driver's transaction back (the driver begins the next one),
    and releasing it (the application's first commit) sends nothing. A test that writes and
    commits once pays no savepoint statement.
    """

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox
        self._stack: list[_Savepoint] = []
        self._abandon = False
        self._acting: dict[int, tuple[int, str]] = {}  # thread -> (session, "flush"/"execute")
        #: Nothing has been written in the outer transaction yet (savepoints may be deferred).
        self._clean = dialects.begins_implicitly(sandbox.connection.dialect)
        self._failed_clean = False  # a statement failed while clean (see _failed)
        #: Statements the sandbox's connection ran for the test (the plugin's own aside).
        self.statements = 0

    @property
    def lock(self) -> TurnLock:
        return self._sandbox.lock

    def __len__(self) -> int:
        return len(self._stack)

    def _find(self, owner: object) -> int | None:
        stack = self._stack
        for index in range(len(stack) - 1, -1, -1):
            if stack[index].live and stack[index].owner == owner:
                return index
        return None

    def holds(self, owner: object) -> bool:
        """Whether ``owner`` has a savepoint open."""
        return self._find(owner) is not None

    def tag(self, owner: object, group: int) -> None:
        """Mark ``owner``'s savepoint as a transaction of session ``group``: sessions that share
        the test's connection (db_sessionmaker's) are one party, told apart this way."""
        index = self._find(owner)
        if index is not None:
            self._stack[index].group = group

    def adopt(self, owner: object) -> bool:
        """Take over the savepoint ``owner`` opened for a raw cursor, if any (True).

        Its writes are tracked from now on, so what was assumed of raw use is dropped.
        """
        self.settle_drop()
        index = self._find(owner)
        if index is None:
            return False
        self._stack[index].writers.discard(self._stack[index].writer)
        return True

    def _run(self, method: str, name: str) -> None:
        """Send a savepoint statement of the ledger's own: as text, as SQLAlchemy's dialects
        write it, through the same hooks and events as a compiled one, but without compiling
        a ``SavepointClause`` for every one (about 15 us each)."""
        self._sandbox.connection.exec_driver_sql(_SAVEPOINT_SQL[method] + name)

    def open(self, owner: object, party: object) -> None:
        self.settle_drop()
        stack = self._stack
        if stack and not stack[-1].live and not stack[-1].writers:
            entry = stack[-1]  # established and clean: reused, no round trip
            entry.owner, entry.party, entry.live = owner, party, True
            entry.group = None
            return
        entry = _Savepoint(owner, party, self._fresh_name(), sent=self._must_send_now())
        if entry.sent:
            self._run("do_savepoint", entry.name)
        stack.append(entry)

    def _must_send_now(self) -> bool:
        """Whether a savepoint opened now must be sent now. It can wait for the first write
        while nothing has been written, and, for the first one, the driver has not begun the
        outer transaction yet, so nothing unseen (a raw DBAPI cursor) can have written in it.
        """
        if not self._clean:
            return True
        if any(not entry.sent for entry in self._stack):
            return False
        if self._sandbox.transaction_begun():
            self._clean = False
            return True
        return False

    def _send_deferred(self) -> None:
        """Before the first write: send the deferred savepoints, in order (with the driver's
        BEGIN where it allows); from now on every savepoint is sent when it opens.

        All but the bottom one: it marks the outer transaction's start, where nothing had been
        written, so it stands for that start and is never sent (a round trip saved per test
        that writes). Rolling back to it rolls the driver's transaction back (see
        :meth:`rollback`); releasing it sends nothing.
        """
        unsent = [entry for entry in self._stack[1:] if not entry.sent]
        dbapi_connection = self._sandbox.connection.connection.dbapi_connection
        if unsent and dialects.begin_with_savepoints(dbapi_connection, [e.name for e in unsent]):
            for entry in unsent:
                entry.sent = True
        for entry in unsent:
            if not entry.sent:
                self._run("do_savepoint", entry.name)
                entry.sent = True
        self._clean = False

    def _failed(self, party: object) -> None:
        """A statement of ``party`` failed: on PostgreSQL its transaction is aborted, and only
        a rollback recovers from that (a failed statement counts as a write)."""
        if self._clean:
            self._failed_clean = True  # nothing written yet: a rollback of the driver's
            return  # transaction recovers exactly (see rollback)
        if self._stack:
            self._stack[-1].writers.add(self._writer(party))

    def _stands_for_start(self, entry: _Savepoint) -> bool:
        """Whether ``entry`` is the bottom savepoint that was never sent, standing for the
        outer transaction's start, after something was written (see :meth:`_send_deferred`)."""
        return not entry.sent and not self._clean

    def _restart_clean(self) -> None:
        """Roll the driver's transaction back; the driver begins the next one by itself. After
        a failed statement before anything was written, that undoes nothing; to the savepoint
        that stands for the outer transaction's start, it undoes what was written since."""
        self._failed_clean = False
        self._clean = dialects.begins_implicitly(self._sandbox.connection.dialect)
        sandbox = self._sandbox
        with sandbox.watch.own_statements():
            sandbox.connection.connection.dbapi_connection.rollback()  # type: ignore[union-attr]
        sandbox.transaction_restarted()

    def _fresh_name(self) -> str:
        """A name no savepoint on the stack has (MySQL replaces a savepoint of the same
        name); ``sa_savepoint_<depth>`` unless a re-established one took it."""
        taken = {entry.name for entry in self._stack}
        depth = len(self._stack) + 1
        while f"sa_savepoint_{depth}" in taken:
            depth += 1
        return f"sa_savepoint_{depth}"

    def establish(self) -> None:
        """Open a first savepoint that nobody holds yet, for the next begin to reuse."""
        with self.lock:
            if self._stack:
                return
            entry = _Savepoint(None, None, "sa_savepoint_1", sent=self._must_send_now())
            if entry.sent:
                self._run("do_savepoint", entry.name)
            entry.live = False
            self._stack.append(entry)

    def wrote(self, party: object, statement: str | None) -> None:
        """Note a statement of ``party`` (None: one that failed); a write lands on top.

        Whatever its text does not prove read-only counts as a write (``SELECT f()`` may
        insert; see :mod:`pytest_alchemy.statements`). A failed statement counts as a write:
        on PostgreSQL it aborts the transaction, and only ``ROLLBACK TO`` recovers from that.
        """
        if statement is None or not proves_read_only(statement):
            if self._clean:
                self._send_deferred()
            if self._stack:
                self._stack[-1].writers.add(self._writer(party))

    def acting(self, session: int | None, kind: str = "") -> None:
        """The session whose flush or ORM execute this thread is running (None: done)."""
        me = threading.get_ident()
        if session is None:
            found = self._acting.get(me)
            if found is not None and (not kind or found[1] == kind):
                del self._acting[me]
        else:
            self._acting[me] = (session, kind)

    def _writer(self, party: object) -> int:
        """Who wrote a statement of ``party``. Statements carry their connection, not their
        session: for sessions sharing one connection it is the session whose flush or ORM
        execute is running, else the one that began last and is still open (the innermost
        live savepoint of that party); for everyone else, the party itself."""
        stack = self._stack
        acting = self._acting.get(threading.get_ident())
        if acting is not None and any(
            e.live and e.group == acting[0] and e.party is party for e in stack
        ):
            return acting[0]
        for entry in reversed(stack):
            if entry.live and entry.party is party:
                return entry.writer
        return id(party)

    def execute(self, party: object, statement: str, run: Callable[[], None]) -> None:
        """Run ``party``'s statement under the lock (threads may share the connection)."""
        sandbox = self._sandbox
        with self.lock:
            self.settle_drop()
            if _DDL.match(statement):
                sandbox.ran_ddl = True
            self.wrote(party, statement)
            self.statements += 1
            sandbox.count(statement)
            problem = sandbox.check_transaction(statement, before=True)
            if problem is None:
                try:
                    run()
                except BaseException:
                    self._failed(party)
                    raise
                problem = sandbox.check_transaction(statement)
            if problem is not None:
                raise SandboxBrokenError(problem)

    def release(self, owner: object) -> None:
        pending = self._sandbox.pending_drop
        if pending is not None and pending.owner == owner:
            pending.owner = None  # committed: it belongs to the transaction below now
        index = self._find(owner)
        if index is None:
            return  # rolled back already, with a savepoint below it
        bottom = self._stack[0]
        outermost = bottom.sent or self._stands_for_start(bottom)
        if index == 0 and outermost and not any(entry.live for entry in self._stack[1:]):
            self._check_deferred()  # the application's outermost commit
        self._stack[index].live = False
        if index == len(self._stack) - 1:
            self._settle()

    def _check_deferred(self) -> None:
        """Check deferred constraints where production checks them: at the application's
        outermost commit, which the sandbox turns into a RELEASE (the outer transaction, which
        never commits, would never check them). A violation raises from the commit, as in
        production, and the work since that savepoint is rolled back, as a failed COMMIT rolls
        back its transaction.
        """
        sandbox = self._sandbox
        connection, watch = sandbox.connection, sandbox.watch
        names = watch.deferred_constraints(connection)
        if not names:
            return  # no deferred constraint in the schema: nothing to pay
        with watch.own_statements():
            try:
                connection.exec_driver_sql("SET CONSTRAINTS ALL IMMEDIATE")
            except BaseException:
                # A failed COMMIT ends the transaction; SQLAlchemy, whose RELEASE failed, will
                # not roll this savepoint back, so the sandbox does, as the server would.
                entry = self._stack[0]
                with contextlib.suppress(Exception):
                    if entry.sent:
                        self._run("do_rollback_to_savepoint", entry.name)
                    else:
                        self._restart_clean()
                del self._stack[1:]
                entry.live, entry.writers = False, set()
                raise
            connection.exec_driver_sql(f"SET CONSTRAINTS {', '.join(names)} DEFERRED")

    def _settle(self) -> None:
        """Release the finished savepoints at the top of the stack, in one statement.

        One finished savepoint that holds no writes is left established instead, for the
        next one to reuse: a read-only transaction then costs no round trip to end, and the
        next begin none to start.
        """
        stack = self._stack
        low = len(stack)
        while low > 0 and not stack[low - 1].live:
            low -= 1
        if low == len(stack) or (low == len(stack) - 1 and not stack[low].writers):
            return
        if not stack[low].sent:  # deferred, or standing for the outer transaction's start
            sent = [entry for entry in stack[low:] if entry.sent]
            if sent:
                self._run("do_release_savepoint", sent[0].name)
            del stack[low:]
            return
        self._run("do_release_savepoint", stack[low].name)
        if low:  # what they held now belongs to the savepoint below
            for entry in stack[low:]:
                stack[low - 1].writers |= entry.writers
        del stack[low:]

    @contextlib.contextmanager
    def abandoning(self) -> Iterator[None]:
        """Rollbacks meanwhile end their savepoints without sending anything (teardown)."""
        with self.lock:
            self._abandon = True
            try:
                yield
            finally:
                self._abandon = False

    def rollback(self, owner: object, *, everyone: bool = False) -> None:
        """Roll back ``owner``'s savepoint (see the class). With ``everyone``, the plugin's
        own rollback (a Hypothesis example's end): whoever wrote above it, it is undone,
        and that is no problem of the test's."""
        # A drop recorded since a savepoint opened (a later open would have sent it) is undone
        # with the transaction that dropped the tables; another party's rollback leaves it,
        # as it would on a connection of its own.
        pending = self._sandbox.pending_drop
        if pending is not None and (self._abandon or pending.owner == owner):
            self._sandbox.pending_drop = None
        index = self._find(owner)
        if index is None:
            return
        if self._abandon:
            self._stack[index].live = False  # its writes stay, held for the outer rollback
            return
        stack = self._stack
        entry = stack[index]
        start = self._stands_for_start(entry)
        if not entry.sent and not start:  # nothing was written since the outer transaction began
            if self._failed_clean:
                self._restart_clean()
            self.release(owner)
            return
        above = stack[index + 1 :]
        mine = entry.writer
        if not everyone and mine not in entry.writers and not any(mine in a.writers for a in above):
            # Its party wrote nothing since it opened (a read-only session closing, perhaps
            # late): nothing to undo, and what others wrote inside it stays.
            self.release(owner)
            return
        if start:
            self._restart_clean()  # nothing had been written when it opened: undoes the rest
        else:
            self._run("do_rollback_to_savepoint", entry.name)
        undone = stack[index:]
        foreign = any(writer != mine for a in undone for writer in a.writers)
        # The savepoint stays established, and holds nothing now: kept for reuse. Transactions
        # still open above it lost their savepoints with it; each gets a fresh one, so its own
        # rollback or commit later still means what it would on a connection of its own.
        survivors = [a for a in above if a.live]
        del stack[index + 1 :]
        entry.live = False
        entry.writers = set()
        for survivor in survivors:
            survivor.name = self._fresh_name()
            survivor.writers = set()
            survivor.sent = self._must_send_now()  # deferred again after a restart
            if survivor.sent:
                self._run("do_savepoint", survivor.name)
            stack.append(survivor)
        if foreign and not everyone and self._sandbox.problem is None:
            self._sandbox.problem = (
                "Two transactions were open at once on the test's connection (concurrent "
                "tasks or threads, or a session held open while another one wrote), and one "
                "rolled back. On the sandbox's single connection that also undid the other "
                "one's writes, which on separate connections would have survived. Commit or "
                "close one session before another writes, or give such a test real commits "
                "on connections of its own."
            )
        self._settle()

    def clear(self) -> None:
        self._stack.clear()
        self._sandbox.pending_drop = None

    def settle_drop(self) -> None:
        """Send the DROPs of a ``drop_all`` the sandbox had only recorded (see ddl.py): the
        test goes on using the connection, and must find the tables gone."""
        sandbox = self._sandbox
        pending = sandbox.pending_drop
        if pending is None or sandbox.watch.internal:  # the plugin's own statements need not
            return
        sandbox.pending_drop = None
        sandbox.ran_ddl = True
        connection = sandbox.connection
        statements = pending.statements(connection)
        if any(sandbox.watch.guard.match(statement) for statement in statements):
            sandbox.watch.refuse(
                "pytest-alchemy refused the DROP TABLEs of a drop_all() that the test kept "
                "using the database after: MySQL and MariaDB commit implicitly on DDL, so a "
                "sandbox cannot undo them. Drop the tables only at the end of the test (a "
                "fixture's teardown costs nothing: the sandbox rolls back), or DELETE their rows."
            )
        if self._clean:
            self._send_deferred()
        cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            for statement in statements:
                cursor.execute(statement)
        finally:
            cursor.close()
        self.wrote(pending.party, "DROP TABLE")


class TurnLock:
    """The lock every statement on the sandbox's connection runs under, re-entrantly.

    The routed engines hand every checkout the same DBAPI connection, which no driver lets two
    threads use at the same moment (Starlette's TestClient runs the app in a worker thread).
    Threads take turns statement by statement, not session by session: between one thread's
    statements any other may use the connection, as it would its own connection in production
    (a session the test thread holds open does not block a ``TestClient`` request), and the
    ledger sorts out transactions that overlap. A thread waits only while another one's
    statement is running, at most :attr:`timeout` seconds (``alchemy_thread_wait``), then
    fails saying why.
    """

    #: After a thread was told, its clean-up (the rollback as the error unwinds) waits this
    #: many times longer, so the error it was told is the one it raises.
    _CLEAN_UP = 10

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._told: set[int] = set()  # the threads told, whose next wait is longer
        self.timeout = THREAD_WAIT_DEFAULT  # the fixtures set alchemy_thread_wait

    def __enter__(self) -> None:
        if self._lock.acquire(False):  # free, or this thread's already: the common case
            if self._told:
                self._told.discard(threading.get_ident())
            return
        me = threading.get_ident()
        if self._lock.acquire(timeout=self.timeout * (self._CLEAN_UP if me in self._told else 1)):
            self._told.discard(me)
            return
        self._told.add(me)
        raise SandboxBrokenError(
            f"A thread waited {self.timeout:g} s for the test's database connection while "
            "another thread's statement on it kept running: all the test's threads share the "
            "sandbox's one connection, one statement at a time. A statement that waits for "
            "another thread (or for a lock held outside the sandbox) never ends. Raise the "
            "wait with the ini alchemy_thread_wait (seconds) if the statement is just slow."
        )

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def install_savepoint_hooks(dialect: Dialect) -> None:
    """Send a sandbox connection's savepoints and writes through its :class:`Savepoints`."""
    if dialect.__dict__.get("_alchemy_hooked"):
        return
    dialect._alchemy_hooked = True  # type: ignore[attr-defined]
    cls = type(dialect)

    def savepoint(
        method: str, op: Callable[[Savepoints, Connection, str], None], *, ends: bool = False
    ) -> Any:
        run = getattr(cls, method)

        def hook(connection: Connection, name: str) -> None:
            ledger = _ledger(connection)
            if ledger is None:
                run(dialect, connection, name)
            else:
                with ledger.lock:
                    if ends:
                        _let_end_out_of_order(connection, name)
                    op(ledger, connection, name)

        return hook

    def executing(method: str) -> Callable[..., None]:
        run = getattr(cls, method)

        def execute(cursor: DBAPICursor, statement: str, *args: Any) -> None:
            context = args[-1] if args else None
            connection = getattr(context, "root_connection", None)
            ledger = _ledger(connection) if connection is not None else None
            if ledger is None:
                run(dialect, cursor, statement, *args)
                return
            ledger.execute(
                connection.connection,  # type: ignore[union-attr]
                statement,
                lambda: run(dialect, cursor, statement, *args),
            )

        return execute

    dialect.do_savepoint = savepoint(  # type: ignore[method-assign]
        "do_savepoint", lambda ledger, conn, name: ledger.open((conn, name), conn.connection)
    )
    dialect.do_release_savepoint = savepoint(  # type: ignore[method-assign]
        "do_release_savepoint", lambda ledger, conn, name: ledger.release((conn, name)), ends=True
    )
    dialect.do_rollback_to_savepoint = savepoint(  # type: ignore[method-assign]
        "do_rollback_to_savepoint",
        lambda ledger, conn, name: ledger.rollback((conn, name)),
        ends=True,
    )
    run_rollback = cls.do_rollback

    def rollback(dbapi_connection: PoolProxiedConnection) -> None:
        if id(dbapi_connection) not in _quiet_rollbacks:
            run_rollback(dialect, dbapi_connection)

    dialect.do_rollback = rollback  # type: ignore[method-assign]
    dialect.do_execute = executing("do_execute")  # type: ignore[method-assign]
    dialect.do_execute_no_params = executing("do_execute_no_params")  # type: ignore[method-assign]
    dialect.do_executemany = executing("do_executemany")  # type: ignore[method-assign]


#: The pooled connections whose sandbox ends with nothing to roll back (see
#: Sandbox.nothing_to_roll_back): SQLAlchemy's rollback sends nothing for them.
_quiet_rollbacks: set[int] = set()


def _let_end_out_of_order(connection: Connection, name: str) -> None:
    """Let a savepoint of the test's connection end while a newer one is still open.

    Sessions of ``db_sessionmaker`` share the sandbox's one Connection, and SQLAlchemy keeps
    its savepoints as a chain that must unwind newest first: ending an older session's first
    warns "nested transaction already deassociated from connection" and leaves the chain
    pointing at an ended savepoint ("Can't reconnect until invalid savepoint transaction is
    rolled back"). On connections of their own they would end in any order, so the ended one
    is taken out of the chain here, just before SQLAlchemy unlinks it: it is made the chain's
    head for a moment, with the newest one as its predecessor, so unlinking it restores the
    newest. What the database does is the ledger's business (see :class:`Savepoints`).
    """
    newest = connection._nested_transaction  # SQLAlchemy's private chain of savepoints
    newer, found = None, newest
    while found is not None and getattr(found, "_savepoint", None) != name:
        newer, found = found, found._previous_nested
    if found is None or newer is None:
        return  # not SQLAlchemy's, or the newest one already: the ordinary case
    newer._previous_nested = found._previous_nested
    found._previous_nested = newest
    connection._nested_transaction = found


def _tag_session(session: Session, transaction: Any, connection: Connection) -> None:
    """After a session began on a sandbox's connection: its savepoint is its transaction."""
    ledger = _ledger(connection)
    if ledger is None:
        return
    found = transaction._connections.get(connection)
    name = getattr(found[1], "_savepoint", None) if found else None
    if name is not None:
        with ledger.lock:
            ledger.tag((connection, name), id(session))


_SESSIONS_TAGGED = False


def _session_ledger(session: Session) -> Savepoints | None:
    return _ledger(session.bind) if session.bind is not None else None  # type: ignore[arg-type]


def _flushing(session: Session, *args: Any) -> None:
    ledger = _session_ledger(session)
    if ledger is not None:
        ledger.acting(id(session), "flush")


def _executing(state: Any) -> None:
    ledger = _session_ledger(state.session)
    if ledger is not None:
        ledger.acting(id(state.session), "execute")


def _done(session: Session, *args: Any) -> None:
    ledger = _session_ledger(session)
    if ledger is not None:
        ledger.acting(None)


def tag_sessions() -> None:
    """Tell the ledger which session each savepoint on a sandbox's connection belongs to,
    and which session's flush or ORM execute a statement comes from."""
    global _SESSIONS_TAGGED
    if not _SESSIONS_TAGGED:
        from sqlalchemy.orm import Session

        event.listen(Session, "after_begin", _tag_session)
        event.listen(Session, "before_flush", _flushing)
        event.listen(Session, "do_orm_execute", _executing)
        for done in ("after_flush_postexec", "after_rollback", "after_soft_rollback"):
            event.listen(Session, done, _done)
        _SESSIONS_TAGGED = True


def _ledger(connection: Connection) -> Savepoints | None:
    found = _watches.get(connection)
    if found is None or found.owner is None or found.internal:
        return None
    return found.owner.savepoints


_SAVEPOINT_SEQ = "_Connection__savepoint_seq"  # SQLAlchemy's private per-Connection counter


def restart_savepoint_names(connection: Connection) -> None:
    """Number the test's savepoints from 1 again, as a fresh connection would.

    On a kept connection the names (sa_savepoint_N) would never repeat, so drivers that
    cache prepared statements by text (asyncpg) would prepare every SAVEPOINT, RELEASE and
    ROLLBACK TO anew: two round trips each instead of one.
    """
    if hasattr(connection, _SAVEPOINT_SEQ):
        setattr(connection, _SAVEPOINT_SEQ, 0)


def reset(connection: Connection) -> None:
    """Roll back at both levels: SQLAlchemy's transaction, and whatever the driver holds."""
    connection.rollback()  # also clears a transaction SQLAlchemy left inactive
    connection.connection.dbapi_connection.rollback()  # type: ignore[union-attr]


class ConnectionKeeper:
    """Holds one connection of an engine across tests, reconnecting when it went bad."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._connection: Connection | None = None

    def acquire(self) -> Connection:
        conn = self._connection
        if conn is not None and not (conn.closed or conn.invalidated) and _dead(conn):
            conn.invalidate()  # closed by the server while idle: not this test's fault
        if conn is None or conn.closed or conn.invalidated:
            if conn is not None:
                conn.close()
            conn = self._connection = self.engine.connect()
        return conn

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def _dead(connection: Connection) -> bool:
    return dialects.looks_dead(connection.connection.dbapi_connection)


def close_session_after(session: Session) -> None:
    """Close a session at teardown, leaving the sandbox to its own fixture.

    Fixtures torn down after the session's (a conftest's autouse ``drop_all`` on a routed
    engine, a fixture cleaning up through ``db_connection``) still run inside the sandbox,
    so it ends only with ``db_connection``. The session's transaction is abandoned, not
    rolled back: the outer rollback undoes it soon anyway, closing costs no round trip, and
    what the application committed inside it meanwhile is not undone for those fixtures.
    """
    sandbox = sandbox_of(session.bind) if session.bind is not None else None  # type: ignore[arg-type]
    with sandbox.savepoints.abandoning() if sandbox is not None else contextlib.nullcontext():
        session.close()
