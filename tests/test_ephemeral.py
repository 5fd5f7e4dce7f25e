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
