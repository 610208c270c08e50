"""How the engine unwinds a workflow function: ``BaseException`` subclasses, so that
``except Exception`` in workflow code does not swallow them."""

from __future__ import annotations

from typing import Any


class Suspend(BaseException):
    """Unwinds the workflow function when the run parks or the claim is lost."""


class ClaimLost(Suspend):
    """A fenced write found the claim gone: lease taken over, canceled, or past the deadline."""


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
