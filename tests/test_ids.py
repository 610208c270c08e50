"""Run ids are UUIDs of version 7: they sort by the time they were made."""

from __future__ import annotations

import time
import uuid

import pytest

from django_openworkflow.ids import uuid7
from tests.testapp.workflows import echo


def test_a_uuid7_has_version_7_the_rfc_variant_and_the_time_in_milliseconds():
    before = time.time_ns() // 1_000_000
    value = uuid7()
    after = time.time_ns() // 1_000_000
    assert value.version == 7
    assert value.variant == uuid.RFC_4122
    assert before <= value.int >> 80 <= after


def test_uuid7s_of_later_milliseconds_sort_later_and_never_repeat():
    earlier = uuid7()
    time.sleep(0.002)
    later = [uuid7() for _ in range(1000)]
    assert all(earlier < value for value in later)
    assert len(set(later)) == 1000


@pytest.mark.django_db
def test_runs_get_time_ordered_ids_from_start_and_start_many():
    first = echo.start({"n": 1})
    time.sleep(0.002)
    second, third = echo.start_many([{"n": 2}, {"n": 3}])
    for run in (first, second, third):
        assert run.pk.version == 7
    assert first.pk < second.pk and first.pk < third.pk
