"""``JSONFormatter``: one JSON object per log line, for log shippers.

Use it from Django's ``LOGGING`` like any formatter::

    LOGGING = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "django_openworkflow.logging.JSONFormatter"}},
        "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "json"}},
        "root": {"handlers": ["console"], "level": "INFO"},
    }

Every line has ``time`` (ISO 8601, UTC), ``level``, ``logger`` and
``message``, and ``exc_type`` and ``traceback`` when the record carries an
exception. The lines of django_openworkflow's loggers read
``event text key=value key=value``; for them the line also has ``event``
(the text before the first field) and ``fields`` (the ``key=value`` pairs,
values as strings). The fields are read from the message's template
(``"step failed run=%s step=%s"``) with its arguments, so a value holding
spaces or ``key=`` text (a step name from data) stays one value; a message
logged without arguments is split where a `` key=`` starts.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from typing import Any

# Where a field starts: whitespace, then a name and "=".
_FIELD = re.compile(r"\s+(?=[A-Za-z_][A-Za-z0-9_]*=)")
# A %-conversion of a template (not "%%").
_CONVERSION = re.compile(r"%[#0\- +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[hlL]?[diouxXeEfFgGcrsa]")
_OURS = "django_openworkflow"


def parse_message(message: str) -> tuple[str, dict[str, str]]:
    """``("run failed", {"run": "7", "error": "ValueError"})`` from ``"run failed run=7
    error=ValueError"``: the event text and the fields, in order."""
    event, *parts = _FIELD.split(" " + message)
    fields: dict[str, str] = {}
    for part in parts:
        key, _, value = part.partition("=")
        fields[key] = value
    return event.strip(), fields


def parse_record(record: logging.LogRecord, message: str) -> tuple[str, dict[str, str]]:
    """The event and fields of a record: from its template and arguments, each value
    formatted alone; from its text when that cannot be done (no arguments, a dict)."""
    template, args = record.msg, record.args
    if not (isinstance(template, str) and isinstance(args, tuple) and args):
        return parse_message(message)
    event, *parts = _FIELD.split(" " + template)
    pieces = [event, *(part.partition("=")[2] for part in parts)]
    counts = [len(_CONVERSION.findall(piece.replace("%%", ""))) for piece in pieces]
    if sum(counts) != len(args):
        return parse_message(message)
    texts, at = [], 0
    try:
        for piece, count in zip(pieces, counts, strict=True):
            texts.append(piece % args[at : at + count] if count else piece.replace("%%", "%"))
            at += count
    except (TypeError, ValueError, KeyError):
        return parse_message(message)
    keys = [part.partition("=")[0] for part in parts]
    return texts[0].strip(), dict(zip(keys, texts[1:], strict=True))


class JSONFormatter(logging.Formatter):
    """Formats each record as one line of JSON (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        if record.name == _OURS or record.name.startswith(_OURS + "."):
            line["event"], line["fields"] = parse_record(record, message)
        if record.exc_info and record.exc_info[0] is not None:
            line["exc_type"] = record.exc_info[0].__name__
            line["traceback"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)
