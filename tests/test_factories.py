"""Factories bound to the test's sandbox: factory_boy, pytest-factoryboy and polyfactory.

The factories name no session of their own: ini ``alchemy_factories`` binds them, by module
or base class, or the application's routed session is theirs already. Each test sees only
the rows its own factories made.
"""

from __future__ import annotations

import pytest
from conftest import ASYNC_BACKENDS, SYNC_BACKENDS, Driver, Project, project_for

MODELS = """
from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "alchemy_author"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    books: Mapped[list["Book"]] = relationship(back_populates="author")


class Book(Base):
    __tablename__ = "alchemy_book"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(50))
    author_id: Mapped[int] = mapped_column(ForeignKey("alchemy_author.id"))
    author: Mapped[Author] = relationship(back_populates="books")
"""

FACTORY_BOY = """
import factory
from factory.alchemy import SQLAlchemyModelFactory

from models import Author, Book


class BaseFactory(SQLAlchemyModelFactory):
    class Meta:
        abstract = True
        sqlalchemy_session_persistence = "commit"


class AuthorFactory(BaseFactory):
    class Meta:
        model = Author

    name = factory.Sequence(lambda n: f"author {n}")


class BookFactory(BaseFactory):
    class Meta:
        model = Book

    title = factory.Sequence(lambda n: f"book {n}")
    author = factory.SubFactory(AuthorFactory)
"""

FACTORY_BOY_TESTS = """
import pytest
from pytest_factoryboy import register
from sqlalchemy import func, select

from factories import AuthorFactory, BaseFactory, BookFactory
from models import Author, Book

register(AuthorFactory)


class EssayFactory(BookFactory):  # defined here, bound through BaseFactory
    title = "an essay"


def count(session, model):
    return session.scalar(select(func.count()).select_from(model))


@pytest.mark.parametrize("run", [1, 2])
def test_each_test_sees_only_its_own_rows(db_session, run):
    BookFactory.create_batch(2)
    assert count(db_session, Book) == 2
    assert count(db_session, Author) == 2


def test_pytest_factoryboy_fixtures(author, db_session):
    assert db_session.get(Author, author.id).name == author.name
    assert count(db_session, Author) == 1


def test_a_subclass_defined_in_a_test_module(db_session):
    EssayFactory()
    assert db_session.scalars(select(Book.title)).all() == ["an essay"]


@pytest.fixture(scope="module")
def shelf(db_layer, request):
    with db_layer(request):
        return BookFactory.create_batch(3)


def test_in_a_layer(shelf, db_session):
    assert count(db_session, Book) == 3
    BookFactory()
    assert count(db_session, Book) == 4


def test_after_the_layer_test(shelf, db_session):
    assert count(db_session, Book) == 3
"""


def _project(driver: Driver, scratch: dict[str, str], pytester: pytest.Pytester) -> Project:
    project = project_for(driver, scratch, pytester)
    pytester.makepyfile(models=MODELS)
    return project


@pytest.mark.inner_plugins("pytest-factoryboy")
@pytest.mark.parametrize("driver", SYNC_BACKENDS, ids=lambda d: d.id)
def test_factory_boy_factories_named_by_module_or_base_class(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    """factory_boy factories with no session, bound through the ini by base class: sub
    factories, pytest-factoryboy's register, a subclass defined in a test module, a db_layer
    block; each test sees its own rows only, whatever the factories committed."""
    project = _project(driver, scratch_databases, pytester)
    pytester.makepyfile(factories=FACTORY_BOY)
    project.ini("alchemy_factories = factories:BaseFactory\n")
    project.tests(FACTORY_BOY_TESTS)
    project.run().assert_outcomes(passed=6)
    assert project.leftover_tables() == []


ROUTED_TESTS = """
import factory
from factory.alchemy import SQLAlchemyModelFactory
from sqlalchemy import func, select

import app
from models import Author


class AuthorFactory(SQLAlchemyModelFactory):  # the application's own scoped session
    class Meta:
        model = Author
        sqlalchemy_session = app.Session
        sqlalchemy_session_persistence = "commit"

    name = factory.Sequence(lambda n: f"author {n}")


def test_one(db_session):
    AuthorFactory.create_batch(2)
    assert db_session.scalar(select(func.count()).select_from(Author)) == 2


def test_two(db_session):
    AuthorFactory()
    assert db_session.scalar(select(func.count()).select_from(Author)) == 1
"""


def test_a_factory_on_the_applications_routed_session_needs_nothing(
    scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    """A factory whose session is the application's scoped session in alchemy_engines
    writes into the sandbox as it is."""
    driver = SYNC_BACKENDS[1]  # PostgreSQL: a server every test connects to
    project = _project(driver, scratch_databases, pytester)
    pytester.makepyfile(
        app=f"""
from sqlalchemy import create_engine
from sqlalchemy.orm import scoped_session, sessionmaker
engine = create_engine({project.url!r})
Session = scoped_session(sessionmaker(engine))
"""
    )
    project.ini("alchemy_engines = app:Session\n")
    project.tests(ROUTED_TESTS)
    project.run().assert_outcomes(passed=2)


POLYFACTORY = """
from polyfactory.factories.sqlalchemy_factory import SQLAlchemyFactory

from models import Author


class AuthorFactory(SQLAlchemyFactory[Author]):
    __set_relationships__ = False
"""

POLYFACTORY_TESTS = """
import pytest
from sqlalchemy import func, select

from factories import AuthorFactory
from models import Author


def test_sync(db_session):
    AuthorFactory.create_sync()
    assert db_session.scalar(select(func.count()).select_from(Author)) == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("run", [1, 2])
async def test_async(async_db_session, run):
    await AuthorFactory.create_batch_async(2)
    assert await async_db_session.scalar(select(func.count()).select_from(Author)) == 2
"""


@pytest.mark.parametrize("driver", ASYNC_BACKENDS, ids=lambda d: d.id)
def test_polyfactory_factories_named_by_module(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    """polyfactory's SQLAlchemyFactory, named by module: create_sync through db_session,
    create_async through async_db_session, each test with its own rows."""
    project = _project(driver, scratch_databases, pytester)
    pytester.makepyfile(factories=POLYFACTORY)
    project.ini("alchemy_factories = factories\n")
    project.tests(POLYFACTORY_TESTS)
    project.run().assert_outcomes(passed=3)


def test_a_bad_factories_path_is_a_usage_error(pytester: pytest.Pytester) -> None:
    project = Project(pytester, None)
    project.ini("alchemy_factories = nowhere:Factory\n")
    project.tests("def test_one():\n    pass\n")
    result = project.run()
    result.stderr.fnmatch_lines(
        ["*alchemy_factories = 'nowhere:Factory': ModuleNotFoundError: No module named 'nowhere'*"]
    )
