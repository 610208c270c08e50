"""What must behave alike on PostgreSQL, SQLite and MariaDB/MySQL.

MySQL's usual collations (``utf8mb4_general_ci``, ``utf8mb4_unicode_ci``; the
MariaDB test database uses the latter) compare text ignoring case, accents and
trailing spaces and hold every emoji equal; its JSON has a depth limit and
its datetimes need an explicit precision. Names, keys and signals compare
exactly everywhere, as on PostgreSQL.
"""

from __future__ import annotations

import datetime

import pytest
from django.db import connection
from django.utils import timezone

from django_openworkflow import send_signal
from django_openworkflow.models import StepAttempt, WorkflowRun
from django_openworkflow.testing import drain
from tests.conftest import claim
from tests.testapp.workflows import echo, exact_step_names, waiter

pytestmark = pytest.mark.django_db

# Pairs that a case-, accent- or pad-insensitive collation takes for one value.
LOOK_ALIKE = [
    ("Order-1", "order-1"),  # case
    ("café", "cafe"),  # accents
    ("straße", "strasse"),  # expansions
    ("key", "key "),  # a trailing space (PAD SPACE collations ignore it)
    ("🍣", "🍺"),  # 4-byte characters (general_ci and unicode_ci hold them all equal)
]


@pytest.mark.parametrize(("first", "second"), LOOK_ALIKE)
def test_idempotency_keys_compare_exactly(first, second):
    one = echo.start({"n": 1}, idempotency_key=first)
    other = echo.start({"n": 2}, idempotency_key=second)
    again = echo.start({"n": 3}, idempotency_key=first)

    assert one.pk != other.pk
    assert again.pk == one.pk
    assert WorkflowRun.objects.get(pk=other.pk).idempotency_key == second


@pytest.mark.parametrize(("first", "second"), LOOK_ALIKE)
def test_signals_compare_exactly(first, second):
    run = waiter.start({"signal": first})
    drain(time_travel=False)  # parked, waiting for `first`

    assert send_signal(second) == []
    assert send_signal(first) == [str(run.pk)]


def test_step_names_compare_exactly():
    names = [name for pair in LOOK_ALIKE for name in pair]
    run = exact_step_names.start(names)
    drain()
    run.refresh_from_db()

    assert (run.status, run.output) == ("completed", names)
    stored = StepAttempt.objects.filter(workflow_run=run).values_list("step_name", flat=True)
    assert sorted(stored) == sorted(names)


@pytest.mark.parametrize(("first", "second"), LOOK_ALIKE[:2])
def test_workflow_names_compare_exactly_when_claiming(first, second):
    WorkflowRun.objects.create(workflow_name=first)

    assert claim(second) == []
    assert [c.run.workflow_name for c in claim(first)] == [first]


def test_the_search_still_ignores_case():
    run = echo.start(idempotency_key="Order-42")

    assert list(WorkflowRun.objects.matching("order")) == [run]
    assert list(WorkflowRun.objects.matching("ECHO")) == [run]


def test_a_long_key_of_four_byte_characters_is_kept_whole():
    key = "😀" * 255  # 255 characters, 1020 bytes in UTF-8

    run = echo.start(idempotency_key=key)

    assert WorkflowRun.objects.get(pk=run.pk).idempotency_key == key
    assert echo.start(idempotency_key=key).pk == run.pk


def test_json_values_come_back_as_they_were_given():
    value = {
        "big": 2**63 - 1,
        "small": -(2**63),
        "beyond_64_bits": 2**70,
        "float": 0.1,
        "text": "ünïcödé 😀 \\ \" ' \n\t",
        "empty": {},
        "list": [None, True, False, [], ""],
        "nested": [[[[[[[[[[{"deep": 10}]]]]]]]]]],
    }
    run = echo.start(value)
    drain()

    run = WorkflowRun.objects.get(pk=run.pk)
    assert run.input == value
    assert run.output == value


def test_datetimes_keep_their_microseconds():
    at = timezone.now().replace(microsecond=123456) + datetime.timedelta(days=1)

    run = echo.start(available_at=at, deadline_at=at + datetime.timedelta(microseconds=1))

    run = WorkflowRun.objects.get(pk=run.pk)
    assert (run.available_at, run.deadline_at) == (at, at + datetime.timedelta(microseconds=1))


def test_the_database_clock_is_utc():
    # Now() is the database's clock (CURRENT_TIMESTAMP on MySQL, in the session's time
    # zone); Django reads stored datetimes as UTC. A mismatch shifts every timer.
    run = echo.start()
    created = WorkflowRun.objects.get(pk=run.pk).created_at

    assert abs(created - timezone.now()) < datetime.timedelta(minutes=5)


def nested(depth):
    value = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_json_nested_30_deep_is_stored_everywhere():
    run = echo.start(nested(30))
    drain()
    run = WorkflowRun.objects.get(pk=run.pk)
    assert (run.status, run.output) == ("completed", nested(30))


def test_json_nested_deeper_is_refused_at_start_on_mysql_only():
    if connection.vendor != "mysql":
        assert echo.start(nested(31)).input == nested(31)
        return
    with pytest.raises(TypeError) as info:
        echo.start({"a": nested(30)})
    assert str(info.value) == (
        'input of workflow "echo" is not a JSON value: $ is nested 31 deep; '
        "MySQL and MariaDB store JSON nested at most 30 deep"
    )
    assert not WorkflowRun.objects.exists()


def test_json_depth_counts_lists_and_dicts():
    from django_openworkflow.serialization import json_depth

    assert [json_depth(v) for v in (1, "x", [], {}, [1], {"a": [{}]}, nested(7))] == [
        0,
        0,
        1,
        1,
        1,
        3,
        7,
    ]
