"""Commit hooks fire where production fires them: the same program, run in the sandbox and
with real commits (the commit strategy), fires the same session and engine events in the same
order: ``db_session``, sessions and connections of a routed engine, nested savepoints, their
async twins; and an application's on-commit queue runs its callbacks at the same moments."""

from __future__ import annotations

import json

import pytest
from conftest import ASYNC_BACKENDS, SYNC_BACKENDS, Driver, project_for

HOOKS = """
import json

import pytest
from sqlalchemy import event, insert
from sqlalchemy.orm import Session

import app
from models import Item

LOG = []


def after_commit(session):
    LOG.append(f"{session.info.get('who')}: after_commit nested={session.in_nested_transaction()}")
    # An application's on-commit queue: callbacks wait for the outermost commit.
    if not session.in_nested_transaction():
        for callback in session.info.pop("on_commit", []):
            callback()


def after_rollback(session):
    LOG.append(f"{session.info.get('who')}: after_rollback")


def after_soft_rollback(session, previous):
    LOG.append(f"{session.info.get('who')}: after_soft_rollback nested={previous.nested}")


ENGINE_EVENTS = {
    name: lambda *a, name=name: LOG.append(f"app engine: {name}")
    for name in ("commit", "rollback", "savepoint", "release_savepoint", "rollback_savepoint")
}


@pytest.fixture(autouse=True)
def hooks():
    # Listeners on the Session class are global: removed after each test, so that the runs
    # of one process (pytester's) do not fire each other's.
    listeners = [(Session, "after_commit", after_commit), (Session, "after_rollback",
        after_rollback), (Session, "after_soft_rollback", after_soft_rollback)]
    listeners += [(app.engine, name, fn) for name, fn in ENGINE_EVENTS.items()]
    for target, name, fn in listeners:
        event.listen(target, name, fn)
    yield
    for target, name, fn in listeners:
        event.remove(target, name, fn)


def on_commit(session, what):
    session.info.setdefault("on_commit", []).append(lambda: LOG.append(f"callback: {what}"))


def program(session):
    session.info["who"] = "db_session"
    session.add(Item(name="a"))
    on_commit(session, "a")
    session.commit()
    nested = session.begin_nested()
    session.add(Item(name="b"))
    on_commit(session, "b")
    nested.commit()  # SQLAlchemy fires after_commit for the release too
    LOG.append("-- released")
    session.commit()
    session.begin_nested()
    session.add(Item(name="c"))
    session.rollback()  # the savepoint
    session.rollback()
    with session.begin():
        session.add(Item(name="d"))
    with app.Session(info={"who": "app session"}) as other:
        other.add(Item(name="e"))
        on_commit(other, "e")
        with other.begin_nested():
            other.add(Item(name="f"))
        other.commit()
    with app.engine.begin() as conn:
        conn.execute(insert(Item).values(name="g"))
    with app.engine.connect() as conn:
        conn.execute(insert(Item).values(name="h"))
        conn.rollback()


@pytest.mark.parametrize(
    "strategy",
    ["rollback", pytest.param("commit", marks=pytest.mark.alchemy(strategy="commit"))],
)
def test_hooks(db_session, db_commits, strategy):
    program(db_session)
    LOG.append(f"db_commits: {[s.info.get('who') for s in db_commits]}")
    with open(f"hooks-{strategy}.json", "w") as out:
        json.dump(LOG, out)
    LOG.clear()
"""

ASYNC_HOOKS = """
import json

import pytest
from sqlalchemy import event
from sqlalchemy.orm import Session

from models import Item

LOG = []


def after_commit(session):
    LOG.append(f"after_commit nested={session.in_nested_transaction()}")


def after_soft_rollback(session, previous):
    LOG.append(f"after_soft_rollback nested={previous.nested}")


@pytest.fixture(autouse=True)
def hooks():
    event.listen(Session, "after_commit", after_commit)
    event.listen(Session, "after_soft_rollback", after_soft_rollback)
    yield
    event.remove(Session, "after_commit", after_commit)
    event.remove(Session, "after_soft_rollback", after_soft_rollback)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "strategy",
    ["rollback", pytest.param("commit", marks=pytest.mark.alchemy(strategy="commit"))],
)
async def test_hooks(async_db_session, db_commits, strategy):
    session = async_db_session
    session.add(Item(name="a"))
    await session.commit()
    nested = await session.begin_nested()
    session.add(Item(name="b"))
    await nested.commit()
    await session.commit()
    await session.begin_nested()
    await session.rollback()
    await session.rollback()
    async with session.begin():
        session.add(Item(name="d"))
    LOG.append(f"db_commits: {[s is session.sync_session for s in db_commits]}")
    with open(f"hooks-{strategy}.json", "w") as out:
        json.dump(LOG, out)
    LOG.clear()
"""


def _logs(pytester: pytest.Pytester) -> tuple[list[str], list[str]]:
    sandboxed = json.loads((pytester.path / "hooks-rollback.json").read_text())
    committed = json.loads((pytester.path / "hooks-commit.json").read_text())
    return sandboxed, committed


@pytest.mark.parametrize("driver", SYNC_BACKENDS, ids=lambda d: d.id)
def test_hooks_fire_in_the_sandbox_where_real_commits_fire_them(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = project_for(driver, scratch_databases, pytester)
    pytester.makepyfile(
        app=f"""
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker
engine = create_engine({project.url!r})
Session = sessionmaker(engine)
"""
    )
    project.ini("alchemy_engines = app:engine\n")
    project.tests(HOOKS)
    project.run().assert_outcomes(passed=2)
    sandboxed, committed = _logs(pytester)
    assert sandboxed == committed
    # What production fires, as the commit strategy's run shows: the queue waits for the
    # outermost commit even though after_commit fires for a released savepoint too.
    assert committed[:6] == [
        "db_session: after_commit nested=False",
        "callback: a",
        "db_session: after_commit nested=True",
        "-- released",
        "db_session: after_commit nested=False",
        "callback: b",
    ]
    assert "callback: e" in committed
    assert committed.count("app engine: commit") == 2
    # db_commits: the outermost session commits, in order (db_session's three: a, b, the
    # `with session.begin()` block; the application session's one).
    assert committed[-1] == (
        "db_commits: ['db_session', 'db_session', 'db_session', 'app session']"
    )


@pytest.mark.parametrize("driver", ASYNC_BACKENDS, ids=lambda d: d.id)
def test_async_hooks_fire_in_the_sandbox_where_real_commits_fire_them(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = project_for(driver, scratch_databases, pytester)
    project.ini()
    project.tests(ASYNC_HOOKS)
    project.run().assert_outcomes(passed=2)
    sandboxed, committed = _logs(pytester)
    assert sandboxed == committed
    assert committed[0] == "after_commit nested=False"
    assert committed[-1] == "db_commits: [True, True, True]"
