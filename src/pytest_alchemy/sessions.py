"""The sessions the fixtures hand out, shaped like the application's.

Class: ``alchemy_session_class`` / ``alchemy_async_session_class`` if set; else SQLModel's
``Session`` / ``AsyncSession`` when a configured metadata is SQLModel's (so ``.exec()``
works); else SQLAlchemy's. Options: ``alchemy_session_options``, ``key = value`` lines passed
to both sessionmakers (``expire_on_commit = false``). How the session joins the sandbox
(``bind``, ``join_transaction_mode``) is the plugin's and cannot be set.
"""

from __future__ import annotations

import ast
import functools
import inspect
import sys
from typing import TYPE_CHECKING, Any

import pytest

from pytest_alchemy.schema import Schema, load_metadata, load_object

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pytest_alchemy.config import Settings

OPTIONS_INI = "alchemy_session_options"
CLASS_INI = "alchemy_session_class"
ASYNC_CLASS_INI = "alchemy_async_session_class"
#: Session arguments that decide how a session joins the sandbox: the plugin's own.
_RESERVED = frozenset({"bind", "binds", "join_transaction_mode", "class_"})
_WORDS = {"true": True, "false": False, "none": None, "null": None}


def _allowed() -> list[str]:
    from sqlalchemy.orm import Session

    names = inspect.signature(Session.__init__).parameters
    return sorted(n for n in names if n not in _RESERVED and n != "self" and not n.startswith("_"))


def parse_options(lines: Sequence[str]) -> tuple[tuple[str, Any], ...]:
    """``key = value`` lines as keyword arguments; a usage error naming a bad one."""
    found: dict[str, Any] = {}
    if not any(line.strip() for line in lines):
        return ()  # the ORM is imported when a session is first made, not at start-up
    allowed = _allowed()
    for line in lines:
        if not line.strip():
            continue
        key, sep, raw = (part.strip() for part in line.partition("="))
        if not sep or not key:
            raise pytest.UsageError(
                f"{OPTIONS_INI}: {line.strip()!r} is not 'key = value', for example "
                f"'expire_on_commit = false'."
            )
        if key in _RESERVED:
            raise pytest.UsageError(
                f"{OPTIONS_INI}: {key} is how the session joins the test's sandbox and is set by "
                f"pytest-alchemy. Choose the session class with {CLASS_INI} / {ASYNC_CLASS_INI}."
            )
        if key not in allowed:
            raise pytest.UsageError(
                f"{OPTIONS_INI}: {key!r} is not a Session option. Valid: {', '.join(allowed)}."
            )
        found[key] = _value(key, raw)
    return tuple(found.items())


def _value(key: str, raw: str) -> Any:
    if raw.lower() in _WORDS:
        return _WORDS[raw.lower()]
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        raise pytest.UsageError(
            f"{OPTIONS_INI}: the value of {key} ({raw!r}) is not a literal: write true, false, "
            f"none, a number or a quoted string."
        ) from None


@functools.lru_cache(maxsize=8)
def _uses_sqlmodel(metadata_paths: tuple[str, ...], schema: Schema | None = None) -> bool:
    found = schema.metadatas if schema is not None else load_metadata(metadata_paths)
    # Models on SQLModel's metadata imported sqlmodel; importing it here only to find that
    # they do not cost a project that has it installed about 0.35 s a run (pydantic).
    sqlmodel = sys.modules.get("sqlmodel")
    metadata = getattr(getattr(sqlmodel, "SQLModel", None), "metadata", None)
    return metadata is not None and any(md is metadata for md in found)


def session_class(
    settings: Settings, *, is_async: bool, schema: Schema | None = None
) -> type[Any] | None:
    """The class the fixtures' sessionmaker makes (None: SQLAlchemy's default); ``schema``:
    the test's own, if its alchemy_metadata fixture gives it one."""
    configured = settings.async_session_class if is_async else settings.session_class
    key = ASYNC_CLASS_INI if is_async else CLASS_INI
    if configured:
        found = load_object(key, configured, "a Session class, for example 'myapp.db:Session'")
        base = _base_class(is_async=is_async)
        if not (isinstance(found, type) and issubclass(found, base)):
            raise pytest.UsageError(
                f"{key} = {configured!r} is not a subclass of {base.__module__}.{base.__name__}."
            )
        return found
    if _uses_sqlmodel(settings.metadata, schema):
        if is_async:
            from sqlmodel.ext.asyncio.session import AsyncSession

            return AsyncSession
        from sqlmodel import Session

        return Session
    return None


def _base_class(*, is_async: bool) -> type[Any]:
    if is_async:
        from sqlalchemy.ext.asyncio import AsyncSession

        return AsyncSession
    from sqlalchemy.orm import Session

    return Session


def maker_arguments(
    settings: Settings, *, is_async: bool, schema: Schema | None = None
) -> dict[str, Any]:
    """What the fixtures' sessionmaker is given besides its bind and join mode."""
    arguments = dict(settings.session_options)
    cls = session_class(settings, is_async=is_async, schema=schema)
    if cls is not None:
        arguments["class_"] = cls
    return arguments
