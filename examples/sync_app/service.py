from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from sync_app.models import Account, Transfer


class InsufficientFunds(Exception):
    pass


def open_account(session: Session, owner: str, deposit: int = 0) -> Account:
    account = Account(owner=owner, balance=deposit)
    session.add(account)
    session.commit()
    return account


def transfer(session: Session, source: str, target: str, amount: int) -> None:
    """Move money; commits on success, rolls back and raises when funds are short."""
    accounts = {
        a.owner: a
        for a in session.scalars(select(Account).where(Account.owner.in_([source, target])))
    }
    accounts[source].balance -= amount
    accounts[target].balance += amount
    session.add(
        Transfer(source_id=accounts[source].id, target_id=accounts[target].id, amount=amount)
    )
    try:
        session.commit()
    except DBAPIError:  # a CHECK violation: IntegrityError, or OperationalError on MariaDB
        session.rollback()
        raise InsufficientFunds(source) from None
