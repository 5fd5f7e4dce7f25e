"""Hypothesis: each example of a ``@given`` test that uses the sandbox is rolled back.

Hypothesis calls the test's inner function once per example with the same fixture values, so
without help the rows of one example are there for the next. For a ``@given`` test that
requests a sandbox fixture, the plugin replaces ``test.hypothesis.inner_test`` (Hypothesis's
documented hook for wrapping each example) with a wrapper that:

- commits the test's sessions once before the example, so what fixtures left pending in them
  is the baseline every example starts from;
- opens a savepoint of its own on the sandbox's ledger;
- after the example, rolls the sessions back and the ledger back to that savepoint (whoever
  wrote above it: the application's commits in the example included), and expires the
  sessions' objects, so the next example reads the baseline again.

The savepoint stays established for the next example (no round trip to reopen it). The
health check against function-scoped fixtures is suppressed for such a test when the only
function-scoped fixtures it requests directly are the plugin's: they are reset per example
now. Tests of the commit strategy are left alone: their examples commit for real.
"""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    import pytest
    from sqlalchemy.engine import Connection

    from pytest_alchemy.sandbox import Sandbox

#: The plugin's function-scoped fixtures that hand out the sandbox.
FIXTURES = frozenset(
    {
        "db_session",
        "db_connection",
        "db_sessionmaker",
        "async_db_session",
        "async_db_connection",
        "async_db_sessionmaker",
        "db_queries",
        "db_commits",
        "db_connections",
    }
)
_SANDBOXES = FIXTURES - {"db_queries", "db_commits"}
_WRAPPED = "_alchemy_examples"


def _connection_of(value: Any) -> Connection | None:
    """The sync Connection behind a fixture's value (session, connection, sessionmaker)."""
    from sqlalchemy.engine import Connection
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
    from sqlalchemy.orm import Session, sessionmaker

    if isinstance(value, AsyncSession | Session):
        value = value.bind
    elif isinstance(value, sessionmaker) or (hasattr(value, "kw") and hasattr(value, "class_")):
        value = value.kw.get("bind")
    if isinstance(value, AsyncConnection):
        value = value.sync_connection
    return value if isinstance(value, Connection) else None


def _sandboxes(values: Iterable[Any]) -> list[Sandbox]:
    from pytest_alchemy.sandbox import sandbox_of

    found: dict[int, Sandbox] = {}
    for value in values:
        connection = _connection_of(value)
        sandbox = sandbox_of(connection) if connection is not None else None
        if sandbox is not None:
            found.setdefault(id(sandbox), sandbox)
    return list(found.values())


class _Mark:
    """The owner and party of an example's savepoint on the ledger."""


def _open(sandboxes: list[Sandbox]) -> list[tuple[Sandbox, _Mark]]:
    marks = []
    for sandbox in sandboxes:
        mark = _Mark()
        with sandbox.savepoints.lock:
            sandbox.savepoints.open(mark, mark)
        marks.append((sandbox, mark))
    return marks


def _undo(marks: list[tuple[Sandbox, _Mark]]) -> None:
    for sandbox, mark in reversed(marks):
        with sandbox.savepoints.lock:
            sandbox.savepoints.rollback(mark, everyone=True)


def wrap(item: pytest.Item) -> None:
    """Make each example of ``item`` (a ``@given`` test using the sandbox) roll back."""
    obj = getattr(item, "obj", None)
    hypothesis = getattr(obj, "hypothesis", None)
    if hypothesis is None or not getattr(obj, "is_hypothesis_test", False):
        return
    names = set(getattr(item, "fixturenames", ())) & _SANDBOXES
    if not names:
        return
    _suppress_health_check(item, obj)
    inner = hypothesis.inner_test
    if getattr(inner, _WRAPPED, False):
        return  # parametrized: the items share one function
    hypothesis.inner_test = (
        _async_wrapper(inner) if inspect.iscoroutinefunction(inner) else (_sync_wrapper(inner))
    )


def _sync_wrapper(inner: Callable[..., Any]) -> Callable[..., Any]:
    from sqlalchemy.orm import Session

    @functools.wraps(inner)
    def example(*args: Any, **kwargs: Any) -> Any:
        values = [*args, *kwargs.values()]
        sessions = [v for v in values if isinstance(v, Session)]
        for session in sessions:
            session.commit()
        marks = _open(_sandboxes(values))
        try:
            return inner(*args, **kwargs)
        finally:
            for session in sessions:
                session.rollback()
            _undo(marks)
            for session in sessions:
                session.expire_all()

    setattr(example, _WRAPPED, True)
    return example


def _async_wrapper(inner: Callable[..., Any]) -> Callable[..., Any]:
    from sqlalchemy.ext.asyncio import AsyncSession

    @functools.wraps(inner)
    async def example(*args: Any, **kwargs: Any) -> Any:
        values = [*args, *kwargs.values()]
        sessions = [v for v in values if isinstance(v, AsyncSession)]
        for session in sessions:
            await session.commit()
        sandboxes = _sandboxes(values)
        connections = [s.connection for s in sandboxes]
        marks = await _in_greenlet(connections, lambda: _open(sandboxes))
        try:
            return await inner(*args, **kwargs)
        finally:
            for session in sessions:
                await session.rollback()
            await _in_greenlet(connections, lambda: _undo(marks))
            for session in sessions:
                session.expire_all()

    setattr(example, _WRAPPED, True)
    return example


async def _in_greenlet(connections: list[Connection], work: Callable[[], Any]) -> Any:
    """Run ``work`` where an async driver's sync connection may send statements."""
    if not connections:
        return work()
    from sqlalchemy.util import greenlet_spawn

    return await greenlet_spawn(work)


def _suppress_health_check(item: pytest.Item, obj: Any) -> None:
    """Hypothesis fails a test that requests a function-scoped fixture, since fixtures are
    not reset between examples. The plugin's are, now: when they are the only ones the test
    requests directly, the check is suppressed for it."""
    from hypothesis import HealthCheck, settings

    request = getattr(item, "_request", None)
    manager = getattr(request, "_fixturemanager", None)
    if manager is None:
        return
    direct = set(inspect.signature(item.obj).parameters)  # type: ignore[attr-defined]
    info = manager.getfixtureinfo(node=item, func=item.obj, cls=None)  # type: ignore[attr-defined]
    for name, defs in info.name2fixturedefs.items():
        if name in direct and defs[-1].scope == "function" and name not in FIXTURES:
            return  # the user's own: Hypothesis's warning stands
    fn = getattr(obj, "__func__", obj)
    current = getattr(fn, "_hypothesis_internal_use_settings", None) or settings()
    suppressed = set(current.suppress_health_check) | {HealthCheck.function_scoped_fixture}
    fn._hypothesis_internal_use_settings = settings(current, suppress_health_check=suppressed)
