"""flywheel's named errors: each says what went wrong in one line and carries its report.

Entry points map them to exit codes (the CLI) or HTTP statuses (serving); anything that is not
a ``FlywheelError`` is an internal error.
"""

from __future__ import annotations

from typing import Any


class FlywheelError(Exception):
    """Base of every error flywheel raises on purpose; ``exit_code`` is the CLI's."""

    exit_code = 4

    def __init__(self, message: str, *, report: Any = None) -> None:
        super().__init__(message)
        self.report = report


class Rejected(FlywheelError):
    """Data was checked and refused (exit 1); ``report`` says why."""

    exit_code = 1


class UsageError(FlywheelError):
    """The user asked for something that cannot be done as asked (exit 2)."""

    exit_code = 2


class InvalidInput(UsageError):
    """An input file or value is malformed or out of bounds (exit 2)."""


class NotFound(UsageError, LookupError):
    """What the user named does not exist (exit 2)."""


class Conflict(UsageError):
    """Another process holds what this one needs, or the state moved under it (exit 2)."""


class PromotionRejected(FlywheelError):
    """The gate refused a candidate (exit 3); ``report`` is the PromotionDecision."""

    exit_code = 3


class Interrupted(FlywheelError):
    """The user interrupted a command (exit 130, as a shell reports SIGINT)."""

    exit_code = 130
