"""pytest-alchemy against the other ways to isolate tests on PostgreSQL, as pytest runs them.

    .venv/bin/python benchmarks/alternatives.py [--url URL] [--small 10] [--large 60] [--rounds 3]

The same suite (each test inserts a user, commits, and counts the users: 1 when isolated) is
run as whole pytest processes with each tool, small and large, interleaved round by round;
reported: milliseconds per test (the slope between the two sizes, medians), each tool's ratio
to pytest-alchemy, and whether every test passed (isolation held).

- pytest-alchemy: ``db_session`` (a sandbox per test, the schema built once per run);
- the hand-written recipe (``benchmarks/recipes.py``): connect, begin, a ``create_savepoint``
  Session, roll back;
- pytest-postgresql (``postgresql_noproc`` on the running server + ``postgresql``): a database
  per test, created from a template holding the schema, dropped after it;
- pytest-mock-resources (``create_postgres_fixture(Base, session=True)`` on the running
  server): a database per test with the schema created in it;
- pytest-flask-sqlalchemy: a transaction per test through Flask-SQLAlchemy; it is run to see
  whether it works on this SQLAlchemy at all.

The tools live in a virtualenv of their own (``benchmarks/.venv-alternatives``, made on first
use), so their pytest plugins never load into this project's own test runs.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from recipes import RECIPE
from sqlalchemy import create_engine, make_url, text

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(__file__).resolve().parent / ".venv-alternatives"
TOOLS = ["pytest-postgresql>=6", "pytest-mock-resources>=2.10", "pytest-flask-sqlalchemy>=1.1"]
ALL_PLUGINS = ("alchemy", "pytest_postgresql", "pytest_mock_resources", "pytest-flask-sqlalchemy")

MODELS = """
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "bench_user"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(100), unique=True)
"""

TEST = """
def test_{n}(session):
    session.add(User(email="ada@example.com"))
    session.commit()
    assert session.scalar(select(func.count(User.id))) == 1
"""

CONFTESTS = {
    "pytest-alchemy": """
import pytest


@pytest.fixture
def session(db_session):
    return db_session
""",
    "recipe": "URL = {url!r}\n" + RECIPE[False],
    "pytest-postgresql": """
import pytest
from pytest_postgresql import factories
from sqlalchemy import create_engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from models import Base


def load(host, port, user, dbname, password=None, **kwargs):
    engine = create_engine(f"postgresql+psycopg://{{user}}@{{host}}:{{port}}/{{dbname}}")
    Base.metadata.create_all(engine)
    engine.dispose()


postgresql_noproc = factories.postgresql_noproc(
    host={host!r}, port={port}, user={user!r}, dbname="bench_alt_pgsql", load=[load]
)
postgresql = factories.postgresql("postgresql_noproc")


@pytest.fixture
def session(postgresql):
    engine = create_engine(
        "postgresql+psycopg://", creator=lambda: postgresql, poolclass=StaticPool
    )
    with Session(engine) as session:
        yield session
    engine.dispose()
""",
    "pytest-mock-resources": """
import pytest
from pytest_mock_resources import PostgresConfig, create_postgres_fixture

from models import Base


@pytest.fixture(scope="session")
def pmr_postgres_config():
    return PostgresConfig(host={host!r}, port={port}, username={user!r}, password="",
                          root_database="postgres")


@pytest.fixture(scope="session")
def pmr_postgres_container():
    yield None  # the server runs already: no container


pg = create_postgres_fixture(Base, session=True)


@pytest.fixture
def session(pg):
    return pg
""",
    "pytest-flask-sqlalchemy": """
import pytest
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from models import Base


@pytest.fixture(scope="session")
def app():
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = {url!r}
    return app


@pytest.fixture(scope="session")
def _db(app):
    db = SQLAlchemy(app, model_class=Base)
    with app.app_context():
        Base.metadata.create_all(db.engine)
        yield db
        Base.metadata.drop_all(db.engine)


@pytest.fixture
def session(db_session):
    return db_session
""",
}


def _venv_python() -> Path:
    python = VENV / "bin" / "python"
    if not python.exists():
        print(f"making {VENV} (once) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "-e", f"{ROOT}[postgresql]", "flask",
             "flask-sqlalchemy", *TOOLS],
            check=True,
        )  # fmt: skip
    return python


def _project(tool: str, url: str, size: int) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=f"alt_{tool}_{size}_"))
    parsed = make_url(url)
    values = {"url": url, "host": parsed.host, "port": parsed.port or 5432, "user": parsed.username}
    (folder / "models.py").write_text(MODELS)
    (folder / "conftest.py").write_text(textwrap.dedent(CONFTESTS[tool]).format(**values))
    head = "from sqlalchemy import func, select\n\nfrom models import User\n"
    (folder / "test_suite.py").write_text(head + "".join(TEST.format(n=n) for n in range(size)))
    ini = ["[pytest]", "pythonpath = ."]
    if tool == "pytest-alchemy":
        ini += [f"alchemy_url = {url}", "alchemy_metadata = models:Base"]
    (folder / "pytest.ini").write_text("\n".join(ini) + "\n")
    return folder


def _run(python: Path, tool: str, folder: Path) -> tuple[float, bool, str]:
    mine = {
        "pytest-alchemy": "alchemy",
        "pytest-postgresql": "pytest_postgresql",
        "pytest-mock-resources": "pytest_mock_resources",
        "pytest-flask-sqlalchemy": "pytest-flask-sqlalchemy",
    }.get(tool)
    disabled = [arg for p in ALL_PLUGINS if p != mine for arg in ("-p", f"no:{p}")]
    command = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *disabled]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=900)
    took = time.perf_counter() - started
    last = (done.stdout.strip().splitlines() or [""])[-1]
    if done.returncode != 0:
        first_error = next(
            (line for line in done.stdout.splitlines() if line.startswith("E ")), last
        )
        return took, False, first_error.strip()
    return took, True, last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="postgresql+psycopg://postgres@127.0.0.1:5432/bench_alt")
    parser.add_argument("--small", type=int, default=10)
    parser.add_argument("--large", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    python = _venv_python()
    url = args.url
    admin = create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    name = make_url(url).database
    with admin.connect() as connection:  # the recipe's and Flask's database (the base one)
        connection.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        connection.execute(text(f"CREATE DATABASE {name}"))
    tools = [t for t in CONFTESTS if not args.only or t in args.only]
    projects = {(t, n): _project(t, url, n) for t in tools for n in (args.small, args.large)}
    times: dict[tuple[str, int], list[float]] = {key: [] for key in projects}
    broken: dict[str, str] = {}
    try:
        for _ in range(args.rounds):
            for tool in tools:
                if tool in broken:
                    continue
                for size in (args.small, args.large):
                    took, passed, said = _run(python, tool, projects[tool, size])
                    if not passed:
                        broken[tool] = said
                        break
                    times[tool, size].append(took)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()
    per_test = {}
    for tool in tools:
        if tool in broken:
            continue
        small, large = (statistics.median(times[tool, n]) for n in (args.small, args.large))
        per_test[tool] = (large - small) / (args.large - args.small) * 1000
    base = per_test.get("pytest-alchemy")
    print(f"{args.large} vs {args.small} tests, PostgreSQL, psycopg, medians of {args.rounds}:")
    for tool in tools:
        if tool in broken:
            print(f"  {tool:24s} did not run: {broken[tool][:160]}")
            continue
        ratio = f"{per_test[tool] / base:5.1f}x pytest-alchemy" if base else ""
        large = statistics.median(times[tool, args.large])
        print(f"  {tool:24s} {per_test[tool]:7.1f} ms per test  {ratio}  ({large:.1f} s for "
              f"{args.large} tests)")  # fmt: skip


if __name__ == "__main__":
    main()
