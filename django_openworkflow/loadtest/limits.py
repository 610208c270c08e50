"""The queue-limit variants of ``bench_workflows``: what each one sets up, how it is judged.

Each variant measures like ``enqueue_first`` (every run pending, then all
released at once) but its runs go to the queue ``bench-limited``, which has
one limit, and its worker is started with the same ``OPENWORKFLOW["QUEUES"]``
(``worker_settings.py``):

- ``queue_concurrency``: ``concurrency`` = C, the worker's concurrency.
  Passes at 85 % of the unlimited runs/s or more.
- ``key_concurrency``: ``key_concurrency`` = 1, the runs spread round-robin
  over 100 concurrency keys. Passes at 70 % or more.
- ``rate_limit``: a ``rate_limit`` well below the unlimited throughput
  (``100/s``). Passes when the rate of first starts over the steady part
  (``steady_rate``) is within 5 % of the limit.

"Unlimited" is the median runs/s of the ``enqueue_first`` measurements at the
same concurrency in the same invocation; asking for a limit variant adds
``enqueue_first`` when it was not asked for, and measures it first. Nothing
here touches the database: the command measures, this module decides.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from ..queues import parse_rate

BASELINE = "enqueue_first"
PLAIN_VARIANTS = ("enqueue_first", "worker_running")
LIMIT_VARIANTS = ("queue_concurrency", "key_concurrency", "rate_limit")
QUEUE = "bench-limited"
MIN_RATIO = {"queue_concurrency": 0.85, "key_concurrency": 0.70}
RATE_TOLERANCE = 0.05
DEFAULT_RATE_LIMIT = "100/s"
DEFAULT_KEYS = 100

# How bench_workflows hands settings to its workers (read by worker_settings.py).
SETTINGS_MODULE = "django_openworkflow.loadtest.worker_settings"
PROJECT_SETTINGS_ENV = "OPENWORKFLOW_BENCH_PROJECT_SETTINGS"
OVERRIDES_ENV = "OPENWORKFLOW_BENCH_OVERRIDES"


def parse_variants(text: str) -> list[str]:
    """``--variants``: plain ones first, then limit ones, ``enqueue_first`` added for those."""
    variants = [v for v in text.split(",") if v]
    unknown = set(variants) - {*PLAIN_VARIANTS, *LIMIT_VARIANTS}
    if unknown:
        raise ValueError(f"unknown variants: {', '.join(sorted(unknown))}")
    limited = [v for v in variants if v in LIMIT_VARIANTS]
    if not limited:
        return variants
    plain = [v for v in variants if v in PLAIN_VARIANTS]
    if BASELINE not in plain:
        plain.insert(0, BASELINE)
    return plain + limited


def check_rate_limit(text: str) -> str:
    """``--rate-limit``: ``"N/s"``, ``"N/m"`` or ``"N/h"`` (``ValueError`` otherwise)."""
    parse_rate(text)
    return text.replace(" ", "")


def check_duration(runs: int, rate_limit: str, timeout: float) -> None:
    """``ValueError`` when ``runs`` at ``rate_limit`` cannot finish within ``timeout`` seconds."""
    least = runs / rate_per_s(rate_limit)
    if least > timeout:
        raise ValueError(
            f"--runs {runs} at {rate_limit} take {least:.0f} s, more than --timeout {timeout:.0f} s"
        )


def rate_per_s(rate_limit: str) -> float:
    runs, window = parse_rate(rate_limit)
    return runs / window


def overrides(
    variant: str, concurrency: int, rate_limit: str, queues: dict[str, Any]
) -> dict[str, Any]:
    """The ``OPENWORKFLOW`` keys of one measurement, for the command and its worker alike.

    None (``{}``) for the plain variants; for a limit variant, the project's ``QUEUES``
    with ``bench-limited`` added.
    """
    if variant not in LIMIT_VARIANTS:
        return {}
    return {"QUEUES": {**queues, QUEUE: queue_options(variant, concurrency, rate_limit)}}


def queue_options(variant: str, concurrency: int, rate_limit: str) -> dict[str, Any]:
    """The limits of the queue ``bench-limited`` for one variant."""
    if variant == "queue_concurrency":
        return {"concurrency": concurrency}
    if variant == "key_concurrency":
        return {"key_concurrency": 1}
    if variant == "rate_limit":
        return {"rate_limit": rate_limit}
    raise ValueError(f"not a limit variant: {variant!r}")


def concurrency_key(variant: str, i: int, keys: int) -> str | None:
    """The concurrency key of run ``i``: round-robin over ``keys`` keys, for ``key_concurrency``."""
    return f"key-{i % keys}" if variant == "key_concurrency" else None


def runs_by_key(variant: str, runs: int, keys: int) -> dict[str | None, list[int]]:
    """The runs ``0 .. runs - 1`` grouped by concurrency key (one ``start_many()`` a key)."""
    groups: dict[str | None, list[int]] = {}
    for i in range(runs):
        groups.setdefault(concurrency_key(variant, i, keys), []).append(i)
    return groups


def worker_env(project_settings: str, openworkflow: dict[str, Any]) -> dict[str, str]:
    """Environment of a worker whose ``OPENWORKFLOW`` is the project's updated with these keys."""
    return {
        "DJANGO_SETTINGS_MODULE": SETTINGS_MODULE,
        PROJECT_SETTINGS_ENV: project_settings,
        OVERRIDES_ENV: json.dumps(openworkflow),
    }


@dataclass(frozen=True)
class SteadyRate:
    """First starts counted in ``[begin, end)``, a whole number of rate windows."""

    runs: int
    begin: datetime
    end: datetime

    @property
    def seconds(self) -> float:
        return (self.end - self.begin).total_seconds()

    @property
    def per_s(self) -> float:
        return self.runs / self.seconds


def steady_rate(starts: Iterable[datetime], window: float) -> SteadyRate | None:
    """The rate of first starts over the steady part of a rate-limited measurement.

    ``starts`` are the runs' ``started_at`` (the database clock, as the limit
    itself). The part counted begins one window after the first start,
    leaving out the burst of the release, and spans as many whole windows as
    fit before the last start, leaving out the tail where the backlog ran out.
    When the starts span less than two windows, the first window is kept (it
    begins at the first start); under one window, there is nothing to count
    (None). "At most N in any window" lets at most N starts into each whole
    window, so the figure exceeds the limit only if the limit leaks; below
    it, the worker lags behind the limit.
    """
    ordered = sorted(starts)
    if len(ordered) < 2:
        return None
    span = (ordered[-1] - ordered[0]).total_seconds()
    skip = 1 if span >= 2 * window else 0
    whole = int((span - skip * window) // window)
    if whole < 1:
        return None
    begin = ordered[0] + timedelta(seconds=skip * window)
    end = begin + timedelta(seconds=whole * window)
    return SteadyRate(sum(begin <= t < end for t in ordered), begin, end)


def judge(
    line: dict[str, Any],
    lines: Iterable[dict[str, Any]],
    queue_limits: dict[str, Any],
    starts: Iterable[datetime],
) -> dict[str, Any]:
    """The fields a limit variant's line gets: its limits, its ratio, its verdict.

    ``lines`` are the invocation's lines so far (the unlimited measurements
    among them); ``starts``, the runs' first starts, are read for ``rate_limit`` only.
    """
    unlimited = statistics.median(
        other["runs_per_s"]
        for other in lines
        if other["variant"] == BASELINE and other["concurrency"] == line["concurrency"]
    )
    fields = {
        "queue": QUEUE,
        "queue_limits": queue_limits,
        **ratio_fields(line["variant"], line["runs_per_s"], unlimited),
    }
    if line["variant"] == "rate_limit":
        rate_limit = queue_limits["rate_limit"]
        steady = steady_rate(starts, parse_rate(rate_limit)[1])
        fields.update(rate_fields(rate_limit, steady))
    return fields


def ratio_fields(variant: str, runs_per_s: float, unlimited: float) -> dict[str, Any]:
    """The ratio to the unlimited runs/s and, but for ``rate_limit``, its verdict."""
    ratio = round(runs_per_s / unlimited, 3)  # judged as reported
    fields: dict[str, Any] = {"unlimited_runs_per_s": round(unlimited, 1), "ratio": ratio}
    if variant in MIN_RATIO:
        fields["min_ratio"] = MIN_RATIO[variant]
        fields["verdict"] = "pass" if ratio >= MIN_RATIO[variant] else "fail"
    return fields


def rate_fields(rate_limit: str, steady: SteadyRate | None) -> dict[str, Any]:
    """The steady rate of first starts against the limit, and the verdict (within 5 %)."""
    limit = rate_per_s(rate_limit)
    fields: dict[str, Any] = {
        "rate_limit": rate_limit,
        "rate_limit_per_s": round(limit, 3),
        "rate_tolerance_pct": round(100 * RATE_TOLERANCE, 1),
    }
    if steady is None:  # the starts span less than one window: the limit never held them
        return {
            **fields,
            "started_per_s": None,
            "rate_error_pct": None,
            "steady_s": None,
            "steady_runs": None,
            "verdict": "fail",
        }
    error_pct = round(100 * (steady.per_s / limit - 1), 2)  # judged as reported
    return {
        **fields,
        "started_per_s": round(steady.per_s, 1),
        "rate_error_pct": error_pct,
        "steady_s": round(steady.seconds, 3),
        "steady_runs": steady.runs,
        "verdict": "pass" if abs(error_pct) <= fields["rate_tolerance_pct"] else "fail",
    }


def medians(lines: list[dict[str, Any]], concurrency: int) -> list[dict[str, Any]]:
    """For each variant judged by a ratio and measured more than once at ``concurrency``, its
    median runs/s against the median unlimited runs/s, and the verdict on those."""
    at = [line for line in lines if line["concurrency"] == concurrency]
    unlimited = [line["runs_per_s"] for line in at if line["variant"] == BASELINE]
    if not unlimited:
        return []
    result = []
    for variant in MIN_RATIO:
        measured = [line["runs_per_s"] for line in at if line["variant"] == variant]
        if len(measured) < 2:
            continue
        runs_per_s = statistics.median(measured)
        result.append(
            {
                "variant": variant,
                "concurrency": concurrency,
                "reps": len(measured),
                "runs_per_s": runs_per_s,
                **ratio_fields(variant, runs_per_s, statistics.median(unlimited)),
            }
        )
    return result


def median_summary(line: dict[str, Any]) -> str:
    """One line of words for a line of ``medians()``."""
    return (
        f"{line['variant']} C={line['concurrency']}, medians of {line['reps']} repeats: "
        f"{line['runs_per_s']:.1f} runs/s = {line['ratio']:.2f} x unlimited "
        f"{line['unlimited_runs_per_s']:.1f}; needs >= {line['min_ratio']:.2f}: {line['verdict']}"
    )


def summary(line: dict[str, Any]) -> str:
    """One line of words for a limit variant's JSON line (the command writes it to stderr)."""
    keys = f" over {line['concurrency_keys']} keys" if "concurrency_keys" in line else ""
    head = (
        f"{line['variant']} C={line['concurrency']} {json.dumps(line['queue_limits'])}{keys}: "
        f"{line['runs_per_s']:.1f} runs/s = {line['ratio']:.2f} x unlimited "
        f"{line['unlimited_runs_per_s']:.1f}"
    )
    if "min_ratio" in line:
        return f"{head}; needs >= {line['min_ratio']:.2f}: {line['verdict']}"
    if line["started_per_s"] is None:
        return (
            f"{head}; first starts span less than one window of {line['rate_limit']}, "
            f"nothing to measure (more runs?): {line['verdict']}"
        )
    note = ""
    if line["unlimited_runs_per_s"] < line["rate_limit_per_s"]:
        note = " (the unlimited rate is below the limit: choose a lower --rate-limit)"
    return (
        f"{head}; first starts {line['started_per_s']:.1f}/s over {line['steady_s']:.1f} s "
        f"({line['steady_runs']} runs) against {line['rate_limit']}: "
        f"{line['rate_error_pct']:+.1f} %, needs within {line['rate_tolerance_pct']:.0f} %: "
        f"{line['verdict']}{note}"
    )
