"""Build the schema from ``alchemy_metadata`` once, and drop only what was built."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import MetaData, Table, inspect

from pytest_alchemy.config import METADATA_INI
from pytest_alchemy.errors import SchemaConflictError

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection


def load_metadata(paths: tuple[str, ...]) -> list[MetaData]:
    """Import each ``module:attr`` and return its MetaData (a MetaData or anything with one)."""
    found: list[MetaData] = []
    for path in paths:
        module_name, _, attr_path = path.partition(":")
        try:
            obj: object = importlib.import_module(module_name)
        except Exception as exc:
            raise pytest.UsageError(
                f"{METADATA_INI} = {path!r}: cannot import module {module_name!r} "
                f"({type(exc).__name__}: {exc}). Check the module path and that it is importable "
                f"from the test run (pytest's 'pythonpath' ini key can add a source folder)."
            ) from None
        for part in attr_path.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise pytest.UsageError(
                    f"{METADATA_INI} = {path!r}: module {module_name!r} has no attribute "
                    f"{attr_path!r}. Name a MetaData or a declarative base, for example "
                    f"'myapp.models:Base'."
                ) from None
        metadata = obj if isinstance(obj, MetaData) else getattr(obj, "metadata", None)
        if not isinstance(metadata, MetaData):
            raise pytest.UsageError(
                f"{METADATA_INI} = {path!r} is a {type(obj).__name__}, not a MetaData or a "
                f"declarative base. Name a MetaData or a class with a .metadata attribute."
            )
        if all(metadata is not m for m in found):
            found.append(metadata)
    return found


@dataclass
class BuiltSchema:
    """The tables this run created, in creation order, so exactly those can be dropped."""

    tables: list[Table] = field(default_factory=list)

    def drop(self, connection: Connection) -> None:
        for table in reversed(self.tables):
            table.drop(connection, checkfirst=True)
        self.tables.clear()


def build(connection: Connection, metadatas: list[MetaData], where: str) -> BuiltSchema:
    """Create every table of ``metadatas``; refuse if any of them already exists.

    ``where`` names the database (masked URL) for the error message.
    """
    inspector = inspect(connection)
    tables = [t for md in metadatas for t in md.sorted_tables]
    existing = [t for t in tables if inspector.has_table(t.name, schema=t.schema)]
    if existing:
        names = ", ".join(repr(t.fullname) for t in existing)
        raise SchemaConflictError(
            f"{METADATA_INI}: table(s) {names} already exist in {where}. pytest-alchemy builds "
            f"the schema itself and never drops tables it did not create. Point alchemy_url at "
            f"an empty database, drop those tables, or remove {METADATA_INI} if the schema is "
            f"already in place."
        )
    built = BuiltSchema()
    for metadata in metadatas:
        metadata.create_all(connection, checkfirst=False)
        built.tables.extend(metadata.sorted_tables)
    return built
