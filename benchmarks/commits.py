"""What restoring after a test of the commit strategy costs, against emptying every table.

    .venv/bin/python benchmarks/commits.py [--only BACKEND] [--tables N] [--rounds N]

A scratch database per backend that answers (PostgreSQL/psycopg, MariaDB/PyMySQL, a SQLite
file), with ``--tables`` tables (each with an id counter and a foreign key to the one before,
every fifth one holding 3 seed rows), given the strategy's triggers once. Each round, for 1
and for 10 tables written (3 inserts, one update, one delete, committed), it times:

- restore: what the plugin runs after such a test (the written tables refilled, their
  counters set back), on a held connection;
- plugin: all the plugin runs around a test: the mark that a test runs, then the restore,
  each a checkout of the connection it keeps;
- truncate-all: what a strategy that does not know what was written does (pytest-django's
  flush, Laravel's DatabaseTruncation): every table emptied (PostgreSQL: one ``TRUNCATE ...
  RESTART IDENTITY CASCADE``; MySQL: ``TRUNCATE`` each; SQLite: ``DELETE`` each), then the seed
  rows inserted again.

Medians of the rounds, interleaved; the machine is shared, so read the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sqlalchemy import (
    Column,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    insert,
    text,
    update,
)
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.pool import NullPool

from pytest_alchemy import commits, databases

SERVERS = {
    "postgresql": "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    "mysql": "mysql+pymysql://root@127.0.0.1:3306/test",
}
NAME = "alchemy_bench_commits"


def schema(count: int) -> MetaData:
    metadata = MetaData()
    for n in range(count):
        columns = [Column("id", Integer, primary_key=True), Column("name", String(40))]
        if n:
            columns.append(Column("parent_id", Integer, ForeignKey(f"bc_t{n - 1}.id")))
        Table(f"bc_t{n}", metadata, *columns)
    return metadata


def seed(conn: Connection, metadata: MetaData) -> None:
    for n, table in enumerate(metadata.sorted_tables):
        if n % 5 == 0:
            conn.execute(insert(table), [{"name": f"seed {i}"} for i in range(3)])


def scratch(backend: str) -> tuple[URL, object]:
    """A fresh scratch database; and how to drop it."""
    if backend == "sqlite":
        folder = tempfile.mkdtemp()
        url = make_url(f"sqlite:///{folder}/bench.sqlite3")
        return url, lambda: Path(url.database or "").unlink(missing_ok=True)
    server = databases._Server(make_url(SERVERS[backend]))
    server.drop(NAME)
    server.create(NAME)
    return make_url(SERVERS[backend]).set(database=NAME), lambda: server.drop(NAME)


def write(conn: Connection, tables: list[Table]) -> None:
    for table in tables:
        conn.execute(insert(table), [{"name": f"row {i}"} for i in range(3)])
        conn.execute(update(table).where(table.c.name == "row 0").values(name="changed"))
        conn.execute(table.delete().where(table.c.name == "row 1"))
    conn.commit()


def truncate_all(conn: Connection, metadata: MetaData, backend: str) -> None:
    tables = metadata.sorted_tables
    quote = conn.dialect.identifier_preparer.quote
    if backend == "postgresql":
        names = ", ".join(quote(t.name) for t in tables)
        conn.exec_driver_sql(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
    elif backend == "mysql":
        conn.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 0")
        for table in tables:
            conn.exec_driver_sql(f"TRUNCATE {quote(table.name)}")
        conn.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 1")
    else:
        for table in reversed(tables):
            conn.execute(table.delete())
    seed(conn, metadata)
    conn.execute(text(f"DELETE FROM {commits.WRITTEN_TABLE}"))
    conn.commit()


def run(backend: str, count: int, rounds: int) -> None:
    url, drop = scratch(backend)
    engine = create_engine(url, poolclass=NullPool)
    try:
        metadata = schema(count)
        with engine.begin() as conn:
            metadata.create_all(conn)
            seed(conn, metadata)
        with engine.begin() as conn:
            snapshot = commits.install(conn, {None})
        tables = metadata.sorted_tables
        committer = commits.Committer(url)
        times: dict[tuple[str, int], list[float]] = {}
        with engine.connect() as conn:
            for _ in range(rounds):
                for written in (1, 10):
                    chosen = tables[-written:]  # the last ones: nothing refers to them

                    write(conn, chosen)
                    started = time.perf_counter()
                    restored = commits.restore(conn, snapshot)
                    conn.commit()
                    for statement in commits.reset_after(snapshot, restored):
                        conn.exec_driver_sql(statement)
                    times.setdefault(("restore", written), []).append(time.perf_counter() - started)

                    write(conn, chosen)
                    started = time.perf_counter()
                    committer.run(commits.begin, autocommit=False)
                    commits.restore_at(committer, snapshot)
                    times.setdefault(("plugin", written), []).append(time.perf_counter() - started)

                    write(conn, chosen)
                    started = time.perf_counter()
                    truncate_all(conn, metadata, backend)
                    times.setdefault(("truncate-all", written), []).append(
                        time.perf_counter() - started
                    )
        for written in (1, 10):
            median = {
                k: statistics.median(times[(k, written)]) * 1000
                for k in ("restore", "plugin", "truncate-all")
            }
            print(
                f"{backend:<11} {count} tables, {written:>2} written: "
                f"restore {median['restore']:7.1f} ms   plugin {median['plugin']:7.1f} ms   "
                f"truncate-all {median['truncate-all']:7.1f} ms   "
                f"truncate-all/plugin {median['truncate-all'] / median['plugin']:5.1f}x"
            )
        committer.close()
    finally:
        engine.dispose()
        drop()  # type: ignore[operator]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["sqlite", "postgresql", "mysql"])
    parser.add_argument("--tables", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    for backend in ("sqlite", "postgresql", "mysql"):
        if args.only in (None, backend):
            try:
                run(backend, args.tables, args.rounds)
            except Exception as exc:  # a server that does not answer
                print(f"{backend:<11} skipped: {type(exc).__name__}: {exc}".splitlines()[0])


if __name__ == "__main__":
    main()
