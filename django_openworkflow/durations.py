"""Durations and retry policies: pure functions, no database.

A duration is a :class:`~datetime.timedelta`, a number of seconds, or a
string made of a number and a unit: ``"250ms"``, ``"10s"``, ``"5m"``,
``"2h"``, ``"7d"``. Anything else, negative durations included, is a
``ValueError`` raised where the duration is given.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import timedelta

Duration = timedelta | int | float | str

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$", re.ASCII)  # digits 0-9 only


def parse_duration(value: object, *, what: str = "duration") -> timedelta:
    """Return ``value`` as a non-negative ``timedelta`` or raise ``ValueError``."""
    if isinstance(value, bool):  # bool is an int; True seconds is surely a mistake
        raise ValueError(
            f"{what} must be a timedelta, seconds or a string like '10s', not {value!r}"
        )
    if isinstance(value, timedelta):  # kept exact: total_seconds() would round large ones
        if value < timedelta(0):
            raise ValueError(f"{what} {value!r} is negative")
        return timedelta(days=value.days, seconds=value.seconds, microseconds=value.microseconds)
    if isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:  # an int beyond any float
            raise ValueError(f"{what} {value!r} is too large") from None
    elif isinstance(value, str):
        match = _PATTERN.match(value)
        if not match:
            raise ValueError(
                f"{what} {value!r} is not a duration: use a number with a unit "
                "(ms, s, m, h, d), e.g. '250ms', '10s', '5m', '2h', '7d'"
            )
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    else:
        raise ValueError(
            f"{what} must be a timedelta, seconds or a string like '10s', "
            f"not {type(value).__name__} {value!r}"
        )
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"{what} {value!r} is not a finite duration")
    if seconds < 0:
        raise ValueError(f"{what} {value!r} is negative")
    try:
        return timedelta(seconds=seconds)
    except OverflowError:  # more than timedelta.max (about 2.7 million years)
        raise ValueError(f"{what} {value!r} is too large") from None


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how fast a failing step (or workflow) is tried again.

    The delay before attempt ``k + 1`` is
    ``min(initial_interval * backoff_coefficient ** (k - 1), maximum_interval)``.
    ``maximum_attempts=0`` means unlimited.
    """

    initial_interval: timedelta = field(default=timedelta(seconds=1))
    backoff_coefficient: float = 2.0
    maximum_interval: timedelta = field(default=timedelta(seconds=100))
    maximum_attempts: int = 10

    def __init__(
        self,
        initial_interval: Duration = "1s",
        backoff_coefficient: float = 2.0,
        maximum_interval: Duration = "100s",
        maximum_attempts: int = 10,
    ) -> None:
        initial = parse_duration(initial_interval, what="initial_interval")
        maximum = parse_duration(maximum_interval, what="maximum_interval")
        if isinstance(backoff_coefficient, bool) or not isinstance(
            backoff_coefficient, (int, float)
        ):
            raise ValueError(f"backoff_coefficient must be a number, not {backoff_coefficient!r}")
        try:
            coefficient = float(backoff_coefficient)
        except OverflowError:  # an int beyond any float
            coefficient = math.inf
        if not math.isfinite(coefficient) or coefficient < 1:
            raise ValueError(f"backoff_coefficient must be at least 1, not {backoff_coefficient!r}")
        if isinstance(maximum_attempts, bool) or not isinstance(maximum_attempts, int):
            raise ValueError(f"maximum_attempts must be an integer, not {maximum_attempts!r}")
        if maximum_attempts < 0:
            raise ValueError(
                f"maximum_attempts must be 0 (unlimited) or more, not {maximum_attempts!r}"
            )
        object.__setattr__(self, "initial_interval", initial)
        object.__setattr__(self, "backoff_coefficient", coefficient)
        object.__setattr__(self, "maximum_interval", maximum)
        object.__setattr__(self, "maximum_attempts", maximum_attempts)

    def delay(self, failed_attempts: int) -> timedelta:
        """The wait before the next attempt, after ``failed_attempts`` (>= 1) failures."""
        exponent = max(failed_attempts, 1) - 1
        initial = self.initial_interval.total_seconds()
        cap = self.maximum_interval.total_seconds()
        try:
            seconds = initial * self.backoff_coefficient**exponent
        except OverflowError:  # the power alone overflows: capped, unless there is no delay
            seconds = cap if initial else 0.0
        if seconds >= cap:  # the maximum itself: its seconds as a float may round past it
            return self.maximum_interval
        return timedelta(seconds=seconds)

    def exhausted(self, failed_attempts: int) -> bool:
        """True when no further attempt may be made after ``failed_attempts`` failures."""
        return self.maximum_attempts != 0 and failed_attempts >= self.maximum_attempts


DEFAULT_STEP_RETRY_POLICY = RetryPolicy()
DEFAULT_WORKFLOW_RETRY_POLICY = RetryPolicy(maximum_attempts=1)
