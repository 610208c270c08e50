"""Queues: ``OPENWORKFLOW["QUEUES"]`` read and checked, and the limits a claim applies.

Every run belongs to one queue (``WorkflowRun.queue``). A queue may limit
how many of its runs are **in progress** at once (``concurrency``), how many
per ``concurrency_key`` (``key_concurrency``), and how many begin their
first execution in any window of time (``rate_limit``). A run is in progress
from its first claim until it finishes, parked time included; resuming a
failed run gives up nothing, it takes a slot again when it starts again.

The claim enforces the limits (``store/orm.py``); this module only says
what they are, and what holds a run back (for the pages).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .names import check_name

if TYPE_CHECKING:
    from .models import WorkflowRun

DEFAULT_QUEUE = "default"
MAX_QUEUE_LENGTH = 100  # WorkflowRun.queue
MIN_PRIORITY, MAX_PRIORITY = -100, 100
QUEUE_OPTIONS = ("concurrency", "key_concurrency", "rate_limit")
RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
RATE_PATTERN = re.compile(r"^\s*(\d+)\s*/\s*([smh])\s*$")


@dataclass(frozen=True)
class Queue:
    """One queue's limits; ``None`` is no limit."""

    name: str
    concurrency: int | None = None
    key_concurrency: int | None = None
    rate_limit: str | None = None

    @property
    def limited(self) -> bool:
        return bool(self.concurrency or self.key_concurrency or self.rate_limit)

    @property
    def rate(self) -> tuple[int, float] | None:
        """``(runs, window in seconds)`` of the rate limit."""
        return None if self.rate_limit is None else parse_rate(self.rate_limit)

    def describe(self) -> str:
        """The limits in words: "concurrency 5, 1 per key, 100/m", or "no limits"."""
        parts = []
        if self.concurrency:
            parts.append(f"concurrency {self.concurrency}")
        if self.key_concurrency:
            parts.append(f"{self.key_concurrency} per key")
        if self.rate_limit:
            parts.append(f"at most {self.rate_limit.replace(' ', '')}")
        return ", ".join(parts) or "no limits"


def parse_rate(text: str) -> tuple[int, float]:
    """``"100/m"`` -> ``(100, 60.0)``; ``ValueError`` for anything else."""
    match = RATE_PATTERN.match(text) if isinstance(text, str) else None
    if match is None or int(match[1]) < 1:
        raise ValueError(f'a rate limit is "N/s", "N/m" or "N/h" with N at least 1, not {text!r}')
    return int(match[1]), RATE_UNITS[match[2]]


def queue_problems(value: Any) -> list[str]:
    """What is wrong with a ``QUEUES`` setting, one sentence per problem (check E010)."""
    if not isinstance(value, dict):
        return [f"QUEUES must be a dict of queue name -> limits, not {type(value).__name__}"]
    problems = []
    for name, options in value.items():
        try:
            check_name(name, "queue name", blank=False, max_length=MAX_QUEUE_LENGTH)
        except (TypeError, ValueError) as exc:
            problems.append(str(exc))
            continue
        if not isinstance(options, dict):
            problems.append(f"queue {name!r} must map to a dict of limits, not {options!r}")
            continue
        for key in sorted(set(options) - set(QUEUE_OPTIONS), key=str):
            problems.append(
                f"queue {name!r} has an unknown option {key!r} (known: {', '.join(QUEUE_OPTIONS)})"
            )
        for key in ("concurrency", "key_concurrency"):
            limit = options.get(key)
            if limit is not None and (
                isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
            ):
                problems.append(
                    f"queue {name!r}: {key} must be a whole number of at least 1, or None, "
                    f"not {limit!r}"
                )
        rate = options.get("rate_limit")
        if rate is not None:
            try:
                parse_rate(rate)
            except ValueError as exc:
                problems.append(f"queue {name!r}: {exc}")
    return problems


def setting_problems() -> list[str]:
    """What is wrong with ``OPENWORKFLOW["QUEUES"]`` (check E010); [] when nothing is."""
    from .conf import app_settings

    return queue_problems(app_settings.QUEUES)


def _invalid_setting() -> str:
    """Why only "default" is known, for a message that names the known queues; or ""."""
    problems = setting_problems()
    if not problems:
        return ""
    return (
        " (OPENWORKFLOW['QUEUES'] is invalid and counts as only 'default', check E010: "
        f"{'; '.join(problems)})"
    )


def configured_queues() -> dict[str, Queue]:
    """The queues of ``OPENWORKFLOW["QUEUES"]``, ``"default"`` always among them.

    Read on every call, so a changed setting takes effect at the next claim.
    A bad setting (check E010) counts as no limits rather than crashing a
    worker that was started without the checks; the worker logs an error
    when it starts, and a refused queue's message says why.
    """
    global _parsed
    from .conf import app_settings

    setting = app_settings.QUEUES
    parsed = _parsed  # the claim asks on every call: parse a setting once
    if parsed is not None and parsed[0] is setting and parsed[1] == setting:
        return parsed[2]
    queues = {DEFAULT_QUEUE: Queue(DEFAULT_QUEUE)}
    if isinstance(setting, dict) and not queue_problems(setting):
        for name, options in setting.items():
            queues[name] = Queue(name, **{key: options.get(key) for key in QUEUE_OPTIONS})
    try:
        _parsed = (setting, copy.deepcopy(setting), queues)
    except Exception:  # a setting that cannot be copied (E010 reports it) is read every time
        _parsed = None
    return queues


# The last setting parsed: the object, a copy (to notice changes made in place), the queues.
_parsed: tuple[Any, Any, dict[str, Queue]] | None = None


def frees_a_place(run: WorkflowRun) -> bool:
    """Whether ending ``run`` frees a place that held-back runs may wait for.

    True for a run that has started, in a queue with limits. Whoever ends it
    (a finish, a cancel, the deadline sweep) wakes the workers (``notify``)
    in the same transaction, so a held-back run starts at once rather than
    at the next poll.
    """
    queue = configured_queues().get(run.queue)
    return run.started_at is not None and queue is not None and queue.limited


def check_queue(queue: Any, of: str) -> str:
    """Return ``queue`` if it is a configured queue's name; else ``ValueError`` naming them."""
    known = configured_queues()
    if queue in known:
        return str(queue)
    check_name(queue, "queue", of=of, max_length=MAX_QUEUE_LENGTH)
    raise ValueError(
        f"queue {queue!r}{of} is not in OPENWORKFLOW['QUEUES']; "
        f"known queues: {', '.join(sorted(known))}{_invalid_setting()}"
    )


def check_priority(priority: Any, of: str) -> int:
    """Return ``priority`` if it is a whole number from -100 to 100; else raise, naming it."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise TypeError(f"priority{of} must be a whole number, not {priority!r}")
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise ValueError(
            f"priority{of} must be from {MIN_PRIORITY} to {MAX_PRIORITY} (higher runs first), "
            f"not {priority}"
        )
    return priority


def check_concurrency_key(key: Any, of: str) -> str | None:
    if key is None:
        return None
    return check_name(key, "concurrency_key", of=of)


def served_queues(names: Any) -> list[str] | None:
    """``runworker --queue`` values checked against the setting; None serves every queue."""
    if not names:
        return None
    known = configured_queues()
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(
            f"unknown queue {', '.join(map(repr, unknown))}: "
            f"OPENWORKFLOW['QUEUES'] has {', '.join(sorted(known))}{_invalid_setting()}"
        )
    return sorted(set(names))
