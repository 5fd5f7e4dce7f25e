"""Configuration: each route, the precedence between them, and the report header."""

from __future__ import annotations

import pytest
from conftest import Project

SHOW = "def test_nothing():\n    pass\n"


def header(pytester: pytest.Pytester, *args: str, env: str | None = None) -> list[str]:
    project = Project(pytester, None)
    project.ini(metadata=False)
    project.tests(SHOW)
    if env is not None:
        pytester._monkeypatch.setenv("PYTEST_ALCHEMY_URL", env)
    result = project.run(*args)
    result.assert_outcomes(passed=1)
    return [line for line in result.outlines if line.startswith("alchemy:")]


def test_an_unconfigured_plugin_says_nothing_until_used(pytester: pytest.Pytester) -> None:
    """Without configuration the report header has no line of the plugin's, and the ORM is not
    imported by it (a suite of unit tests pays nothing); the first test that uses the database
    says where the tests run: a SQLite file in pytest's temporary directory. SQLModel, installed
    here, is not imported for models that do not use it (pydantic costs about 0.35 s)."""
    project = Project(pytester, None)
    project.ini(metadata=False)
    project.tests(
        """
        import sys

        def test_unit():
            assert "sqlalchemy.orm" not in sys.modules

        def test_database(db_session):
            pass

        def test_sqlmodel_stays_unimported(db_session):
            assert "sqlmodel" not in sys.modules
        """
    )
    # pytest-factoryboy's own plugin imports factory_boy, which imports the ORM
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-p", "no:randomly", "-p", "no:pytest-factoryboy", "-s"
    )
    result.assert_outcomes(passed=3)
    lines = [line for line in result.outlines if "alchemy:" in line]
    assert lines == ["alchemy: url=sqlite:///<pytest tmp>/alchemy.sqlite3 (from the default)"]


def test_url_from_ini(pytester: pytest.Pytester) -> None:
    lines = header(pytester, "-o", "alchemy_url=postgresql+psycopg://u:pw@db/app")
    assert lines == ["alchemy: url=postgresql+psycopg://u:***@db/app (from alchemy_url (ini))"]


def test_url_from_env(pytester: pytest.Pytester) -> None:
    lines = header(pytester, env="mysql+pymysql://root@db/app")
    assert lines == ["alchemy: url=mysql+pymysql://root@db/app (from PYTEST_ALCHEMY_URL)"]


def test_url_from_cli(pytester: pytest.Pytester) -> None:
    lines = header(pytester, "--alchemy-url", "sqlite:///x.db")
    assert lines == ["alchemy: url=sqlite:///x.db (from --alchemy-url)"]


def test_env_beats_ini(pytester: pytest.Pytester) -> None:
    lines = header(pytester, "-o", "alchemy_url=sqlite:///ini.db", env="sqlite:///env.db")
    assert lines == ["alchemy: url=sqlite:///env.db (from PYTEST_ALCHEMY_URL)"]


def test_cli_beats_env(pytester: pytest.Pytester) -> None:
    lines = header(pytester, "--alchemy-url", "sqlite:///cli.db", env="sqlite:///env.db")
    assert lines == ["alchemy: url=sqlite:///cli.db (from --alchemy-url)"]


def test_async_url_is_shown_with_its_source(pytester: pytest.Pytester) -> None:
    lines = header(pytester, "--alchemy-async-url", "postgresql+asyncpg://u:pw@db/app")
    assert (
        lines[1]
        == "alchemy: async url=postgresql+asyncpg://u:***@db/app (from --alchemy-async-url)"
    )


ENGINE_URLS = """
import os
import pytest

def test_sync(db_engine):
    print("SYNC", db_engine.url.drivername, os.path.basename(db_engine.url.database))

@pytest.mark.asyncio
async def test_async(async_db_engine):
    print("ASYNC", async_db_engine.url.drivername, os.path.basename(async_db_engine.url.database))
"""


@pytest.mark.parametrize(
    ("given", "sync", "asynchronous"),
    [
        ("sqlite", "sqlite", "sqlite+aiosqlite"),
        ("sqlite+aiosqlite", "sqlite+pysqlite", "sqlite+aiosqlite"),
    ],
)
def test_sync_and_async_urls_are_derived_from_each_other(
    pytester: pytest.Pytester, given: str, sync: str, asynchronous: str
) -> None:
    project = Project(pytester, f"{given}:///{pytester.path}/app.sqlite3")
    project.ini()
    project.tests(ENGINE_URLS)
    result = project.run("-s")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines([f"*SYNC {sync}*", f"*ASYNC {asynchronous}*"])


def test_async_url_can_be_set_explicitly(pytester: pytest.Pytester) -> None:
    project = Project(pytester, f"sqlite:///{pytester.path}/app.sqlite3")
    project.ini(f"alchemy_async_url = sqlite+aiosqlite:///{pytester.path}/other.sqlite3\n")
    project.tests(ENGINE_URLS)
    result = project.run("-s")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        ["*SYNC sqlite test_app.sqlite3*", "*ASYNC sqlite+aiosqlite test_other.sqlite3*"]
    )
    assert not (pytester.path / "test_other.sqlite3").exists()  # created and dropped


@pytest.mark.parametrize("value", ["soon", "0", "-3"])
def test_a_bad_thread_wait_is_a_usage_error_naming_it(
    value: str, pytester: pytest.Pytester
) -> None:
    project = Project(pytester, None)
    project.ini(f"alchemy_thread_wait = {value}\n", metadata=False)
    project.tests(SHOW)
    result = project.run()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [f"*alchemy_thread_wait = '{value}': give a number of seconds above 0, e.g. 10.*"]
    )
