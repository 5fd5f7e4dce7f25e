"""``db_layer``: rows a class-, module- or package-scoped fixture commits once; every test of
its scope sees them (its sandbox rolls back to them, a commit test is restored to them, the
application's engines and async tests see them), and the scope's end undoes them."""

from __future__ import annotations

import pytest
from conftest import (
    ASYNC_BACKENDS,
    SYNC_BACKENDS,
    Driver,
    Project,
    subset,
)
from test_commit import _project, routed_project

LAYERED = """
import pytest
from sqlalchemy import select, text

from models import Item

RUNS = []


def names(session):
    return sorted(session.scalars(select(Item.name)).all())


@pytest.fixture(scope="module")
def items(db_layer, request):
    RUNS.append(1)
    with db_layer(request) as session:
        first = Item(name="layer a")
        session.add_all([first, Item(name="layer b")])
    return first


def test_sees_the_layer(db_session, items):
    assert names(db_session) == ["layer a", "layer b", "seed"]
    assert db_session.get(Item, items.id).name == "layer a"  # the object is usable by id
    db_session.add(Item(name="mine"))
    db_session.delete(db_session.get(Item, items.id))
    db_session.commit()


def test_finds_the_layer_as_it_was(db_session, items):
    assert names(db_session) == ["layer a", "layer b", "seed"]
    assert db_session.merge(items).name == "layer a"


@pytest.mark.alchemy(strategy="commit")
def test_a_commit_test_is_restored_to_the_layer(db_session, items):
    assert names(db_session) == ["layer a", "layer b", "seed"]
    item = Item(name="committed")
    db_session.add(item)
    db_session.flush()
    assert item.id == 4  # after the seed's 1 and the layer's 2 and 3
    db_session.commit()


@pytest.mark.alchemy(strategy="commit")
def test_and_the_next_one_too(db_session, items):
    assert names(db_session) == ["layer a", "layer b", "seed"]
    assert len(RUNS) == 2  # once for the sandboxed tests, once for the commit tests, run last


class TestAClassLayer:
    @pytest.fixture(scope="class")
    @classmethod
    def more(cls, db_layer, request, items):
        with db_layer(request) as session:
            session.add(Item(name="class"))

    def test_sees_both_layers(self, db_session, more):
        assert names(db_session) == ["class", "layer a", "layer b", "seed"]


def test_after_the_class_only_the_module_layer(db_session, items):
    assert names(db_session) == ["layer a", "layer b", "seed"]
"""

AFTER = """
import pytest
from sqlalchemy import select

from models import Item


def test_after_the_module(db_session):
    assert db_session.scalars(select(Item.name)).all() == ["seed"]


@pytest.mark.alchemy(strategy="commit")
def test_after_the_module_ids_start_where_the_seed_left_them(db_session):
    assert db_session.scalars(select(Item.name)).all() == ["seed"]
    item = Item(name="z")
    db_session.add(item)
    db_session.flush()
    assert item.id == 2
"""


@pytest.mark.parametrize("driver", SYNC_BACKENDS, ids=lambda d: d.id)
def test_a_layer_is_seen_by_its_scope_and_undone_after_it(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = _project(driver, scratch_databases, pytester)
    project.tests(LAYERED, name="test_a")
    project.tests(AFTER, name="test_b")
    project.run().assert_outcomes(passed=8)


ASYNC_LAYERED = """
import pytest
from sqlalchemy import select

from models import Item


@pytest.fixture(scope="module")
def items(db_layer, request):
    with db_layer(request) as session:
        session.add(Item(name="layer"))


@pytest.mark.asyncio
async def test_an_async_test_sees_the_layer(async_db_session, items):
    found = await async_db_session.scalars(select(Item.name).order_by(Item.name))
    assert found.all() == ["layer", "seed"]
    async_db_session.add(Item(name="mine"))
    await async_db_session.commit()


@pytest.mark.asyncio
async def test_and_not_the_previous_tests_rows(async_db_session, items):
    found = await async_db_session.scalars(select(Item.name).order_by(Item.name))
    assert found.all() == ["layer", "seed"]
"""


@pytest.mark.parametrize("driver", ASYNC_BACKENDS, ids=lambda d: d.id)
def test_async_tests_see_a_layer(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = _project(driver, scratch_databases, pytester)
    project.tests(ASYNC_LAYERED, name="test_a")
    project.tests(AFTER, name="test_b")
    project.run().assert_outcomes(passed=4)


ROUTED_LAYERED = """
import pytest
from sqlalchemy import select

import app
from models import Item


@pytest.fixture(scope="module")
def items(db_layer, request):
    with db_layer(request) as session:
        session.add(Item(name="layer"))


def test_the_application_sees_the_layer(items):
    with app.Session() as session:
        assert sorted(session.scalars(select(Item.name)).all()) == ["layer", "seed"]
        session.add(Item(name="app"))
        session.commit()


def test_and_not_what_it_wrote_in_the_test_before(items):
    with app.Session() as session:
        assert sorted(session.scalars(select(Item.name)).all()) == ["layer", "seed"]
"""


@pytest.mark.parametrize(
    "driver", subset(SYNC_BACKENDS, "sqlite-pysqlite", "postgresql-psycopg"), ids=lambda d: d.id
)
def test_the_applications_engines_see_a_layer(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    project = routed_project(driver, scratch_databases, pytester)
    project.tests(ROUTED_LAYERED)
    project.run().assert_outcomes(passed=2)


def test_a_function_scoped_layer_is_refused(pytester: pytest.Pytester) -> None:
    project = Project(pytester, None)
    project.ini()
    project.tests(
        """
import pytest

@pytest.fixture
def rows(db_layer, request):
    with db_layer(request):
        pass

def test_x(rows):
    pass
"""
    )
    result = project.run()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*function-scoped fixture 'rows': a layer outlives tests*"])


XDIST = """
import pytest
from sqlalchemy import select

from models import Item


@pytest.fixture(scope="module")
def items(db_layer, request):
    with db_layer(request) as session:
        session.add(Item(name="layer"))


@pytest.mark.parametrize("n", range(6))
def test_sees_the_layer_only(db_session, items, n):
    assert sorted(db_session.scalars(select(Item.name)).all()) == ["layer", "seed"]
    db_session.add(Item(name=f"w{n}"))
    db_session.commit()
"""


def test_a_layer_under_xdist_is_each_workers(
    scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    """Under ``-n 2`` each worker writes the layer into its own database and undoes it there."""
    driver = subset(SYNC_BACKENDS, "postgresql-psycopg")[0]
    project = _project(driver, scratch_databases, pytester)
    project.tests(XDIST, name="test_a")
    project.tests(AFTER, name="test_b")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:randomly", "-n", "2")
    result.assert_outcomes(passed=8)
    assert project.leftover_tables() == []
