"""``create_all`` / ``drop_all`` of the built schema inside a test: nearly free.

Suites whose fixtures build their tables around every test (``Base.metadata.create_all(engine)``
before, ``drop_all`` after, through a routed engine or the test's connection) pay for that DDL
in every test, and on MySQL/MariaDB cannot run it at all (DDL commits). When the tables are
those the plugin built into the test database (``alchemy_metadata``), neither needs to reach
the server:

- ``create_all`` of tables that all exist there (the test ran no DDL of its own yet) creates
  nothing, as ``checkfirst`` would find: it is skipped, and so are its N ``has_table`` queries;
- ``drop_all`` of such tables is recorded, not sent (:class:`PendingDrop`). The sandbox's
  rollback at the end of the test would undo it anyway. If the test uses the connection again
  before it ends (a statement, or a new transaction), the ``DROP``s are sent first (see
  :meth:`Savepoints.settle_drop`), so what the test sees is what a real ``drop_all`` leaves;
  a rollback of the transaction that dropped them cancels them, as the server would, and
  other transactions ending (a scoped session removed at the end of the test) leave them be.

Anything else takes SQLAlchemy's own path: other tables, DDL event listeners on the metadata
or its tables (native enums, ``DDL`` hooks), sequences, ``checkfirst=False``, a test that ran
DDL itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import MetaData

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy import Table
    from sqlalchemy.engine import Connection

    from pytest_alchemy.sandbox import Sandbox

_installed = False


@dataclass
class PendingDrop:
    """Tables a ``drop_all`` dropped, not sent yet; ``owner``: the ledger transaction it ran
    in (None: the outer one)."""

    tables: list[Table]
    owner: object | None
    party: object  # the connection that dropped them (see Savepoints.wrote)

    def statements(self, connection: Connection) -> list[str]:
        from sqlalchemy.schema import DropTable

        dialect = connection.dialect
        return [str(DropTable(table).compile(dialect=dialect)) for table in self.tables]


def install(find: Callable[[Connection], Sandbox | None]) -> None:
    """Route ``Connection._run_ddl_visitor`` (what ``create_all``/``drop_all`` call, on an
    engine too) through :func:`_shortcut` for connections ``find`` places in a sandbox."""
    global _installed
    if _installed:
        return
    _installed = True
    from sqlalchemy.engine import Connection

    original = Connection._run_ddl_visitor

    def _run_ddl_visitor(self: Connection, visitor: Any, element: Any, **kwargs: Any) -> None:
        sandbox = find(self) if isinstance(element, MetaData) else None
        if sandbox is None or not _shortcut(sandbox, self, visitor, element, kwargs):
            original(self, visitor, element, **kwargs)

    Connection._run_ddl_visitor = _run_ddl_visitor  # type: ignore[method-assign,assignment]


def _listened(metadata: MetaData, tables: list[Table], *events: str) -> bool:
    """Whether DDL event listeners hang on the metadata or the tables (they must run)."""
    for name in events:
        if len(getattr(metadata.dispatch, name)):
            return True
        if any(len(getattr(table.dispatch, name)) for table in tables):
            return True
    return False


def _shortcut(
    sandbox: Sandbox, connection: Connection, visitor: Any, metadata: MetaData, kwargs: Any
) -> bool:
    """Handle a ``create_all``/``drop_all`` without the server; False: run it for real."""
    from sqlalchemy.sql.ddl import SchemaDropper, SchemaGenerator

    built = sandbox.built_tables
    if not built or sandbox.ran_ddl or metadata._sequences or not kwargs.get("checkfirst", True):
        return False
    given = kwargs.get("tables")
    tables = list(metadata.sorted_tables if given is None else given)
    if not tables or any((t.schema, t.name) not in built for t in tables):
        return False
    ledger = sandbox.savepoints
    if not connection.in_transaction():
        connection.begin()  # as its first has_table() would have: a close then rolls back
    with ledger.lock:
        pending = sandbox.pending_drop
        if visitor is SchemaGenerator:  # every table is there: checkfirst would create nothing
            return pending is None and not _listened(
                metadata, tables, "before_create", "after_create"
            )
        if visitor is SchemaDropper:
            if pending is not None or _listened(metadata, tables, "before_drop", "after_drop"):
                return False
            party = connection.connection
            owner = party if ledger.holds(party) else None
            sandbox.pending_drop = PendingDrop(list(reversed(tables)), owner, party)
            return True
    return False
