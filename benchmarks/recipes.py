"""The hand-written recipe the benchmarks compare with: one fixture that connects, begins,
makes a ``create_savepoint`` Session, and closes, rolls back and closes after the test, on a
schema the session-scoped engine fixture builds once per run. ``URL`` is prepended by the
benchmark writing it into a suite's ``conftest.py``; ``RECIPE[is_async]``."""

RECIPE = {
    False: """
import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from models import Base


@pytest.fixture(scope="session")
def engine():
    engine = create_engine(URL)
    with engine.begin() as connection:
        Base.metadata.drop_all(connection)
        Base.metadata.create_all(connection)
    yield engine
    with engine.begin() as connection:
        Base.metadata.drop_all(connection)
    engine.dispose()


@pytest.fixture
def session(engine):
    connection = engine.connect()
    transaction = connection.begin()
    session = Session(bind=connection, join_transaction_mode="create_savepoint")
    yield session
    session.close()
    transaction.rollback()
    connection.close()
""",
    True: """
import pytest_asyncio
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from models import Base


@pytest_asyncio.fixture(scope="session")
async def engine():
    engine = create_async_engine(URL)
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.drop_all)
        await connection.run_sync(Base.metadata.create_all)
    yield engine
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.drop_all)
    await engine.dispose()


@pytest_asyncio.fixture
async def session(engine):
    connection = await engine.connect()
    transaction = await connection.begin()
    session = AsyncSession(bind=connection, join_transaction_mode="create_savepoint")
    yield session
    await session.close()
    await transaction.rollback()
    await connection.close()
""",
}
