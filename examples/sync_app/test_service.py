import pytest
from sqlalchemy import func, select

from sync_app.models import Account, Transfer
from sync_app.service import InsufficientFunds, open_account, transfer


@pytest.fixture
def alice_and_bob(db_session):
    open_account(db_session, "alice", 100)
    open_account(db_session, "bob", 0)


def balances(session):
    return {
        owner: balance for owner, balance in session.execute(select(Account.owner, Account.balance))
    }


def test_transfer_commits(db_session, alice_and_bob):
    transfer(db_session, "alice", "bob", 30)
    assert balances(db_session) == {"alice": 70, "bob": 30}


def test_failed_transfer_rolls_back_only_itself(db_session, alice_and_bob):
    transfer(db_session, "alice", "bob", 30)
    with pytest.raises(InsufficientFunds):
        transfer(db_session, "alice", "bob", 500)
    assert balances(db_session) == {"alice": 70, "bob": 30}
    assert db_session.scalar(select(func.count(Transfer.id))) == 1


def test_every_test_starts_empty(db_session):
    assert db_session.scalar(select(func.count(Account.id))) == 0


def test_a_second_session_sees_committed_work(db_session, db_sessionmaker, alice_and_bob):
    with db_sessionmaker() as other:
        assert balances(other) == {"alice": 100, "bob": 0}
