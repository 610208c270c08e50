"""Durable workflows for Django.

Public names are imported lazily, so importing the package never imports
models (it is safe in settings and in ``AppConfig``).
"""

from __future__ import annotations

from typing import Any

from .durations import RetryPolicy
from .exceptions import (
    InvalidTransition,
    RunBusy,
    StepFailed,
    WorkflowCanceled,
    WorkflowError,
    WorkflowFailed,
)

__all__ = [
    "InvalidTransition",
    "RetryPolicy",
    "RunBusy",
    "Schedule",
    "StepFailed",
    "WorkflowCanceled",
    "WorkflowError",
    "WorkflowFailed",
    "asend_signal",
    "send_signal",
    "workflow",
]

__version__ = "0.2.0.dev0"


def __getattr__(name: str) -> Any:
    if name == "workflow":
        from .registry import workflow

        return workflow
    if name == "Schedule":
        from .cron import Schedule

        return Schedule
    if name == "send_signal":
        from .signaling import send_signal

        return send_signal
    if name == "asend_signal":
        from .signaling import asend_signal

        return asend_signal
    raise AttributeError(f"module 'django_openworkflow' has no attribute {name!r}")
