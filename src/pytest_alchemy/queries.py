"""Recording the statements a test sends, for assertions on them and N+1 detection.

While a :class:`Recorder` is on, every statement any SQLAlchemy engine sends is noted (the
test's sessions, routed application engines, sync and async, any thread), with its parameters,
duration and the application's call site: the first frame outside SQLAlchemy, this plugin,
greenlet and the standard library. Left out, because the code under test did not ask for them:

- transaction control (BEGIN, COMMIT, ROLLBACK, SAVEPOINT, RELEASE): in the sandbox a commit
  is a RELEASE of the sandbox's savepoint, and with real commits the driver sends none of it
  as a statement; counting it would make a count depend on the isolation;
- the plugin's own statements (the sandbox's savepoints, probes, restores);
- schema introspection (SQLAlchemy's reflection and a dialect's first-connect queries).

Nothing is installed while no recorder is on: tests that do not ask cost nothing.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator
    from types import CodeType, FrameType

    from sqlalchemy.engine import Connection
    from sqlalchemy.engine.interfaces import DBAPICursor, ExecutionContext

_TRANSACTION_CONTROL = re.compile(
    r"\s*(?:BEGIN|COMMIT|ROLLBACK|SAVEPOINT|RELEASE|START\s+TRANSACTION|END)\b", re.I
)
_TABLES = re.compile(
    r"\b(?:FROM|JOIN|INTO|UPDATE|TABLE(?:\s+IF\s+(?:NOT\s+)?EXISTS)?)\s+"
    r"((?:[`\"\[]?\w+[`\"\]]?\.)?[`\"\[]?\w+[`\"\]]?)",
    re.I,
)
_VERB = re.compile(r"\s*\(*\s*(\w+)")
_MAIN_VERB = re.compile(r"\)\s*(INSERT|UPDATE|DELETE|SELECT)\b", re.I)


@functools.lru_cache(maxsize=512)
def _kind(statement: str) -> str:
    """``select``, ``insert``, ``update``, ``delete``, or the statement's first keyword."""
    found = _VERB.match(statement)
    verb = found.group(1).lower() if found else ""
    if verb == "with":  # a CTE: the verb after the last closing parenthesis of the WITH part
        mains = _MAIN_VERB.findall(statement)
        return mains[-1].lower() if mains else "select"
    return verb


@functools.lru_cache(maxsize=512)
def _tables(statement: str) -> frozenset[str]:
    """The tables a statement names (lower case, without schema or quotes)."""
    names = set()
    for found in _TABLES.findall(statement):
        name = found.rsplit(".", 1)[-1].strip('`"[]').lower()
        if name.upper() not in {"SELECT", "LATERAL"}:
            names.add(name)
    return frozenset(names)


@dataclass
class Query:
    """One statement the code under test sent."""

    statement: str
    parameters: Any
    #: ``path:line`` of the application's code that sent it, and that code's function.
    where: str
    function: str
    #: ``Class.attribute`` of the relationship whose lazy load sent it, else None.
    relationship: str | None = None
    #: The relationship is a collection (``selectinload``) or a reference (``joinedload``).
    collection: bool = False
    executemany: bool = False
    #: Seconds the driver took (None if it failed).
    duration: float | None = None

    @property
    def kind(self) -> str:
        """``select``, ``insert``, ``update``, ``delete``, or the statement's first keyword
        (lower case)."""
        return _kind(self.statement)

    @property
    def tables(self) -> frozenset[str]:
        """The tables the statement names (lower case, without schema or quotes)."""
        return _tables(self.statement)

    @property
    def shape(self) -> str:
        """The statement's text with whitespace folded: the same for every execution of one
        statement with different parameters."""
        return " ".join(self.statement.split())

    def describe(self, width: int = 300) -> str:
        """One line: the statement, its parameters, where it came from and how long it took."""
        text = self.shape
        if len(text) > width:
            text = text[: width - 3] + "..."
        params = repr(self.parameters)
        if len(params) > 120:
            params = params[:117] + "..."
        took = f", {self.duration * 1000:.2f} ms" if self.duration is not None else ""
        lazy = f", lazy load of {self.relationship}" if self.relationship else ""
        return f"{text}  {params}  -- {self.where} in {self.function}{lazy}{took}"


def numbered(queries: list[Query]) -> str:
    """The statements as a numbered list, one per line, as a failing assertion prints them."""
    if not queries:
        return "  (none)"
    return "\n".join(f"  {n}. {query.describe()}" for n, query in enumerate(queries, 1))


# -- where a statement comes from ---------------------------------------------------------

_SKIPPED_PACKAGES = ("sqlalchemy", "greenlet", "pytest_alchemy")


def _package_dirs() -> tuple[str, ...]:
    """The directories of SQLAlchemy, greenlet and this plugin (the plugin's last)."""
    dirs = []
    for name in _SKIPPED_PACKAGES:
        try:
            module = __import__(name)
        except ImportError:  # greenlet is optional for sync-only SQLAlchemy
            continue
        dirs.append(os.path.realpath(os.path.dirname(module.__file__ or "")))
    return tuple(os.path.join(d, "") for d in dirs)


_STDLIB = tuple(
    os.path.join(os.path.realpath(sysconfig.get_paths()[key]), "")
    for key in ("stdlib", "platstdlib")
)
_PACKAGES: tuple[str, ...] | None = None
_PLUGIN_DIR = ""

_APP, _THIRD_PARTY, _LIBRARY, _PLUGIN, _INTROSPECTING, _LAZY_LOAD = range(6)
_code_kinds: dict[CodeType, int] = {}

#: SQLAlchemy functions whose statements are schema introspection (with its reflection.py).
_INTROSPECTION = {"first_connect", "initialize", "_get_server_version_info"}


def _code_kind(code: CodeType) -> int:
    """Whose code it is: the application's, another installed package's, a library the call
    site is never in (SQLAlchemy, greenlet, the standard library), or this plugin's; and the
    library functions that matter: introspection, a relationship's lazy load."""
    found = _code_kinds.get(code)
    if found is not None:
        return found
    global _PACKAGES, _PLUGIN_DIR
    if _PACKAGES is None:
        _PACKAGES = _package_dirs()
        _PLUGIN_DIR = next((d for d in _PACKAGES if d.endswith(f"pytest_alchemy{os.sep}")), "")
    path = code.co_filename
    real = os.path.realpath(path) if os.path.isabs(path) else path
    if _PLUGIN_DIR and real.startswith(_PLUGIN_DIR):
        kind = _PLUGIN
    elif real.startswith(_PACKAGES) or path.startswith("<"):
        kind = _LIBRARY  # "<frozen ...>", "<string>" of SQLAlchemy's generated code
        if code.co_name in _INTROSPECTION or path.endswith("reflection.py"):
            kind = _INTROSPECTING
        elif code.co_name == "_load_for_state":
            kind = _LAZY_LOAD
    elif "-packages" in real:
        kind = _THIRD_PARTY
    elif real.startswith(_STDLIB):
        kind = _LIBRARY
    else:
        kind = _APP
    _code_kinds[code] = kind
    return kind


@dataclass
class _Origin:
    where: str = "?"
    function: str = "?"
    relationship: str | None = None
    collection: bool = False
    own: bool = False  # the plugin's, or schema introspection: not recorded


def _frames(frame: FrameType | None) -> Iterator[FrameType]:
    """The frames calling ``frame``, and on through the greenlet that an async session's
    statement runs in: its parent waits in SQLAlchemy's ``greenlet_spawn``, awaited by the
    application's coroutine."""
    while frame is not None:
        yield frame
        frame = frame.f_back
    greenlet = sys.modules.get("greenlet")
    current = greenlet.getcurrent() if greenlet is not None else None
    parent = getattr(current, "parent", None)
    if parent is not None:
        frame = parent.gr_frame
        while frame is not None:
            yield frame
            frame = frame.f_back


def origin(frame: FrameType | None) -> _Origin:
    """Where the statement being executed comes from (see the module's docstring): the
    first frame of the application's code; else of another installed package."""
    found = _Origin()
    fallback: FrameType | None = None
    kinds = _code_kinds
    for each in _frames(frame):
        code = each.f_code
        kind = kinds.get(code)
        if kind is None:
            kind = _code_kind(code)
        if kind == _LIBRARY:
            continue
        if kind == _APP:
            fallback = each
            break
        if kind == _THIRD_PARTY:
            fallback = fallback or each
        elif kind == _LAZY_LOAD:
            if found.relationship is None:
                prop = getattr(each.f_locals.get("self"), "parent_property", None)
                if prop is not None:
                    found.relationship = str(prop)
                    found.collection = bool(getattr(prop, "uselist", False))
        else:  # the plugin's own statements, schema introspection
            found.own = True
            return found
    if fallback is not None:
        found.where = f"{_relative(fallback.f_code.co_filename)}:{fallback.f_lineno}"
        found.function = fallback.f_code.co_name
    return found


_relatives: dict[str, str] = {}


def _relative(path: str) -> str:
    """``path`` relative to the working directory, where it is below it."""
    found = _relatives.get(path)
    if found is None:
        try:
            relative = os.path.relpath(path)
        except ValueError:  # another drive (Windows)
            relative = path
        found = _relatives[path] = path if relative.startswith("..") else relative
    return found


# -- the recorder -------------------------------------------------------------------------


class Recorder:
    """Statements noted while :meth:`on` is in effect (re-entrant, any thread)."""

    def __init__(self) -> None:
        self.queries: list[Query] = []
        self._depth = 0
        self._lock = threading.Lock()

    @property
    def recording(self) -> bool:
        return self._depth > 0

    def start(self) -> None:
        with self._lock:
            self._depth += 1
            if self._depth == 1:
                _listen(self)

    def stop(self) -> None:
        with self._lock:
            if self._depth == 0:
                return
            self._depth -= 1
            if self._depth == 0:
                _unlisten(self)

    def _before(
        self,
        conn: Connection,
        cursor: DBAPICursor,
        statement: str,
        parameters: Any,
        context: ExecutionContext | None,
        executemany: bool,
    ) -> None:
        if _TRANSACTION_CONTROL.match(statement) or _internal(conn):
            return
        found = origin(sys._getframe(1))
        if found.own:
            return
        query = Query(
            statement,
            parameters,
            found.where,
            found.function,
            relationship=found.relationship,
            collection=found.collection,
            executemany=executemany,
        )
        self.queries.append(query)
        if context is not None:
            context._alchemy_query = (query, time.perf_counter())  # type: ignore[attr-defined]

    def _after(
        self,
        conn: Connection,
        cursor: DBAPICursor,
        statement: str,
        parameters: Any,
        context: ExecutionContext | None,
        executemany: bool,
    ) -> None:
        noted = getattr(context, "_alchemy_query", None)
        if noted is not None:
            query, began = noted
            query.duration = time.perf_counter() - began
            del context._alchemy_query  # type: ignore[union-attr]


def _internal(connection: Connection) -> bool:
    """Whether the plugin runs statements of its own on the sandbox's connection now."""
    from pytest_alchemy.sandbox import _watches

    found = _watches.get(connection)
    return found is not None and found.internal


_listening: list[Recorder] = []


def _listen(recorder: Recorder) -> None:
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    event.listen(Engine, "before_cursor_execute", recorder._before)
    event.listen(Engine, "after_cursor_execute", recorder._after)
    _listening.append(recorder)


def _unlisten(recorder: Recorder) -> None:
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    event.remove(Engine, "before_cursor_execute", recorder._before)
    event.remove(Engine, "after_cursor_execute", recorder._after)
    _listening.remove(recorder)


# -- N+1 ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Repeat:
    """One statement shape sent several times from one call site."""

    where: str
    function: str
    relationship: str | None
    collection: bool
    queries: tuple[Query, ...]

    def describe(self) -> str:
        count = len(self.queries)
        first = self.queries[0].shape
        if len(first) > 200:
            first = first[:197] + "..."
        if self.relationship is None:
            return (
                f"the same statement ran {count} times from {self.where} in {self.function}: "
                f"{first}. Fetch the rows in one query (an IN list, a join)."
            )
        loader = "selectinload" if self.collection else "joinedload"
        cls, _, attr = self.relationship.rpartition(".")
        return (
            f"{self.relationship} was lazy-loaded {count} times from {self.where} in "
            f"{self.function} (N+1 queries: {first}). Load it with the query that fetched the "
            f"{cls} rows: .options({loader}({cls}.{attr})) from sqlalchemy.orm, or set "
            f"lazy='{'selectin' if self.collection else 'joined'}' on the relationship."
        )


def repeats(queries: list[Query], *, explicit: bool = False, at_least: int = 2) -> list[Repeat]:
    """Statement shapes sent ``at_least`` times from one call site by lazy loads of one
    relationship (with ``explicit``, by any code: a loop over explicit queries too)."""
    groups: dict[tuple[str, str | None, str], list[Query]] = {}
    for query in queries:
        if query.relationship is None and not explicit:
            continue
        key = (query.where, query.relationship, query.shape)
        groups.setdefault(key, []).append(query)
    found = []
    for (where, relationship, _), group in groups.items():
        if len(group) >= at_least:
            first = group[0]
            found.append(
                Repeat(where, first.function, relationship, first.collection, tuple(group))
            )
    return found
