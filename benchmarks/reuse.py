"""First run (builds a 200-table schema) against a second run with --alchemy-reuse.

    .venv/bin/python benchmarks/reuse.py [--url URL] [--tables 200] [--repeats 3]

Runs a two-test suite as pytest subprocesses: without reuse (build, run, drop), then with reuse
twice (the first builds and keeps, the second reuses), and prints medians. The plugin only
touches the databases it derives from the URL (test_bench, test_bench_template), and drops them
at the end. (A throwaway server, postgresql+ephemeral://, starts empty every run, so reuse
cannot help there.)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = """
from sqlalchemy import Column, ForeignKey, Integer, MetaData, String, Table

metadata = MetaData()
previous = None
for n in range({tables}):
    columns = [Column("id", Integer, primary_key=True), Column("name", String(50), index=True)]
    if previous is not None:
        columns.append(Column("parent_id", Integer, ForeignKey(f"{{previous}}.id")))
    Table(f"bench_{{n}}", metadata, *columns)
    previous = f"bench_{{n}}"
"""

TESTS = """
from sqlalchemy import text

def test_a(db_session):
    assert db_session.execute(text("SELECT COUNT(*) FROM bench_0")).scalar() == 0

def test_b(db_session):
    assert db_session.execute(text("SELECT COUNT(*) FROM bench_199")).scalar() == 0
"""


def run(folder: Path, *args: str) -> float:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(done.stdout[-3000:])
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="postgresql+psycopg://postgres@127.0.0.1:5432/bench")
    parser.add_argument("--tables", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "pytest.ini").write_text(
            "[pytest]\npythonpath = .\nalchemy_metadata = models:metadata\n"
            f"alchemy_url = {args.url}\n"
        )
        (folder / "models.py").write_text(MODELS.format(tables=args.tables))
        (folder / "test_bench.py").write_text(TESTS.replace("199", str(args.tables - 1)))
        fresh, reused = [], []
        for _ in range(args.repeats):
            fresh.append(run(folder))
            run(folder, "--alchemy-reuse")  # builds and keeps
            reused.append(run(folder, "--alchemy-reuse"))
        run(folder)  # without reuse: replaces what was kept, and drops it
    first, second = statistics.median(fresh), statistics.median(reused)
    print(
        f"{args.tables}-table schema on {args.url}: first run without reuse {first:.2f}s, "
        f"second run with reuse {second:.2f}s ({first / second:.1f}x faster); "
        f"medians of {args.repeats}, whole pytest processes"
    )


if __name__ == "__main__":
    main()
