"""Exceptions raised by pytest-alchemy.

Every message says what went wrong and then what to do about it, naming the option,
fixture or marker that fixes it.
"""

from __future__ import annotations

__all__ = [
    "AlchemyError",
    "DatabaseBlockedError",
    "DatabaseUnavailableError",
    "DriverMissingError",
    "EventLoopMismatchError",
    "NPlusOneWarning",
    "ProvisioningError",
    "ReadOnlyReplicaError",
    "SandboxBrokenError",
    "SchemaConflictError",
    "UnsandboxedEngineError",
]


class AlchemyError(Exception):
    """Base class of every error pytest-alchemy raises."""


class DriverMissingError(AlchemyError):
    """The database driver a URL names is not installed."""


class DatabaseUnavailableError(AlchemyError):
    """The test database could not be reached."""


class SchemaConflictError(AlchemyError):
    """The test database already holds tables the plugin was asked to create."""


class ProvisioningError(AlchemyError):
    """The test database cannot be created or used safely."""

    #: Where the user's own code failed (a seed, a migration): shown once, not per test.
    details: str = ""


class SandboxBrokenError(AlchemyError):
    """A test ended or escaped its transactional sandbox."""


class EventLoopMismatchError(AlchemyError):
    """An async connection was used from an event loop other than the one it belongs to."""


class UnsandboxedEngineError(AlchemyError):
    """An application engine cannot join the test's sandbox, or reached its database around it."""


class ReadOnlyReplicaError(AlchemyError):
    """A write was sent through an engine that ``alchemy_databases`` names a read replica."""


class NPlusOneWarning(UserWarning):
    """A relationship was lazy-loaded once per row (N+1 queries): ini ``alchemy_nplusone =
    warn`` or ``@pytest.mark.alchemy(nplusone="warn")``."""


class DatabaseBlockedError(AlchemyError):
    """A test used the database without asking for it while ``alchemy_require_marker`` is on."""
