"""What failure log lines say of an exception (``django_openworkflow.logfields``)."""

from __future__ import annotations

import sqlite3

from django.db import OperationalError

from django_openworkflow.checks import SQLITE_LOCKED_HINT
from django_openworkflow.logfields import failure, failure_text


def test_a_failure_is_its_type_and_the_first_line_of_its_message():
    exc = OperationalError(
        'connection to server at "127.0.0.1", port 5432 failed: Connection refused\n'
        "\tIs the server running on that host and accepting TCP/IP connections?"
    )
    assert failure(exc) == (
        'OperationalError detail=connection to server at "127.0.0.1", port 5432 failed: '
        "Connection refused"
    )
    assert failure_text(exc) == f"OperationalError: {exc}"


def test_a_failure_without_a_message_is_its_type():
    assert failure(OperationalError()) == "OperationalError"
    assert failure(OperationalError("\n  \n")) == "OperationalError"


def test_a_locked_sqlite_database_gets_the_hint():
    exc = OperationalError(str(sqlite3.OperationalError("database is locked")))
    assert failure(exc) == f"OperationalError detail=database is locked hint={SQLITE_LOCKED_HINT}"
