"""What the shapes of real suites cost per test, as ratios to the plain sandbox, one run.

    .venv/bin/python benchmarks/shapes.py [--tests N] [--repeats N] [--tables N] [--url URL]

Each variant is a small project run as a pytest subprocess (as users run it), with N and with
2N tests, interleaved repeat by repeat; per-test cost is the slope, (t(2N) - t(N)) / N, median
of the repeats, so one-off costs (building templates, starting pytest) cancel out:

- plain: tests that each insert a row through ``db_session`` and commit;
- routed: the same with the application's engine in ``alchemy_engines`` (what the
  create_all/drop_all variants pay before any DDL);
- two schemas: the same N tests, half of them in a directory whose conftest overrides the
  ``alchemy_metadata`` fixture (a second schema and test database; one switch of schema);
- two databases: the plain tests that also run one query on a second database of
  ``alchemy_databases`` (``db_connections["other"]``: a second sandbox per test);
- create_all/drop_all: the plain tests under an autouse fixture that runs
  ``Base.metadata.create_all(app.engine)`` / ``drop_all`` around each test through a routed
  engine, with the schema in ``alchemy_metadata`` (the DDL never reaches the server);
- the same, without ``alchemy_metadata``: every test creates and drops its tables inside the
  sandbox (what such suites paid before; not possible on MySQL/MariaDB).
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

MODELS = """
from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "bench_item"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))

{extra}
"""

EXTRA = """
class T{n}(Base):
    __tablename__ = "bench_t{n}"
    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("bench_item.id"), index=True)
    label: Mapped[str] = mapped_column(String(50))
"""

TEST = """
from models import Item


def test_{n}(db_session):
    db_session.add(Item(name="x"))
    db_session.commit()
"""

TWO_DATABASES_TEST = """
from sqlalchemy import text

from models import Item


def test_{n}(db_session, db_connections):
    db_session.add(Item(name="x"))
    db_session.commit()
    db_connections["other"].execute(text("SELECT 1"))
"""

TABLES_FIXTURE = """
import pytest

import app
from models import Base


@pytest.fixture(autouse=True)
def tables():
    Base.metadata.create_all(app.engine)
    yield
    Base.metadata.drop_all(app.engine)
"""


def _project(root: Path, url: str, tests: int, tables: int, variant: str) -> Path:
    folder = root / f"{variant}-{tests}"
    folder.mkdir()
    extra = "\n".join(EXTRA.format(n=n) for n in range(tables - 1))
    (folder / "models.py").write_text(MODELS.format(extra=extra))
    (folder / "other_models.py").write_text(MODELS.format(extra=extra))
    (folder / "app.py").write_text(
        f"from sqlalchemy import create_engine\nengine = create_engine({url!r})\n"
    )
    ini = ["[pytest]", "pythonpath = .", f"alchemy_url = {url}"]
    if variant != "create_all, no metadata":
        ini.append("alchemy_metadata = models:Base")
    if variant == "two databases":
        other = url.rsplit("/", 1)[0] + "/bench_other"
        ini.append(f"alchemy_databases =\n    other = {other} other_models:Base")
    if variant.startswith("create_all") or variant == "routed":
        ini.append("alchemy_engines = app:engine")
    if variant.startswith("create_all"):
        (folder / "conftest.py").write_text(TABLES_FIXTURE)
    (folder / "pytest.ini").write_text("\n".join(ini) + "\n")
    body = "".join(TEST.format(n=n) for n in range(tests))
    if variant == "two schemas":
        half = "".join(TEST.format(n=n) for n in range(tests // 2))
        (folder / "test_a.py").write_text(half)
        other = folder / "other"
        other.mkdir()
        (other / "conftest.py").write_text(
            textwrap.dedent(
                """
                import pytest


                @pytest.fixture(scope="session")
                def alchemy_metadata():
                    return "other_models:Base"
                """
            )
        )
        (other / "test_b.py").write_text(half.replace("from models", "from other_models"))
    elif variant == "two databases":
        body = "".join(TWO_DATABASES_TEST.format(n=n) for n in range(tests))
        (folder / "test_a.py").write_text(body)
    else:
        (folder / "test_a.py").write_text(body)
    return folder


def _run(folder: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"],
        cwd=folder,
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{folder.name} failed:\n{done.stdout[-3000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tables", type=int, default=10)
    parser.add_argument("--url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    variants = [
        "plain",
        "routed",
        "two schemas",
        "two databases",
        "create_all, built schema",
        "create_all, no metadata",
    ]
    sizes = (args.tests, 2 * args.tests)
    times: dict[tuple[str, int], list[float]] = {(v, n): [] for v in variants for n in sizes}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {
            (v, n): _project(Path(tmp), args.url, n, args.tables, v)
            for v in variants
            for n in sizes
        }
        for _ in range(args.repeats):
            for key, folder in folders.items():
                times[key].append(_run(folder))
    per_test = {
        v: (statistics.median(times[v, sizes[1]]) - statistics.median(times[v, sizes[0]]))
        / args.tests
        for v in variants
    }
    plain = per_test["plain"]
    driver = args.url.split("://")[0]
    print(
        f"{driver}, {args.tests} and {2 * args.tests} tests, {args.tables} tables, "
        f"median of {args.repeats}"
    )
    for variant, cost in per_test.items():
        print(f"  {variant:26s} {cost * 1e3:6.2f} ms/test  {cost / plain:5.2f}x plain")


if __name__ == "__main__":
    main()
