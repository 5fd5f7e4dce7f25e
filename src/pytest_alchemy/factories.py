"""Test-data factories bound to the test's sandbox (ini ``alchemy_factories``).

factory_boy's ``SQLAlchemyModelFactory`` and polyfactory's ``SQLAlchemyFactory`` keep their
session on the class. Each factory the ini names (a module: every factory defined in it; a
class: it and every subclass) is given a session *getter* once, after collection: when the
factory creates an object it asks for the running test's ``db_session`` (``async_db_session``
for polyfactory's ``create_async``), or for the session of the ``db_layer`` block that is
running. Nothing is connected until a factory is used; pytest-factoryboy's ``register``
fixtures go through the same factories.
"""

from __future__ import annotations

import importlib
import inspect
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

from pytest_alchemy.config import FACTORIES_INI


def _bases() -> tuple[type, ...]:
    """The factory base classes of the libraries installed."""
    found: list[type] = []
    try:
        from factory.alchemy import SQLAlchemyModelFactory

        found.append(SQLAlchemyModelFactory)
    except ImportError:
        pass
    try:
        from polyfactory.factories.sqlalchemy_factory import SQLAlchemyFactory

        found.append(SQLAlchemyFactory)
    except ImportError:
        pass
    return tuple(found)


def _subclasses(cls: type) -> Iterable[type]:
    yield cls
    sub: type
    for sub in cls.__subclasses__():
        yield from _subclasses(sub)


def find(paths: Iterable[str]) -> list[type]:
    """The factory classes ``paths`` name (see the module's docstring); usage errors naming
    the ini key for what cannot be imported or is no factory."""
    bases = _bases()
    if not bases:
        raise pytest.UsageError(
            f"{FACTORIES_INI} is set, but neither factory_boy nor polyfactory is installed: "
            f"pip install factory_boy (or polyfactory)."
        )
    found: dict[int, type] = {}
    for path in paths:
        module_name, _, attr = path.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
            for part in filter(None, attr.split(".")):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            raise pytest.UsageError(
                f"{FACTORIES_INI} = {path!r}: {type(exc).__name__}: {exc}. Name a module of "
                f"factories ('myapp.tests.factories') or a factory base class "
                f"('myapp.tests.factories:BaseFactory')."
            ) from exc
        if inspect.ismodule(obj):
            classes = [
                value
                for value in vars(obj).values()
                if inspect.isclass(value)
                and issubclass(value, bases)
                and value.__module__ == obj.__name__
            ]
        elif inspect.isclass(obj) and issubclass(obj, bases):
            classes = list(_subclasses(obj))
        else:
            raise pytest.UsageError(
                f"{FACTORIES_INI} = {path!r} is neither a module nor a subclass of "
                f"{' or '.join(b.__name__ for b in bases)}."
            )
        for cls in classes:
            if cls not in bases:
                found.setdefault(id(cls), cls)
    return list(found.values())


def bind(
    factories: Iterable[type],
    sync_session: Callable[[], Any],
    async_session: Callable[[], Any],
) -> None:
    """Give each factory the session getters (factory_boy: ``sqlalchemy_session_factory``;
    polyfactory: ``__session__`` and ``__async_session__``)."""
    for cls in factories:
        meta = getattr(cls, "_meta", None)
        if meta is not None and hasattr(meta, "sqlalchemy_session_factory"):
            meta.sqlalchemy_session = None
            meta.sqlalchemy_session_factory = sync_session
        if hasattr(cls, "__async_session__"):
            setattr(cls, "__session__", staticmethod(sync_session))  # noqa: B010
            setattr(cls, "__async_session__", staticmethod(async_session))  # noqa: B010
