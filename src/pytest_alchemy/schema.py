"""Build the schema from ``alchemy_metadata`` once, and drop only what was built."""

from __future__ import annotations

import hashlib
import importlib
import inspect as inspect_module
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import MetaData, inspect
from sqlalchemy.engine import default
from sqlalchemy.schema import CreateIndex, CreateTable

from pytest_alchemy.config import METADATA_INI, SEED_INI, Settings, mask
from pytest_alchemy.databases import Recipe
from pytest_alchemy.errors import SchemaConflictError

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.engine import Connection


def load_object(key: str, path: str, expected: str) -> object:
    """Import ``module:attr.path``; a usage error naming ``key`` if it cannot be found."""
    module_name, _, attr_path = path.partition(":")
    try:
        obj: object = importlib.import_module(module_name)
    except Exception as exc:
        raise pytest.UsageError(
            f"{key} = {path!r}: cannot import module {module_name!r} "
            f"({type(exc).__name__}: {exc}). Check the module path and that it is importable "
            f"from the test run (pytest's 'pythonpath' ini key can add a source folder)."
        ) from None
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise pytest.UsageError(
                f"{key} = {path!r}: module {module_name!r} has no attribute {attr_path!r}. "
                f"Name {expected}."
            ) from None
    return obj


def load_metadata(paths: tuple[str, ...]) -> list[MetaData]:
    """Import each ``module:attr`` and return its MetaData (a MetaData or anything with one)."""
    found: list[MetaData] = []
    for path in paths:
        obj = load_object(
            METADATA_INI, path, "a MetaData or a declarative base, for example 'myapp.models:Base'"
        )
        metadata = obj if isinstance(obj, MetaData) else getattr(obj, "metadata", None)
        if not isinstance(metadata, MetaData):
            raise pytest.UsageError(
                f"{METADATA_INI} = {path!r} is a {type(obj).__name__}, not a MetaData or a "
                f"declarative base. Name a MetaData or a class with a .metadata attribute."
            )
        if all(metadata is not m for m in found):
            found.append(metadata)
    return found


def build(connection: Connection, metadatas: list[MetaData], where: str) -> None:
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
    for metadata in metadatas:
        metadata.create_all(connection, checkfirst=False)


def load_seed(path: str | None) -> Callable[[Connection], object] | None:
    """The ``alchemy_seed`` function, if one is configured."""
    if path is None:
        return None
    seed = load_object(SEED_INI, path, "a function taking a Connection")
    if not callable(seed):
        raise pytest.UsageError(
            f"{SEED_INI} = {path!r} is a {type(seed).__name__}, not a function. Name a function "
            f"that takes a SQLAlchemy Connection, for example 'myapp.testing:seed'."
        )
    return seed


def recipe(
    metadatas: list[MetaData], seed: Callable[[Connection], object] | None, settings: Settings
) -> Recipe | None:
    """How to fill a new test database from ``alchemy_metadata`` and ``alchemy_seed``."""
    if not metadatas and seed is None:
        return None

    def fill(connection: Connection) -> None:
        build(connection, metadatas, mask(connection.engine.url))
        if seed is not None:
            seed(connection)

    def empty(connection: Connection) -> None:
        for metadata in reversed(metadatas):
            metadata.drop_all(connection)

    parts = [f"the schema of {', '.join(settings.metadata)}"] if metadatas else []
    if seed is not None:
        parts.append(f"the rows of {settings.seed}")
    tables = sum(len(md.tables) for md in metadatas)
    describe = " and ".join(parts) + (f" ({tables} tables)" if metadatas else "")
    return Recipe(fill, empty, fingerprint(metadatas, seed), describe)


def fingerprint(metadatas: list[MetaData], seed: Callable[..., object] | None) -> str:
    """A digest of what the recipe builds: every table's DDL and the seed's module source."""
    digest = hashlib.sha256()
    dialect = default.DefaultDialect()
    for metadata in metadatas:
        for table in metadata.sorted_tables:
            digest.update(str(CreateTable(table).compile(dialect=dialect)).encode())
            for index in sorted(table.indexes, key=lambda i: i.name or ""):
                digest.update(str(CreateIndex(index).compile(dialect=dialect)).encode())
    if seed is not None:
        module = inspect_module.getmodule(seed)
        try:
            digest.update(inspect_module.getsource(module or seed).encode())
        except (OSError, TypeError):
            digest.update(repr(seed).encode())
    return digest.hexdigest()
