"""``@pytest.mark.alchemy(...)``: the one place per-test options go.

Options given on a test override those of its class, which override its module's
(``pytestmark``); options not given come from the ini. Unknown options, positional arguments
and values of the wrong type are usage errors naming the valid options, raised at collection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from pytest_alchemy.config import NPLUSONE_MODES

if TYPE_CHECKING:
    from collections.abc import Sequence

NAME = "alchemy"

#: The values of the ``strategy`` option: how the test is isolated.
STRATEGIES = ("rollback", "commit")

#: option -> (type, what it does)
OPTIONS: dict[str, tuple[type, str]] = {
    "strategy": (
        str,
        "how the test is isolated: 'rollback' (default: a sandbox, nothing is committed) or "
        "'commit' (real commits other connections and processes see; the tables written are "
        "restored after the test, which runs after the sandboxed ones)",
    ),
    "reset_sequences": (
        bool,
        "put the id counters (sequences, AUTO_INCREMENT) of the tables the test inserted into "
        "back to the template's values after the test (default: ini alchemy_reset_sequences)",
    ),
    "nplusone": (
        str,
        "'warn' or 'fail' when the test lazy-loads a relationship once per row (N+1 queries), "
        "'off' to ignore them (default: ini alchemy_nplusone)",
    ),
}


@dataclass(frozen=True)
class Options:
    """One test's options, the marker's merged over the ini's."""

    reset_sequences: bool = False
    strategy: str = "rollback"
    nplusone: str = "off"

    @property
    def commits(self) -> bool:
        return self.strategy == "commit"


def register(config: pytest.Config) -> None:
    described = "; ".join(f"{name}: {what}" for name, (_, what) in OPTIONS.items())
    config.addinivalue_line(
        "markers", f"{NAME}(**options): per-test options of pytest-alchemy. {described}."
    )


def _valid() -> str:
    return ", ".join(OPTIONS)


def given(item: pytest.Item) -> dict[str, object]:
    """The options the test's markers give, closest first; raises UsageError on bad ones."""
    found: dict[str, object] = {}
    for mark in item.iter_markers(NAME):
        where = f"@pytest.mark.{NAME} on {item.nodeid}"
        if mark.args:
            raise pytest.UsageError(
                f"{where} takes keyword options only ({_valid()}), got {mark.args!r}."
            )
        for option, value in mark.kwargs.items():
            if option not in OPTIONS:
                raise pytest.UsageError(
                    f"{where}: unknown option {option!r}. Valid options: {_valid()}."
                )
            kind = OPTIONS[option][0]
            if not isinstance(value, kind):
                raise pytest.UsageError(
                    f"{where}: {option} must be a {kind.__name__}, got {value!r}."
                )
            if option == "strategy" and value not in STRATEGIES:
                raise pytest.UsageError(
                    f"{where}: strategy must be one of {', '.join(map(repr, STRATEGIES))}, "
                    f"got {value!r}."
                )
            if option == "nplusone" and value not in NPLUSONE_MODES:
                raise pytest.UsageError(
                    f"{where}: nplusone must be one of {', '.join(map(repr, NPLUSONE_MODES))}, "
                    f"got {value!r}."
                )
            found.setdefault(option, value)
    return found


def options_for(item: pytest.Item, defaults: Options) -> Options:
    given_here = given(item)
    return Options(
        reset_sequences=bool(given_here.get("reset_sequences", defaults.reset_sequences)),
        strategy=str(given_here.get("strategy", defaults.strategy)),
        nplusone=str(given_here.get("nplusone", defaults.nplusone)),
    )


def check(items: Sequence[pytest.Item], defaults: Options) -> list[Options]:
    """Validate every collected test's markers; each test's options, in order."""
    return [options_for(item, defaults) for item in items]
