"""What a name or a key may be: one rule for every kind of them.

Workflow names, step names, child workflow names, signal names, idempotency
keys (of runs and of signals) and worker ids are stored in columns of 255
characters, on every database: ``check_name`` refuses the same things for
each of them, the same way.

- not a string, or empty: ``TypeError`` "... must be a non-empty string, not ..."
- longer than its column: ``ValueError`` "... is N characters ..."
- text no database can store (U+0000, lone surrogates): ``ValueError``
  "... contains ..."
"""

from __future__ import annotations

from typing import Any

# The columns names and keys go in: WorkflowRun.workflow_name, .idempotency_key,
# .worker_id, StepAttempt.step_name, .signal, WorkflowSignal.signal, .idempotency_key.
MAX_NAME_LENGTH = 255

# PostgreSQL cannot store U+0000 in text or jsonb: refused everywhere (values,
# names, keys), so that what SQLite accepts PostgreSQL accepts too.
NUL_PROBLEM = "contains the character U+0000 (NUL), which PostgreSQL cannot store"


def text_problem(text: str) -> str | None:
    """What makes ``text`` unstorable, as "contains ...", or None."""
    if "\x00" in text:
        return NUL_PROBLEM
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError as exc:  # a lone surrogate, e.g. from a bad decode
            return f"contains {text[exc.start]!r}, which is not valid Unicode text"
    return None


def check_name(
    value: Any,
    what: str,
    *,
    of: str = "",
    blank: bool = True,
    max_length: int = MAX_NAME_LENGTH,
) -> str:
    """Return ``value`` if it is a name or key every database stores; else raise, naming it.

    ``what`` names the kind ("step name", ``'idempotency_key of signal "x"'``).
    ``of`` names its owner after the value (``' of workflow "x"'``), and then
    the length message names the owner rather than the start of the value.
    ``blank=False`` refuses names of only whitespace too (workflow names).
    """
    if not isinstance(value, str) or not value or (not blank and not value.strip()):
        raise TypeError(f"{what}{of} must be a non-empty string, not {value!r}")
    if len(value) > max_length:
        if of:
            raise ValueError(
                f"{what}{of} is {len(value)} characters long; at most {max_length} are allowed"
            )
        raise ValueError(f"{what} {value[:40]!r}… is {len(value)} characters; at most {max_length}")
    if problem := text_problem(value):
        raise ValueError(f"{what} {value!r}{of} {problem}")
    return value
