"""Type-checked with mypy --strict in CI: how users annotate tests that use the fixtures."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import select

import pytest_alchemy
from pytest_alchemy import AlchemyError, SandboxBrokenError, UnsandboxedEngineError

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.engine import Connection, Engine
    from sqlalchemy.ext.asyncio import (
        AsyncConnection,
        AsyncEngine,
        AsyncSession,
        async_sessionmaker,
    )
    from sqlalchemy.orm import Session, sessionmaker


def test_sync(
    db_engine: Engine,
    db_connection: Connection,
    db_sessionmaker: sessionmaker[Session],
    db_session: Session,
) -> None:
    value: int | None = db_session.scalar(select(1))
    with db_sessionmaker() as other:
        assert other.scalar(select(1)) == value


async def test_async(
    async_db_engine: AsyncEngine,
    async_db_connection: AsyncConnection,
    async_db_sessionmaker: async_sessionmaker[AsyncSession],
    async_db_session: AsyncSession,
) -> None:
    value: int | None = await async_db_session.scalar(select(1))
    async with async_db_sessionmaker() as other:
        assert await other.scalar(select(1)) == value


def test_routed(db_route: Callable[..., None], db_engine: Engine) -> None:
    db_route(db_engine)
    pytest_alchemy.route_engines(db_engine)


def catches(exc: Exception) -> bool:
    version: str = pytest_alchemy.__version__
    errors = (AlchemyError, SandboxBrokenError, UnsandboxedEngineError)
    return bool(version) and isinstance(exc, errors)
