from datetime import timedelta

import pytest

from django_openworkflow import RetryPolicy
from django_openworkflow.durations import parse_duration


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("250ms", 0.25),
        ("10s", 10),
        ("5m", 300),
        ("2h", 7200),
        ("7d", 604800),
        ("1.5s", 1.5),
        (3, 3),
        (0.5, 0.5),
        (0, 0),
        (timedelta(minutes=2), 120),
    ],
)
def test_parse_duration_accepts(value, seconds):
    assert parse_duration(value) == timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-1s", "duration '-1s' is not a duration: use a number with a unit"),
        ("10", "duration '10' is not a duration: use a number with a unit"),
        ("ten seconds", "duration 'ten seconds' is not a duration"),
        ("10w", "duration '10w' is not a duration"),
        ("\u0663s", "duration '\u0663s' is not a duration"),  # an Arabic-Indic 3: digits are 0-9
        (-1, "duration -1 is negative"),
        (timedelta(seconds=-5), "is negative"),
        (float("nan"), "is not a finite duration"),
        (float("inf"), "is not a finite duration"),
        (True, "must be a timedelta, seconds or a string like '10s', not True"),
        (None, "must be a timedelta, seconds or a string like '10s', not NoneType None"),
        ([1], "not list [1]"),
    ],
)
def test_parse_duration_refuses(value, message):
    with pytest.raises(ValueError, match=None) as info:
        parse_duration(value)
    assert message in str(info.value)


def test_retry_policy_defaults():
    policy = RetryPolicy()
    assert policy.initial_interval == timedelta(seconds=1)
    assert policy.backoff_coefficient == 2.0
    assert policy.maximum_interval == timedelta(seconds=100)
    assert policy.maximum_attempts == 10


def test_retry_delay_follows_the_formula():
    policy = RetryPolicy(initial_interval="1s", backoff_coefficient=3, maximum_interval="50s")
    # delay before attempt k+1 = min(initial * coefficient ** (k - 1), maximum)
    assert [policy.delay(k).total_seconds() for k in range(1, 6)] == [1, 3, 9, 27, 50]


def test_retry_delay_does_not_overflow():
    policy = RetryPolicy(backoff_coefficient=10, maximum_interval="1h")
    assert policy.delay(10_000) == timedelta(hours=1)


def test_exhausted_counts_attempts_and_zero_means_unlimited():
    assert not RetryPolicy(maximum_attempts=3).exhausted(2)
    assert RetryPolicy(maximum_attempts=3).exhausted(3)
    assert not RetryPolicy(maximum_attempts=0).exhausted(10_000)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"initial_interval": "-1s"}, "initial_interval '-1s' is not a duration"),
        ({"maximum_interval": "soon"}, "maximum_interval 'soon' is not a duration"),
        ({"backoff_coefficient": 0.5}, "backoff_coefficient must be at least 1, not 0.5"),
        ({"backoff_coefficient": "2"}, "backoff_coefficient must be a number, not '2'"),
        ({"maximum_attempts": -1}, "maximum_attempts must be 0 (unlimited) or more, not -1"),
        ({"maximum_attempts": 2.5}, "maximum_attempts must be an integer, not 2.5"),
    ],
)
def test_retry_policy_refuses_bad_values_when_built(kwargs, message):
    with pytest.raises(ValueError) as info:
        RetryPolicy(**kwargs)
    assert str(info.value).startswith(message)
