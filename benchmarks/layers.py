"""What a module's shared data costs: written per test, or once in a ``db_layer``.

    .venv/bin/python benchmarks/layers.py [--url URL] [--tests N] [--rows N] [--repeats N]

A module of ``--tests`` tests that each read ``--rows`` rows a fixture wrote, run as a pytest
subprocess three ways, interleaved ``--repeats`` times:

- per test: a function-scoped fixture writes the rows through ``db_session`` (in the
  sandbox, rolled back after each test);
- layer: a module-scoped fixture writes them once through ``db_layer``;
- none: the same tests reading nothing, for the run's fixed cost.

Reported: the median wall time of each run, how many times the fixture ran, and per test time
over "none". Medians; the machine is shared, so read the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = """
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Row(Base):
    __tablename__ = "layer_row"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(40))
"""

TESTS = """
import os

import pytest
from sqlalchemy import func, insert, select

from models import Row

ROWS = {rows}
MODE = os.environ["LAYER_MODE"]


def write(session):
    with open("runs.txt", "a") as out:
        out.write("1")
    session.execute(insert(Row), [{{"name": f"row {{i}}"}} for i in range(ROWS)])


if MODE == "layer":

    @pytest.fixture(scope="module")
    def data(db_layer, request):
        with db_layer(request) as session:
            write(session)

elif MODE == "per-test":

    @pytest.fixture
    def data(db_session):
        write(db_session)

else:

    @pytest.fixture
    def data():
        pass


@pytest.mark.parametrize("n", range({tests}))
def test_reads(db_session, data, n):
    expected = 0 if MODE == "none" else ROWS
    assert db_session.scalar(select(func.count()).select_from(Row)) == expected
"""


def run(folder: Path, mode: str) -> tuple[float, int]:
    runs = folder / "runs.txt"
    runs.unlink(missing_ok=True)
    env = {**os.environ, "LAYER_MODE": mode}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{done.stdout[-3000:]}")
    return elapsed, len(runs.read_text()) if runs.exists() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--tests", type=int, default=100)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "models.py").write_text(MODELS)
        (folder / "test_module.py").write_text(TESTS.format(rows=args.rows, tests=args.tests))
        (folder / "pytest.ini").write_text(
            f"[pytest]\npythonpath = .\nalchemy_metadata = models:Base\nalchemy_url = {args.url}\n"
        )
        times: dict[str, list[float]] = {}
        counts: dict[str, int] = {}
        for _ in range(args.repeats):
            for mode in ("none", "per-test", "layer"):
                elapsed, count = run(folder, mode)
                times.setdefault(mode, []).append(elapsed)
                counts[mode] = count
    median = {mode: statistics.median(found) for mode, found in times.items()}
    print(f"{args.tests} tests, {args.rows} rows each, {args.url.split('://')[0]}:")
    for mode in ("none", "per-test", "layer"):
        per_test = (median[mode] - median["none"]) / args.tests * 1000
        print(
            f"  {mode:<9} {median[mode]:6.2f} s   fixture ran {counts[mode]:>3}x   "
            f"{per_test:7.2f} ms per test over none"
        )
    print(f"  per-test / layer: {median['per-test'] / median['layer']:.1f}x the run's time")


if __name__ == "__main__":
    main()
