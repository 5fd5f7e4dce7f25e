"""The throwaway PostgreSQL server: started on first need, stopped at the end, also as root."""

from __future__ import annotations

import re
import socket

import pytest
from conftest import Project

TESTS = """
import pytest
from sqlalchemy import func, select

from models import Item


def test_sync(db_session):
    db_session.add(Item(name="a"))
    db_session.commit()
    assert db_session.scalar(select(func.count(Item.id))) == 1


@pytest.mark.asyncio
async def test_async(async_db_session):
    assert await async_db_session.scalar(select(func.count(Item.id))) == 0
    assert async_db_session.bind.engine.url.database == "test_app"
"""


def _port(output: str) -> int:
    found = re.search(r"alchemy: started a throwaway PostgreSQL .* on 127\.0\.0\.1:(\d+)", output)
    assert found, output
    return int(found.group(1))


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_a_throwaway_server_runs_the_suite_and_is_stopped(pytester: pytest.Pytester) -> None:
    project = Project(pytester, "postgresql+ephemeral:///app")
    project.ini()
    project.tests(TESTS)
    result = project.run(subprocess=True)
    result.assert_outcomes(passed=2)
    assert not _listening(_port(result.stdout.str()))


def test_an_interrupted_run_stops_its_server(pytester: pytest.Pytester) -> None:
    project = Project(pytester, "postgresql+ephemeral:///app")
    project.ini()
    project.tests(
        "def test_interrupted(db_session):\n    db_session.connection()\n"
        "    raise KeyboardInterrupt\n"
    )
    result = project.run(subprocess=True)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert not _listening(_port(result.stdout.str()))


def test_missing_binaries_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_alchemy import ephemeral
    from pytest_alchemy.errors import ProvisioningError

    def no_pg_config(*args: object, **kwargs: object) -> None:
        raise OSError("pg_config: not found")

    monkeypatch.setattr(ephemeral.shutil, "which", lambda name: None)
    monkeypatch.setattr(ephemeral.glob, "glob", lambda pattern: [])
    monkeypatch.setattr(ephemeral.subprocess, "run", no_pg_config)
    with pytest.raises(
        ProvisioningError, match=r"apt-get install postgresql.*pip install pgserver"
    ):
        ephemeral.find_bindir()


INSIDE = """
import json
import os
import stat

from sqlalchemy import text


def test_records_what_the_server_is(db_session):
    url = db_session.bind.engine.url
    data = db_session.execute(text("SHOW data_directory")).scalar()
    with open(os.path.join(data, "postmaster.pid")) as pidfile:
        pid = int(pidfile.readline())
    with open(f"/proc/{{pid}}/status") as proc:
        status = proc.read().splitlines()
    ids = {{line.split(":")[0]: line.split()[1] for line in status if line[:4] in ("Uid:", "Gid:")}}
    seen = {{
        "port": url.port,
        "password": url.password,
        "uid": int(ids["Uid"]),
        "gid": int(ids["Gid"]),
        "data_mode": stat.S_IMODE(os.stat(data).st_mode),
        "folder_mode": stat.S_IMODE(os.stat(os.path.dirname(data)).st_mode),
        "folder": os.path.dirname(data),
    }}
    with open({out!r}, "w") as out:
        json.dump(seen, out)
    if {kill}:
        os.kill(os.getpid(), 9)
"""


def _inside(pytester: pytest.Pytester, *, kill: bool) -> dict[str, object]:
    import json
    import subprocess
    import sys

    project = Project(pytester, "postgresql+ephemeral:///app")
    project.ini(metadata=False)
    out = pytester.path / "seen.json"
    project.tests(INSIDE.format(out=str(out), kill=kill))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"],
        cwd=pytester.path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.exists(), done.stdout + done.stderr
    seen: dict[str, object] = json.loads(out.read_text())
    seen["returncode"] = done.returncode
    seen["output"] = done.stdout[-3000:]
    return seen


def test_a_killed_runs_server_is_stopped_and_removed_by_its_watchdog(
    pytester: pytest.Pytester,
) -> None:
    import time
    from pathlib import Path

    seen = _inside(pytester, kill=True)
    assert seen["returncode"] == -9
    deadline = time.monotonic() + 30
    while _listening(int(seen["port"])) or Path(str(seen["folder"])).exists():  # type: ignore[call-overload]
        assert time.monotonic() < deadline, "the server outlived its killed run"
        time.sleep(0.2)


def test_the_server_is_private_and_unprivileged(pytester: pytest.Pytester) -> None:
    import os

    seen = _inside(pytester, kill=False)
    assert seen["returncode"] == 0, seen["output"]
    assert seen["data_mode"] == 0o700
    assert seen["folder_mode"] == 0o700
    if os.geteuid() == 0:  # as root the server runs as nobody, with nobody's group
        import pwd

        nobody = pwd.getpwnam("nobody")
        assert (seen["uid"], seen["gid"]) == (nobody.pw_uid, nobody.pw_gid)
        assert seen["gid"] != 0
    assert isinstance(seen["password"], str)
    assert len(seen["password"]) >= 20


def test_a_throwaway_server_asks_for_its_password(pytester: pytest.Pytester) -> None:
    project = Project(pytester, "postgresql+ephemeral:///app")
    project.ini(metadata=False)
    project.tests(
        """
import psycopg
import pytest


def test_no_password_no_entry(db_engine):
    url = db_engine.url
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(host=url.host, port=url.port, user="postgres", dbname="postgres")
    psycopg.connect(
        host=url.host, port=url.port, user="postgres", dbname="postgres", password=url.password
    ).close()
"""
    )
    result = project.run(subprocess=True)
    result.assert_outcomes(passed=1)
    assert "postgres:***@" in result.stdout.str() or "started a throwaway" in result.stdout.str()


def test_a_stale_server_whose_watchdog_died_too_is_removed_by_the_next_run(
    pytester: pytest.Pytester,
) -> None:
    import json
    import subprocess
    import sys
    import time

    from pytest_alchemy import ephemeral

    server = ephemeral.EphemeralPostgres()
    server.start("app")
    assert server.port is not None
    assert server._datadir is not None
    assert server._watchdog is not None
    folder = server._datadir
    server._watchdog.kill()  # as if killed together with its run
    server._watchdog.wait()
    owner = json.loads((folder / "owner.json").read_text())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owner.update(pid=dead.pid, started=None)
    (folder / "owner.json").write_text(json.dumps(owner))
    server._datadir = None  # forget it: the next run must find it
    server._watchdog = None
    lines: list[str] = []
    ephemeral.clean_stale(lines.append)
    assert any(str(folder) in line for line in lines)
    assert not folder.exists()
    deadline = time.monotonic() + 10
    while _listening(server.port):
        assert time.monotonic() < deadline
        time.sleep(0.1)
