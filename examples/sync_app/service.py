from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

from sync_app.models import Account, Transfer

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


class InsufficientFunds(Exception):
    pass


def open_account(session: Session, owner: str, deposit: int = 0) -> Account:
    account = Account(owner=owner, balance=deposit)
    session.add(account)
    session.commit()
    return account


def transfer(session: Session, source: str, target: str, amount: int) -> None:
    """Move money; commits on success, rolls back and raises when funds are short."""
    query = select(Account).where(Account.owner.in_([source, target]))
    accounts = {account.owner: account for account in session.scalars(query)}
    paying, paid = accounts[source], accounts[target]
    paying.balance -= amount
    paid.balance += amount
    session.add(Transfer(source_id=paying.id, target_id=paid.id, amount=amount))
    try:
        session.commit()
    except DBAPIError:  # a CHECK violation: IntegrityError, or OperationalError on MariaDB
        session.rollback()
        raise InsufficientFunds(source) from None
