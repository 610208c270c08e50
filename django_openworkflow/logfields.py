"""What a failure log line says of an exception: its type, the first line of its message.

A database's message can span lines (PostgreSQL's ``DETAIL`` and ``CONTEXT``)
and those may quote the values of a row. The failure lines of the worker's
own statements (its loop, heartbeat, registry row, listener, purge, schedules)
write ``error=<type> detail=<first line>``: the first line tells a refused
connection from a lock timeout or SQLite's "database is locked" (which gets
a ``hint=``). The full text goes to DEBUG (``failure_text()``).
"""

from __future__ import annotations


def failure(exc: BaseException) -> str:
    """The value of a line's last fields: ``OperationalError detail=database is locked``.

    With ``hint=`` (what to change) for SQLite's "database is locked".
    """
    text = first_line(exc)
    fields = type(exc).__name__ + (f" detail={text}" if text else "")
    if "database is locked" in str(exc):
        from .checks import SQLITE_LOCKED_HINT  # checks imports the modules that log

        fields += f" hint={SQLITE_LOCKED_HINT}"
    return fields


def first_line(exc: BaseException) -> str:
    """The first non-blank line of the exception's message ("" when it has none)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return ""


def failure_text(exc: BaseException) -> str:
    """The exception's whole message, for the DEBUG line that follows a failure line."""
    return f"{type(exc).__name__}: {exc}"
