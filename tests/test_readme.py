"""The README's snippets: the quick start runs as written, on every backend; the snippets of
the sections in SECTIONS run too, on SQLite; every Python and TOML block at least parses, so
none rots unnoticed.

A block whose first line is ``# file: <path>`` is a file of the section's project, written
as is. In SECTIONS, every other Python block is a test module of its own, run after PRELUDE
(the names of the README's application, ``myapp``, which SCAFFOLD provides), and the TOML
blocks' ini options are the project's.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from conftest import SYNC_BACKENDS, Driver, flask_migrations, project_for

#: The README's Hypothesis section speaks of the health check of Hypothesis's plugin.
pytestmark = pytest.mark.inner_plugins("hypothesispytest")

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
_FILE = re.compile(r"#\s*file:\s*(\S+)")


def _blocks(text: str) -> list[tuple[str, str]]:
    return [(lang, body) for lang, body in _BLOCK.findall(text)]


def _section(title: str, level: str = "##") -> str:
    text = README.read_text()
    start = text.index(f"\n{level} {title}\n")
    ends = [i for i in (text.find("\n## ", start + 1), text.find("\n### ", start + 1)) if i != -1]
    return text[start : min(ends) if ends else None]


def _files(section: str) -> dict[str, str]:
    found = {}
    for _, body in _blocks(section):
        first = body.splitlines()[0] if body else ""
        named = _FILE.match(first)
        if named:
            found[named.group(1)] = body
    return found


@pytest.mark.parametrize("driver", SYNC_BACKENDS, ids=lambda d: d.id)
def test_the_quick_start_runs_as_written(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    """Its three files, as they stand, pass on the backend (the URL given on the command
    line, which takes precedence over the file's): three tests, sync and async."""
    files = _files(_section("Quick start"))
    assert set(files) == {"pyproject.toml", "myapp.py", "test_signup.py"}
    project = project_for(driver, scratch_databases, pytester)
    for path, body in files.items():
        (pytester.path / path).write_text(body)
    result = pytester.runpytest_inprocess(
        "-p", "no:cacheprovider", "-p", "no:randomly", "-p", "no:xdist",
        f"--alchemy-url={project.url}",
    )  # fmt: skip
    result.assert_outcomes(passed=3)


#: The application the README's snippets speak of, as far as the sections in SECTIONS need it.
SCAFFOLD = {
    "myapp/__init__.py": """
from sqlalchemy import ForeignKey, String, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(200), unique=True)


class Author(Base):
    __tablename__ = "authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    books: Mapped[list["Book"]] = relationship(back_populates="author")


class Book(Base):
    __tablename__ = "books"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(100))
    author_id: Mapped[int] = mapped_column(ForeignKey("authors.id"))
    author: Mapped[Author] = relationship(back_populates="books")


class Member(Base):
    __tablename__ = "members"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))


def signup(session, email):
    session.add(User(email=email))
    session.commit()


def list_members(session):
    return session.scalars(select(Member)).all(), session.scalar(select(func.count(Member.id)))
""",
    "myapp/models.py": "from myapp import Author, Base, Book, Member, User  # noqa: F401\n",
    "myapp/tests/__init__.py": "",
    # The worker of "Tests that need real commits": it sees the committed job, or fails.
    "myapp/worker.py": """
import sys

from sqlalchemy import create_engine, text

engine = create_engine(sys.argv[-1])
with engine.begin() as connection:
    names = connection.execute(text("SELECT name FROM jobs")).scalars().all()
engine.dispose()
sys.exit(0 if names == ["mail"] else f"the worker found {names!r}")
""",
}
PRELUDE = (
    "import pytest\nimport pytest_alchemy\nfrom sqlalchemy import func, select\n\n"
    "from myapp import *\n\n"
)

#: The application's own engines, as its modules make them (URLs from the environment).
_APP_DB = """
import os

from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker

engine = create_engine(os.environ["MYAPP_URL"])
SessionLocal = sessionmaker(engine)
async_engine = create_async_engine(os.environ["MYAPP_ASYNC_URL"])
async_session = async_sessionmaker(async_engine, expire_on_commit=False)


async def get_session():
    async with async_session() as session:
        yield session
"""
_USERS = """
from myapp.db import SessionLocal
from myapp.models import User


def signup(email):
    with SessionLocal() as session:
        session.add(User(email=email))
        session.commit()
"""
_FASTAPI = """
from fastapi import Depends, FastAPI
from pydantic import BaseModel

from myapp.db import get_session
from myapp.models import User

app = FastAPI()


class NewUser(BaseModel):
    name: str


@app.post("/users", status_code=201)
async def create_user(new: NewUser, session=Depends(get_session)):
    session.add(User(email=new.name))
    await session.commit()
    return {"name": new.name}
"""
_FLASK = """
import os

from flask import Flask, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


class User(db.Model):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(200), unique=True)


def create_app():
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["MYAPP_URL"]
    db.init_app(app)

    @app.post("/users")
    def create_user():
        db.session.add(User(email=request.json["name"]))
        db.session.commit()
        return {"name": request.json["name"]}, 201

    return app


app = create_app()
"""

_FLASK_MIGRATE = _FLASK.replace(
    "    db.init_app(app)\n", "    db.init_app(app)\n    Migrate(app, db)\n"
).replace("from flask_sqlalchemy import SQLAlchemy\n", "from flask_migrate import Migrate\n"
          "from flask_sqlalchemy import SQLAlchemy\n")  # fmt: skip
_REVISION = '''
"""users"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "users",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", sa.String(200), unique=True),
    )


def downgrade():
    op.drop_table("users")
'''


_HEROES = """
from sqlmodel import Field, SQLModel


class Hero(SQLModel, table=True):
    __tablename__ = "users"
    id: int | None = Field(default=None, primary_key=True)
    name: str
"""

#: Section title: the files its snippets need beyond SCAFFOLD.
SECTIONS: dict[str, dict[str, str]] = {
    "Tests that need real commits": {},
    "Data for a module, a class or a package": {},
    "Commit hooks": {},
    "Assertions on the statements a test sends": {},
    "Factories: factory_boy, pytest-factoryboy, polyfactory": {},
    "Hypothesis": {},
    "N+1 queries": {},
    "Tests that must not touch the database": {},
    "The application's own engines": {"myapp/db.py": _APP_DB, "myapp/users.py": _USERS},
    "FastAPI": {"myapp/db.py": _APP_DB, "myapp/main.py": _FASTAPI},
    "Flask-SQLAlchemy": {"myapp/__init__.py": _FLASK},
    "Engines made at run time": {"myapp/__init__.py": _FLASK},
    "Fixtures that create and drop the tables": {"myapp/db.py": _APP_DB},
    "Asyncio": {"myapp/db.py": _APP_DB, "myapp/main.py": _FASTAPI},
    "Several schemas in one run": {"myapp/heroes.py": _HEROES},
    "Flask-Migrate": {"myapp/__init__.py": _FLASK_MIGRATE},
    "SQLModel": {
        "myapp/db.py": _APP_DB,
        "myapp/models.py": _HEROES.replace('    __tablename__ = "users"\n', "")
        + "\n__all__ = ['Hero', 'SQLModel']\n",
    },
}
#: What the section's text says is configured, where its own blocks do not show it.
SECTION_INI: dict[str, dict[str, object]] = {
    "Fixtures that create and drop the tables": {"alchemy_engines": ["myapp.db:engine"]},
    "Asyncio": {"alchemy_engines": ["myapp.db:async_session"]},
    "Flask-Migrate": {  # the schema comes from the migrations, as the section says
        "alchemy_metadata": None,
        "filterwarnings": ["error", "ignore:'get_engine' is deprecated:DeprecationWarning"],
    },
}


def _ini_options(toml_body: str) -> dict[str, object]:
    """A TOML block's pytest ini options (a fragment's keys are the options themselves)."""
    import tomllib

    parsed = tomllib.loads(toml_body)
    if "tool" in parsed:
        return dict(parsed["tool"].get("pytest", {}).get("ini_options", {}))
    return parsed


def _ini(options: dict[str, object]) -> str:
    lines = ["[pytest]"]
    for key, value in options.items():
        if value is None:
            continue
        if isinstance(value, list):
            lines.append(f"{key} =" + "".join(f"\n    {item}" for item in value))
        else:
            lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


@pytest.mark.skipif(sys.version_info < (3, 11), reason="reads the TOML blocks with tomllib")
@pytest.mark.parametrize("title", SECTIONS)
def test_the_snippets_of_a_section_run(
    title: str, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each Python block of the section runs as a test module on the README's application,
    with the section's ini options, on SQLite (the URL the README names is overridden); its
    tests pass."""
    section = (
        _section(title, "###") if f"\n### {title}\n" in README.read_text() else (_section(title))
    )
    database = pytester.path / "myapp.sqlite3"
    monkeypatch.setenv("MYAPP_URL", f"sqlite:///{database}")
    monkeypatch.setenv("MYAPP_ASYNC_URL", f"sqlite+aiosqlite:///{database}")
    options: dict[str, object] = {
        "pythonpath": ".",
        "alchemy_metadata": "myapp:Base",
        "filterwarnings": "error",
        "asyncio_default_fixture_loop_scope": "session",
        "asyncio_default_test_loop_scope": "session",
    }
    options.update(SECTION_INI.get(title, {}))
    tests = 0
    if title == "Flask-Migrate":  # with one revision: the users table
        (flask_migrations(pytester.path) / "versions" / "0001_users.py").write_text(_REVISION)
    for path, body in {**SCAFFOLD, **SECTIONS[title]}.items():
        (pytester.path / path).parent.mkdir(parents=True, exist_ok=True)
        (pytester.path / path).write_text(body)
    for number, (lang, body) in enumerate(_blocks(section)):
        named = _FILE.match(body.splitlines()[0]) if body else None
        if lang == "toml":
            options.update(_ini_options(body))
        elif lang == "python" and named:
            path = pytester.path / named.group(1)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(body)
            if path.name.startswith("test_"):
                tests += body.count("\ndef test_") + body.count("\nasync def test_")
        elif lang == "python":
            (pytester.path / f"test_snippet_{number}.py").write_text(PRELUDE + body)
            tests += body.count("\ndef test_") + body.startswith("def test_")
            tests += body.count("\nasync def test_")
    (pytester.path / "pytest.ini").write_text(_ini(options))
    assert tests, f"no test in the snippets of {title!r}"
    result = pytester.runpytest_inprocess(
        "-p", "no:cacheprovider", "-p", "no:randomly", "-p", "no:xdist", f"--alchemy-url=sqlite:///{database}",
    )  # fmt: skip
    result.assert_outcomes(passed=tests)


def test_every_python_block_is_run() -> None:
    """A Python snippet added to a section no test runs fails here: add the section to
    SECTIONS (with the application files it speaks of)."""
    text = README.read_text()
    headings = [(m.start(), m.group(2)) for m in re.finditer(r"^(##|###) (.+)$", text, re.M)]
    not_run = []
    for block in _BLOCK.finditer(text):
        if block.group(1) != "python":
            continue
        title = [heading for at, heading in headings if at < block.start()][-1]
        if title != "Quick start" and title not in SECTIONS:
            not_run.append(f"{title}: {block.group(2).splitlines()[0]}")
    assert not_run == []


def test_every_python_and_toml_block_parses() -> None:
    """Python blocks compile, TOML blocks load: a snippet with a syntax error is a defect."""
    problems = []
    for number, (lang, body) in enumerate(_blocks(README.read_text()), 1):
        try:
            if lang == "python":
                compile(body, f"README block {number}", "exec")
            elif lang == "toml" and sys.version_info >= (3, 11):
                import tomllib

                tomllib.loads(body)
        except (SyntaxError, ValueError) as exc:
            problems.append(f"block {number} ({lang}): {exc}")
    assert problems == []
