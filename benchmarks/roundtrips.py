"""Round trips per test, counted (not timed) through a loopback proxy, as users run pytest.

    .venv/bin/python benchmarks/roundtrips.py [--only DRIVER ...] [--small N] [--large N]

For each server driver, small pytest suites run as subprocesses whose URL points at a TCP
proxy in this process. The proxy counts *turns*: each time the client sends after the server
last answered, which is one round trip the client waited for (what it sends in one go, or
pipelines, counts once). The figure per test is the slope between a run of ``--small`` and one
of ``--large`` tests, so provisioning and start-up cancel out; counts are exact, not timed.

Scenarios (one test body each, the same with the plugin's fixture and with the hand-written
recipe: one fixture that connects, begins, makes a ``create_savepoint`` Session, and rolls
back and closes after the test):

- untouched: requests the session and never uses it (own statements: 0);
- select: one ``SELECT 1`` (own: 1);
- insert+commit: adds a row and commits (own: 2, the INSERT and the COMMIT production sends);
- per extra commit: each further insert + commit in the same test, over the first (own: 2).

"overhead" is what the sandbox adds beyond the test's own statements.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from recipes import RECIPE
from turns import TurnCounter

SERVERS = {"postgresql": ("127.0.0.1", 5432), "mysql": ("127.0.0.1", 3306)}
DRIVERS = {
    "psycopg": ("postgresql", False),
    "psycopg2": ("postgresql", False),
    "pymysql": ("mysql", False),
    "asyncpg": ("postgresql", True),
    "psycopg_async": ("postgresql", True),
    "asyncmy": ("mysql", True),
}
USERS = {"postgresql": "postgres", "mysql": "root"}


MODELS = """
from sqlalchemy import Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "rt_item"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(20))
"""

BODIES = {
    "untouched": ("pass", "pass"),
    "select": (
        'session.execute(text("SELECT 1"))',
        'await session.execute(text("SELECT 1"))',
    ),
    "insert+commit": (
        'session.add(Item(name="x")); session.commit()',
        'session.add(Item(name="x")); await session.commit()',
    ),
    "2 commits": (
        'session.add(Item(name="x")); session.commit(); '
        'session.add(Item(name="y")); session.commit()',
        'session.add(Item(name="x")); await session.commit(); '
        'session.add(Item(name="y")); await session.commit()',
    ),
}
OWN = {"untouched": 0, "select": 1, "insert+commit": 2, "2 commits": 4}

INI = """[pytest]
pythonpath = .
asyncio_mode = auto
asyncio_default_fixture_loop_scope = session
asyncio_default_test_loop_scope = session
"""


def write_suite(
    root: Path, url: str, *, is_async: bool, recipe: bool, scenario: str, count: int
) -> None:
    root.mkdir(parents=True)
    (root / "models.py").write_text(MODELS)
    ini = INI
    if recipe:
        source = RECIPE[is_async]
        (root / "conftest.py").write_text(f"URL = {url!r}\n" + source)
        fixture = "session"
        flags = ["-p", "no:alchemy"]
    else:
        ini += f"alchemy_url = {url}\nalchemy_metadata = models:Base\n"
        fixture = "async_db_session" if is_async else "db_session"
        flags = []
    (root / "pytest.ini").write_text(ini)
    body = BODIES[scenario][1 if is_async else 0]
    prefix = "async def" if is_async else "def"
    tests = "".join(
        f"\n\n{prefix} test_{n}({fixture}):\n    session = {fixture}\n    {body}\n"
        for n in range(count)
    )
    header = "from sqlalchemy import text\n\nfrom models import Item\n"
    (root / "test_rt.py").write_text(header + tests)
    (root / "flags").write_text(" ".join(flags))


def run_suite(root: Path, counter: TurnCounter) -> int:
    flags = (root / "flags").read_text().split()
    before = counter.turns
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", *flags],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{root} failed:\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}")
    return counter.turns - before


def per_test(
    tmp: Path,
    counter: TurnCounter,
    driver: str,
    *,
    recipe: bool,
    scenario: str,
    small: int,
    large: int,
) -> float:
    backend, is_async = DRIVERS[driver]
    user = USERS[backend]
    url = f"{backend}+{driver}://{user}@127.0.0.1:{counter.port}/test"
    turns = []
    for count in (small, large):
        name = f"{driver}-{'recipe' if recipe else 'plugin'}-{scenario.replace(' ', '_')}-{count}"
        root = tmp / name.replace("+", "_")
        write_suite(root, url, is_async=is_async, recipe=recipe, scenario=scenario, count=count)
        turns.append(run_suite(root, counter))
    return (turns[1] - turns[0]) / (large - small)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=list(DRIVERS), choices=list(DRIVERS))
    parser.add_argument("--small", type=int, default=10)
    parser.add_argument("--large", type=int, default=60)
    args = parser.parse_args()
    counters = {name: TurnCounter(address) for name, address in SERVERS.items()}
    scenarios = list(BODIES)
    print(
        f"round trips per test, slope {args.small} -> {args.large} tests; "
        "plugin (recipe) overhead beyond the test's own statements"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for driver in args.only:
            backend, _ = DRIVERS[driver]
            cells = []
            for scenario in scenarios:
                figures = [
                    per_test(
                        Path(tmp),
                        counters[backend],
                        driver,
                        recipe=recipe,
                        scenario=scenario,
                        small=args.small,
                        large=args.large,
                    )
                    for recipe in (False, True)
                ]
                plugin, recipe = (f - OWN[scenario] for f in figures)
                if scenario == "2 commits":  # per extra commit: over insert+commit
                    first = cells[-1][1]
                    plugin, recipe = plugin - first[0], recipe - first[1]
                    scenario = "per extra commit"
                cells.append((scenario, (plugin, recipe)))
            shown = "  ".join(f"{s} {p:+.1f} ({r:+.1f})" for s, (p, r) in cells)
            print(f"{driver:14} {shown}", flush=True)


if __name__ == "__main__":
    main()
