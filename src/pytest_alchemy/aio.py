"""The async sandbox, and event loops handled so connections never cross them.

A pooled asyncio connection belongs to the loop that opened it; using it from another loop
gives "attached to a different loop", asyncpg's "another operation is in progress", or a hang.
So the plugin keeps one AsyncEngine (and one kept connection) *per event loop*:

- tests that share a loop (pytest-asyncio's module or session loop scope, anyio's runner) share
  the engine and its connection, and pay no connect per test;
- a test on its own function-scoped loop gets its own engine, disposed on that loop when the
  loop shuts down. The disposal rides on ``loop.shutdown_asyncgens()``, which
  ``asyncio.Runner`` (used by pytest-asyncio and anyio) calls before closing a loop, so
  connections are closed on their own loop instead of raising "Event loop is closed".

Using a connection from a loop other than its own raises :class:`EventLoopMismatchError`
before the driver is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pytest_alchemy import dialects
from pytest_alchemy.sandbox import Sandbox, reset, restart_savepoint_names

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    # Imported lazily at run time: sqlalchemy.ext.asyncio needs greenlet, which a sync-only
    # user of SQLAlchemy 2.1 may not have.
    from sqlalchemy.ext.asyncio import (
        AsyncConnection,
        AsyncEngine,
        AsyncSession,
        AsyncTransaction,
    )

#: Seconds an async teardown step may take before the connection is given up (invalidated).
TEARDOWN_TIMEOUT = 30.0


@dataclass
class LoopState:
    """The engine and kept connection of one event loop."""

    engine: AsyncEngine
    connection: AsyncConnection | None = None
    lifetime: AsyncIterator[None] | None = field(default=None, repr=False)
    #: The database was restored under the kept connection: replace it at the next use.
    expired: bool = False

    async def discard_connection(self) -> None:
        """Give up the kept connection and the pool's (the database behind them is gone)."""
        self.expired = False
        conn, self.connection = self.connection, None
        if conn is not None and not conn.invalidated:
            with contextlib.suppress(Exception):
                await conn.invalidate()
        await self.engine.dispose()

    async def acquire(self) -> AsyncConnection:
        if self.expired:
            await self.discard_connection()
        conn = self.connection
        if conn is not None and not (conn.closed or conn.invalidated):
            raw = conn.sync_connection.connection.dbapi_connection  # type: ignore[union-attr]
            if dialects.looks_dead(raw):  # closed by the server while idle
                with contextlib.suppress(Exception):
                    await conn.invalidate()
        if conn is None or conn.closed or conn.invalidated:
            if conn is not None:
                await conn.close()
            conn = self.connection = await self.engine.connect()
        return conn

    async def aclose(self) -> None:
        conn, self.connection = self.connection, None
        try:
            if conn is not None:
                await conn.close()
        finally:
            await self.engine.dispose()


class AnyioLease:
    """Keeps anyio's test runner, and so its event loop, open from the first async fixture
    of the plugin to the end of the run.

    anyio's pytest plugin closes its runner (and loop) when no fixture holds it any more: after
    every test, unless a session-scoped async fixture of the user's keeps it. Holding a lease
    on it, as such a fixture would, lets one loop, engine and kept connection serve the whole
    run. Only an asyncio runner is held; a test on another backend (trio) makes the plugin let
    go first, so anyio starts that backend's runner as it would.
    """

    def __init__(self) -> None:
        self._stack: contextlib.ExitStack | None = None

    def take(self) -> None:
        if self._stack is not None:
            return
        plugin = sys.modules.get("anyio.pytest_plugin")
        if plugin is None or getattr(plugin, "_current_runner", None) is None:
            return  # not run by anyio (pytest-asyncio, or a loop of the test's own)
        stack = contextlib.ExitStack()
        stack.enter_context(plugin.get_runner("asyncio", {}))
        self._stack = stack

    def release(self) -> None:
        """Let go of the runner (outside any running loop): anyio closes it if it was last."""
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()


class LoopEngines:
    """One AsyncEngine per running event loop, created on demand by ``factory``."""

    def __init__(self, factory: Callable[[], Awaitable[AsyncEngine]]) -> None:
        self._factory = factory
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopState] = (
            weakref.WeakKeyDictionary()
        )
        self.anyio = AnyioLease()

    async def current(self) -> LoopState:
        """The state of the running loop, creating its engine on first use."""
        loop = asyncio.get_running_loop()
        state = self._states.get(loop)
        if state is None:
            self.anyio.take()
            state = LoopState(await self._factory())
            state.lifetime = self._lifetime(loop, state)
            await anext(state.lifetime)  # the loop now finalizes it at shutdown_asyncgens()
            self._states[loop] = state
        return state

    async def _lifetime(
        self, loop: asyncio.AbstractEventLoop, state: LoopState
    ) -> AsyncIterator[None]:
        try:
            yield
        finally:
            self._states.pop(loop, None)
            await state.aclose()

    def expire(self) -> None:
        """Every loop's kept connection is replaced at that loop's next use."""
        for state in self._states.values():
            state.expired = True

    def peek(self) -> LoopState | None:
        """The state of the running loop, if it has one."""
        return self._states.get(asyncio.get_running_loop())

    def close(self) -> None:
        """At session end: close each idle loop's connection and engine on that loop.

        A loop that is closed already was finalized through its shutdown; one that is running
        (the caller is inside it) finalizes at its own shutdown.
        """
        for loop, state in list(self._states.items()):
            if not loop.is_closed() and not loop.is_running():
                loop.run_until_complete(state.aclose())
        self._states = weakref.WeakKeyDictionary()
        self.anyio.release()


class AsyncSandbox:
    """One async test's sandbox on an AsyncConnection owned by the running loop."""

    def __init__(self, connection: AsyncConnection) -> None:
        self.connection = connection
        # Where the driver ties a connection to its loop, using it from another loop is refused
        # with the reason; aiosqlite's serve any loop (Starlette's TestClient runs the app on
        # a loop of its own in another thread), as they would without the plugin.
        loop = (
            asyncio.get_running_loop() if dialects.loop_bound(connection.dialect.driver) else None
        )
        self.core = Sandbox(connection.sync_connection, loop)  # type: ignore[arg-type]
        self._transaction: AsyncTransaction | None = None

    async def start(self) -> None:
        conn = self.connection
        if conn.in_transaction():  # left over by a test that escaped; never commit
            with self.core.watch.own_statements():
                await conn.rollback()
        restart_savepoint_names(conn.sync_connection)  # type: ignore[arg-type]
        self._transaction = await conn.begin()
        if conn.dialect.name == "sqlite":
            await conn.run_sync(dialects.begin_now)
        self.core.transaction = self._transaction.sync_transaction  # type: ignore[assignment]
        self.core.watch_transaction()

    async def end(self) -> None:
        """Roll the outer transaction back; idempotent. Problems are left in ``core.problem``."""
        core = self.core
        core.pending_drop = None  # the test is over: the rollback undoes it, never sent
        query = core.asks_server
        if query is not None and not self.connection.closed:
            try:
                result = await asyncio.wait_for(
                    self.connection.exec_driver_sql(query), TEARDOWN_TIMEOUT
                )
                core.server_says(bool(result.scalar()))
            except Exception as exc:  # a broken connection: teardown invalidates it
                core.teardown_failed(exc)
        action = core.begin_teardown()
        try:
            if action == "rollback":
                assert self._transaction is not None
                if core.counters_to_reset:
                    await self.connection.run_sync(lambda _: core.reset_counters(inside=True))
                await asyncio.wait_for(self._transaction.rollback(), TEARDOWN_TIMEOUT)
                if core.counters_to_reset:
                    await self.connection.run_sync(lambda _: core.reset_counters(inside=False))
            elif action == "invalidate":
                await self.connection.invalidate()
            elif action == "reset":
                await self.connection.run_sync(reset)
        except Exception as exc:
            core.teardown_failed(exc)
            if not self.connection.closed:
                await self.connection.invalidate()
        finally:
            core.end_teardown()


_sandboxes: weakref.WeakKeyDictionary[AsyncConnection, AsyncSandbox] = weakref.WeakKeyDictionary()


async def open_sandbox(connection: AsyncConnection) -> AsyncSandbox:
    """Start a sandbox on ``connection``, which belongs to the running loop."""
    sandbox = AsyncSandbox(connection)
    await sandbox.start()
    _sandboxes[sandbox.connection] = sandbox
    return sandbox


def sandbox_of(connection: AsyncConnection) -> Sandbox | None:
    """The sandbox running on ``connection``, if any."""
    found = _sandboxes.get(connection)
    return found.core if found is not None else None


async def prepare_first_savepoint(session: AsyncSession) -> None:
    """Open the savepoint the session's first transaction will take, without beginning it.

    Beginning an AsyncSession on a connection awaits its SAVEPOINT; two tasks whose first use
    of the session overlaps (``asyncio.gather``) then meet SQLAlchemy's "provisioning a new
    connection" error. With the savepoint already established in the sandbox's ledger, the
    session's begin reuses it and sends nothing.
    """
    bind = session.bind
    sandbox = _sandboxes.get(bind) if bind is not None else None  # type: ignore[arg-type]
    if sandbox is not None:
        ledger = sandbox.core.savepoints
        await sandbox.connection.run_sync(lambda _: ledger.establish())


async def close_session_after(session: AsyncSession) -> None:
    """Close a session at teardown, leaving the sandbox to its own fixture (see
    :func:`pytest_alchemy.sandbox.close_session_after`)."""
    sandbox = sandbox_of(session.bind) if session.bind is not None else None  # type: ignore[arg-type]
    with sandbox.savepoints.abandoning() if sandbox is not None else contextlib.nullcontext():
        await session.close()
