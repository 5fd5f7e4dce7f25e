import asyncio

import pytest
from sqlalchemy import func, select
from sync_app.models import Account

from async_app.service import open_account, total_balance

pytestmark = pytest.mark.asyncio


async def test_open_accounts_and_sum(async_db_session):
    await open_account(async_db_session, "carol", 10)
    await open_account(async_db_session, "dave", 5)
    assert await total_balance(async_db_session) == 15


async def test_every_test_starts_empty(async_db_session):
    assert await async_db_session.scalar(select(func.count(Account.id))) == 0


async def test_concurrent_queries_as_first_use_of_the_session(async_db_session):
    # The fixture's session has already joined the sandbox, so concurrent first use is safe.
    # (After a commit the next statement opens a new savepoint, so, as anywhere with
    # SQLAlchemy, do not share one AsyncSession between concurrent tasks then.)
    totals = await asyncio.gather(*(total_balance(async_db_session) for _ in range(3)))
    assert totals == [0, 0, 0]
