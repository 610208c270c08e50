"""Shared by the management commands: option types, starting ``runworker`` processes."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from datetime import timedelta
from typing import IO, Any

from django.conf import settings

from ..durations import parse_duration


def spawn_runworker(
    *args: str, stderr: IO[Any] | int | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``manage.py runworker *args`` in a new process with this process's settings.

    ``env`` adds to this process's environment variables, or replaces them
    (``DJANGO_SETTINGS_MODULE`` too).
    """
    env = {**os.environ, **(env or {})}
    env.setdefault("DJANGO_SETTINGS_MODULE", settings.SETTINGS_MODULE)
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, "-m", "django", "runworker", *args], env=env, stderr=stderr
    )


def positive_int(value: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


def seconds(value: str) -> float:
    """argparse type: a number of seconds, zero or more."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, not {value!r}") from None
    if not (0 <= number < float("inf")):
        raise argparse.ArgumentTypeError(f"must be zero or more seconds, not {value!r}")
    return number


def percent(value: str) -> float:
    """argparse type: a percentage from 0 to below 100."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a percentage, not {value!r}") from None
    if not 0 <= number < 100:
        raise argparse.ArgumentTypeError(f"must be from 0 to below 100, not {value!r}")
    return number


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the worker finishes its runs in flight), SIGKILL after 30 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def duration(value: str) -> timedelta:
    """argparse type: a duration such as "30d", "12h" or seconds."""
    try:
        return parse_duration(float(value) if value.replace(".", "", 1).isdigit() else value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
