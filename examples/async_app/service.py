from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import select
from sync_app.models import Account

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession


async def open_account(session: AsyncSession, owner: str, deposit: int = 0) -> int:
    account = Account(owner=owner, balance=deposit)
    session.add(account)
    await session.flush()
    account_id = account.id  # read before commit: commit expires the object
    await session.commit()
    return account_id


async def total_balance(session: AsyncSession) -> int:
    return sum((await session.scalars(select(Account.balance))).all())
