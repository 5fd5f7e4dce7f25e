"""The README's snippets: the quick start runs as written, on every backend; every Python and
TOML block at least parses, so none rots unnoticed.

A block whose first line is ``# file: <path>`` is a file of the section's project, written
as is; a section with such blocks is run as a pytest project through the plugin.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from conftest import SYNC_BACKENDS, Driver, project_for

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
_FILE = re.compile(r"#\s*file:\s*(\S+)")


def _blocks(text: str) -> list[tuple[str, str]]:
    return [(lang, body) for lang, body in _BLOCK.findall(text)]


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def _files(section: str) -> dict[str, str]:
    found = {}
    for _, body in _blocks(section):
        first = body.splitlines()[0] if body else ""
        named = _FILE.match(first)
        if named:
            found[named.group(1)] = body
    return found


@pytest.mark.parametrize("driver", SYNC_BACKENDS, ids=lambda d: d.id)
def test_the_quick_start_runs_as_written(
    driver: Driver, scratch_databases: dict[str, str], pytester: pytest.Pytester
) -> None:
    """Its three files, as they stand, pass on the backend (the URL given on the command
    line, which takes precedence over the file's): three tests, sync and async."""
    files = _files(_section("Quick start"))
    assert set(files) == {"pyproject.toml", "myapp.py", "test_signup.py"}
    project = project_for(driver, scratch_databases, pytester)
    for path, body in files.items():
        (pytester.path / path).write_text(body)
    result = pytester.runpytest_inprocess(
        "-p", "no:cacheprovider", "-p", "no:randomly", "-p", "no:xdist",
        "-p", "no:pytest-factoryboy", f"--alchemy-url={project.url}",
    )  # fmt: skip
    result.assert_outcomes(passed=3)


def test_every_python_and_toml_block_parses() -> None:
    """Python blocks compile, TOML blocks load: a snippet with a syntax error is a defect."""
    problems = []
    for number, (lang, body) in enumerate(_blocks(README.read_text()), 1):
        try:
            if lang == "python":
                compile(body, f"README block {number}", "exec")
            elif lang == "toml" and sys.version_info >= (3, 11):
                import tomllib

                tomllib.loads(body)
        except (SyntaxError, ValueError) as exc:
            problems.append(f"block {number} ({lang}): {exc}")
    assert problems == []
