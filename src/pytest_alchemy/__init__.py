"""pytest-alchemy: a transactional sandbox per test for SQLAlchemy 2.x, sync and asyncio."""

from __future__ import annotations

from pytest_alchemy.errors import (
    AlchemyError,
    DatabaseBlockedError,
    DatabaseUnavailableError,
    DriverMissingError,
    EventLoopMismatchError,
    NPlusOneWarning,
    ProvisioningError,
    ReadOnlyReplicaError,
    SandboxBrokenError,
    SchemaConflictError,
    UnsandboxedEngineError,
)
from pytest_alchemy.fixtures.queries import Queries
from pytest_alchemy.queries import Query
from pytest_alchemy.routing import route_engines

__version__ = "0.1.0"

__all__ = [
    "AlchemyError",
    "DatabaseBlockedError",
    "DatabaseUnavailableError",
    "DriverMissingError",
    "EventLoopMismatchError",
    "NPlusOneWarning",
    "ProvisioningError",
    "Queries",
    "Query",
    "ReadOnlyReplicaError",
    "SandboxBrokenError",
    "SchemaConflictError",
    "UnsandboxedEngineError",
    "__version__",
    "route_engines",
]
