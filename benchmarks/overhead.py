"""What a test costs under pytest with the plugin, as users run it: whole pytest processes.

    .venv/bin/python benchmarks/overhead.py [--url URL] [--small N] [--large N] [--repeats N]

Suites of tests that request a session and do nothing, against PostgreSQL (psycopg) with a
50-table schema, run as pytest subprocesses, interleaved, ``--repeats`` times each. Reported
in ms over the same tests without any fixture, two ways: "each", the median time one test
takes inside the ``--large`` run (setup, call, teardown, reporting: all of pytest's per-test
work; the figure quoted, steady on a shared machine), and "cpu", the slope of the process's
CPU time between a ``--small`` and a ``--large`` run (start-up and provisioning cancel out;
it moved by +-0.3 ms per test between runs here):

- recipe: the hand-written fixture (connect, ``begin()``, a ``create_savepoint`` Session;
  close, rollback, close), on the same schema built once per run;
- plugin: ``db_session``;
- noop: a fixture that yields None (async: a pytest-asyncio async fixture), the floor any
  fixture of that kind costs under pytest;
- and the same for async tests (pytest-asyncio, one loop per session): ``async_db_session``
  against the async recipe, on psycopg's async driver.

Medians of the repeats; the machine is shared, so read the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from recipes import RECIPE

TABLES = 50
MODELS = "\n".join(
    [
        "from sqlalchemy import ForeignKey, Integer, String",
        "from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column",
        "",
        "",
        "class Base(DeclarativeBase):",
        "    pass",
        "",
    ]
    + [
        f"class T{n}(Base):\n"
        f'    __tablename__ = "ov_t{n}"\n'
        f"    id: Mapped[int] = mapped_column(Integer, primary_key=True)\n"
        f"    name: Mapped[str] = mapped_column(String(20), index=True)\n"
        + (
            f'    parent_id: Mapped[int] = mapped_column(ForeignKey("ov_t{n - 1}.id"))\n'
            if n
            else ""
        )
        for n in range(TABLES)
    ]
)


#: Loaded into each run: how long each test's protocol (setup, call, teardown, reporting)
#: took, written out at the end; the median over a run's tests ignores whatever else the
#: machine did meanwhile.
TIMING = """
import json
import time

import pytest

TIMES = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    start = time.perf_counter()
    try:
        return (yield)
    finally:
        TIMES.append(time.perf_counter() - start)


def pytest_sessionfinish(session):
    with open("times.json", "w") as out:
        json.dump(TIMES[5:-1], out)  # the first tests provision, the last one cleans up
"""

#: The floor: a fixture that does nothing (async: through pytest-asyncio, as the async
#: fixtures are).
NOOP = {
    False: "import pytest\n\n\n@pytest.fixture\ndef session():\n    yield None\n",
    True: "import pytest_asyncio\n\n\n@pytest_asyncio.fixture\nasync def session():\n"
    "    yield None\n",
}

INI = """[pytest]
pythonpath = .
asyncio_mode = auto
asyncio_default_fixture_loop_scope = session
asyncio_default_test_loop_scope = session
"""


def write_suite(root: Path, url: str, variant: str, *, is_async: bool, count: int) -> list[str]:
    """Write one suite; the pytest arguments to run it with."""
    root.mkdir(parents=True)
    (root / "models.py").write_text(MODELS)
    (root / "timing.py").write_text(TIMING)
    ini, flags, fixture = INI, ["-p", "no:alchemy"], ""
    if variant == "recipe":
        (root / "conftest.py").write_text(f"URL = {url!r}\n" + RECIPE[is_async])
        fixture = "session"
    elif variant == "noop":
        (root / "conftest.py").write_text(NOOP[is_async])
        fixture = "session"
    elif variant in ("plugin", "baseline"):
        ini += f"alchemy_url = {url}\nalchemy_metadata = models:Base\n"
        flags, fixture = [], "async_db_session" if is_async else "db_session"
    (root / "pytest.ini").write_text(ini)
    prefix = "async def" if is_async else "def"
    (root / "test_many.py").write_text(
        "".join(f"\n\n{prefix} test_{n}({fixture}):\n    pass\n" for n in range(count))
    )
    return flags


def timed_run(root: Path, flags: list[str], source: str | None = None) -> tuple[float, float]:
    """The CPU time (user + system) of one pytest process: what the tests cost the machine,
    much less disturbed than the wall clock by whatever else the shared machine runs.
    Also the median of the wall time each test took inside the run. ``source``: a directory to
    import pytest_alchemy from instead (an older checkout)."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist"]
    command += ["-p", "timing"]
    env = {**os.environ, "PYTHONPATH": source} if source else None
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        [*command, *flags], cwd=root, capture_output=True, text=True, check=False, env=env
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{root} failed:\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    per_test = statistics.median(json.loads((root / "times.json").read_text()))
    return cpu, per_test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--large", type=int, default=1200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sync-only", action="store_true")
    parser.add_argument(
        "--baseline",
        metavar="SRC",
        help="also run the plugin imported from SRC (the src/ of another checkout), interleaved",
    )
    args = parser.parse_args()
    modes = [False] if args.sync_only else [False, True]
    variants = ["bare", "noop", "recipe", "plugin"] + (["baseline"] if args.baseline else [])
    with tempfile.TemporaryDirectory() as tmp:
        suites = {}
        for is_async in modes:
            url = args.url.replace("+psycopg:", "+psycopg_async:") if is_async else args.url
            for variant in variants:
                for count in (args.small, args.large):
                    root = Path(tmp) / f"{'async' if is_async else 'sync'}-{variant}-{count}"
                    flags = write_suite(root, url, variant, is_async=is_async, count=count)
                    suites[is_async, variant, count] = (root, flags)
        cpu: dict[tuple[bool, str, int], list[float]] = {key: [] for key in suites}
        each: dict[tuple[bool, str, int], list[float]] = {key: [] for key in suites}
        for _ in range(args.repeats):  # interleaved: each round runs every suite once
            for key, (root, flags) in suites.items():
                source = args.baseline if key[1] == "baseline" else None
                used, per_test = timed_run(root, flags, source)
                cpu[key].append(used)
                each[key].append(per_test)
    span = args.large - args.small
    print(
        f"ms per test over a fixture-less test, one interleaved run, {args.repeats} rounds: "
        f"'each' = median time of a test inside the {args.large}-test runs; 'cpu' = slope of "
        f"the process's CPU time {args.small} -> {args.large} tests"
    )
    for is_async in modes:
        kind = "async" if is_async else "sync "
        per = {v: 1000 * statistics.median(each[is_async, v, args.large]) for v in variants}
        slope = {
            v: 1000
            * (
                statistics.median(cpu[is_async, v, args.large])
                - statistics.median(cpu[is_async, v, args.small])
            )
            / span
            for v in variants
        }
        for name, figures in (("each", per), ("cpu ", slope)):
            bare = figures["bare"]
            cells = [f"{v} +{figures[v] - bare:.3f}" for v in variants if v != "bare"]
            ratio = (figures["plugin"] - bare) / (figures["recipe"] - bare)
            print(f"{kind} {name}: bare {bare:.3f}; {'; '.join(cells)}; plugin/recipe {ratio:.2f}")


if __name__ == "__main__":
    main()
