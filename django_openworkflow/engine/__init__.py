"""The engine: execute one claimed run (see ``execution.py``)."""

from __future__ import annotations

from .context import StepApi, WorkflowContext
from .control import ClaimLost, NonDeterminism, Suspend
from .execution import MAX_STEP_ATTEMPTS, Execution
from .history import History, replay_positions

__all__ = [
    "MAX_STEP_ATTEMPTS",
    "ClaimLost",
    "Execution",
    "History",
    "NonDeterminism",
    "StepApi",
    "Suspend",
    "WorkflowContext",
    "replay_positions",
]
