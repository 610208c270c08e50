"""How the engine unwinds a workflow function: ``BaseException`` subclasses, so that
``except Exception`` in workflow code does not swallow them."""

from __future__ import annotations

from typing import Any


class Suspend(BaseException):
    """Unwinds the workflow function when the run parks or the claim is lost."""


class ClaimLost(Suspend):
    """A fenced write found the claim gone: lease taken over, canceled, or past the deadline."""


class EngineDatabaseError(Suspend):
    """A statement of the engine's own failed inside a ``ctx.step`` call (a lost connection,
    say): it unwinds the workflow function, which must not take it for its own failure; the
    pass then re-raises ``error`` for the worker, which releases the run."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class NonDeterminism(Suspend):
    """The workflow called its steps in another order than when they first ran.

    ``step``: the step the code called; ``expected``: the one stored at that place.
    """

    def __init__(self, message: str, *, step: str, expected: str) -> None:
        super().__init__(message)
        self.step = step
        self.expected = expected


class WaitFailed(Exception):
    """A wait ended in a failure of its step (a failed child, say)."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error["message"])
        self.error = error
