"""Property-based tests (hypothesis): durations, retry maths, names, JSON values.

Each property states what must hold for every input hypothesis can make, and
each can fail: the expected values are computed another way than the code
computes them (exact integer or fraction arithmetic, a declarative spec of
step numbering), or checked against what the test database gives back after
a run (a JSON value's round trip through our code and a real JSONField).
"""

from __future__ import annotations

import contextlib
import datetime
import decimal
import json
import math
import re
import uuid
from datetime import timedelta
from fractions import Fraction

import pytest
from django.db import transaction
from django.test import override_settings
from django.utils import timezone
from hypothesis import assume, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from django_openworkflow import RetryPolicy, workflow
from django_openworkflow.durations import parse_duration
from django_openworkflow.engine import Execution, NonDeterminism
from django_openworkflow.models import StepAttempt, WorkflowRun
from django_openworkflow.names import check_name
from django_openworkflow.registry import (
    Workflow,
    _duplicates,
    _registry,
    get_workflow,
    workflow_names,
)
from django_openworkflow.serialization import ensure_json, json_problem
from django_openworkflow.store import Claim
from django_openworkflow.testing import drain
from tests.testapp.workflows import echo

MICROSECOND = timedelta(microseconds=1)
UNITS = {"ms": "milliseconds", "s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
UNIT_SECONDS = {"ms": Fraction(1, 1000), "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_MICROSECONDS = timedelta.max // MICROSECOND

# Text without U+0000 and lone surrogates: what every backend can store.
storable_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))


@contextlib.contextmanager
def rolled_back():
    """One hypothesis example's database work, undone afterwards (inside the test's transaction)."""
    with transaction.atomic():
        yield
        transaction.set_rollback(True)


# --- durations -------------------------------------------------------------------


def exact_microseconds(number: Fraction, unit: str) -> Fraction:
    return number * UNIT_SECONDS[unit] * 1_000_000


def close(microseconds: int | Fraction, exact: Fraction) -> bool:
    """Float arithmetic may be off by a microsecond, or by a float's precision."""
    return abs(microseconds - exact) <= max(1, exact * Fraction(1, 10**15))


@given(
    number=st.integers(min_value=0, max_value=10**16),
    unit=st.sampled_from(sorted(UNITS)),
    left=st.sampled_from(["", " ", "\t"]),
    middle=st.sampled_from(["", " "]),
    right=st.sampled_from(["", " ", "\n"]),
)
def test_a_whole_number_with_a_unit_is_that_long_or_too_large(number, unit, left, middle, right):
    text = f"{left}{number}{middle}{unit}{right}"
    exact = exact_microseconds(Fraction(number), unit)
    try:
        parsed = parse_duration(text)
    except ValueError as exc:
        assert str(exc) == f"duration {text!r} is too large"
        assert close(MAX_MICROSECONDS, exact) or exact > MAX_MICROSECONDS
        return
    assert close(parsed // MICROSECOND, exact)
    if unit != "ms" and number <= 10**6:
        assert parsed == timedelta(**{UNITS[unit]: number})


@given(
    whole=st.integers(min_value=0, max_value=10**6),
    fraction=st.from_regex(r"[0-9]{1,6}", fullmatch=True),
    unit=st.sampled_from(sorted(UNITS)),
)
def test_a_decimal_number_with_a_unit_is_that_long(whole, fraction, unit):
    exact = exact_microseconds(Fraction(f"{whole}.{fraction}"), unit)

    parsed = parse_duration(f"{whole}.{fraction}{unit}")

    assert close(parsed // MICROSECOND, exact)


def as_text(delta: timedelta) -> str:
    """The inverse of parse_duration for whole milliseconds: the largest unit that fits."""
    for unit, seconds in sorted(UNIT_SECONDS.items(), key=lambda item: -item[1]):
        size = timedelta(seconds=float(seconds))
        if delta % size == timedelta(0):
            return f"{delta // size}{unit}"
    raise AssertionError(delta)


@given(milliseconds=st.integers(min_value=0, max_value=10**12))
def test_durations_round_trip_through_text(milliseconds):
    delta = timedelta(milliseconds=milliseconds)

    assert parse_duration(as_text(delta)) == delta


@given(delta=st.timedeltas(min_value=timedelta(0)))
def test_a_timedelta_is_returned_exactly(delta):
    assert parse_duration(delta) == delta


@given(delta=st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=10_000)))
def test_a_timedelta_round_trips_through_its_seconds(delta):
    assert abs(parse_duration(delta.total_seconds()) - delta) <= MICROSECOND


@given(delta=st.timedeltas(max_value=-MICROSECOND))
def test_a_negative_timedelta_is_refused(delta):
    with pytest.raises(ValueError) as info:
        parse_duration(delta, what="timeout")
    assert str(info.value) == f"timeout {delta!r} is negative"


@given(value=st.integers(max_value=-1) | st.floats(max_value=-1e-300, allow_infinity=False))
def test_negative_numbers_are_refused(value):
    with pytest.raises(ValueError) as info:
        parse_duration(value)
    assert str(info.value) == f"duration {value!r} is negative"


anything = st.one_of(
    st.text(),
    st.text(alphabet="0123456789.msdh -+e\t\n"),  # near misses of the grammar
    st.from_regex(r"\s*\d+(\.\d+)?\s*(ms|s|m|h|d)\s*", fullmatch=True),  # valid, any digits
    st.integers(),
    st.integers(min_value=10**300, max_value=10**400),
    st.floats(),
    st.booleans(),
    st.none(),
    st.timedeltas(),
    st.binary(max_size=10),
    st.decimals(),
    st.fractions(),
    st.complex_numbers(),
    st.dates(),
    st.datetimes(),
    st.lists(st.integers(), max_size=3),
    st.builds(object),
)


@given(value=anything, what=st.sampled_from(["duration", 'timeout of step "x"']))
def test_anything_is_a_non_negative_timedelta_or_a_value_error_naming_it(value, what):
    try:
        result = parse_duration(value, what=what)
    except ValueError as exc:
        message = str(exc)
        assert message.startswith(what)
        assert repr(value) in message
    else:
        assert type(result) is timedelta
        assert result >= timedelta(0)


# --- retry policies ----------------------------------------------------------------

intervals = st.one_of(
    st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=10**5)),
    st.integers(min_value=0, max_value=10**9),
    st.floats(min_value=0, max_value=1e9),
    st.builds("{}{}".format, st.integers(0, 10**6), st.sampled_from(sorted(UNITS))),
)
coefficients = st.one_of(
    st.floats(min_value=1, max_value=10),
    st.integers(min_value=1, max_value=1000),
    st.floats(min_value=1, max_value=1e308),
)
policies = st.builds(
    RetryPolicy,
    initial_interval=intervals,
    backoff_coefficient=coefficients,
    maximum_interval=intervals | st.just(timedelta.max),
    maximum_attempts=st.integers(min_value=0, max_value=100),
)


@given(policy=policies, a=st.integers(1, 10**6), b=st.integers(1, 10**6))
def test_the_delay_never_decreases_and_never_exceeds_the_maximum(policy, a, b):
    low, high = sorted((a, b))

    assert timedelta(0) <= policy.delay(low) <= policy.delay(high) <= policy.maximum_interval


@given(policy=policies, failed=st.integers(1, 60))
def test_the_delay_is_initial_times_coefficient_to_the_power_capped(policy, failed):
    initial = Fraction(policy.initial_interval // MICROSECOND)
    cap = Fraction(policy.maximum_interval // MICROSECOND)
    coefficient = Fraction(policy.backoff_coefficient)  # the float's exact value
    expected = min(initial * coefficient ** (failed - 1), cap)

    delay = Fraction(policy.delay(failed) // MICROSECOND)

    assert abs(delay - expected) <= 1 + expected * Fraction(1, 10**12)


@given(coefficient=coefficients, failed=st.integers(1, 10**6))
def test_no_initial_interval_means_no_delay_ever(coefficient, failed):
    policy = RetryPolicy(initial_interval=0, backoff_coefficient=coefficient)

    assert policy.delay(failed) == timedelta(0)


@given(policy=policies, a=st.integers(0, 10**4), b=st.integers(0, 10**4))
def test_exhausted_is_monotone_and_zero_means_unlimited(policy, a, b):
    low, high = sorted((a, b))
    if policy.exhausted(low):
        assert policy.exhausted(high)
    if policy.maximum_attempts == 0:
        assert not policy.exhausted(high)
    else:
        assert policy.exhausted(policy.maximum_attempts)
        assert not policy.exhausted(policy.maximum_attempts - 1)


bad_intervals = st.one_of(
    st.integers(max_value=-1),
    st.floats(max_value=-1e-300),
    st.just(float("nan")),
    st.just(float("inf")),
    st.timedeltas(max_value=-MICROSECOND),
    st.text().filter(lambda text: not re.fullmatch(r"\s*\d+(\.\d+)?\s*(ms|s|m|h|d)\s*", text)),
    st.none(),
    st.booleans(),
    st.integers(min_value=10**400, max_value=10**401),
)
bad_coefficients = st.one_of(
    st.floats(max_value=0.999999),
    st.just(float("nan")),
    st.just(float("inf")),
    st.integers(max_value=0),
    st.integers(min_value=10**400, max_value=10**401),
    st.text(),
    st.none(),
    st.booleans(),
    st.decimals(allow_nan=False, allow_infinity=False),
)
bad_attempts = st.one_of(
    st.integers(max_value=-1), st.floats(), st.text(), st.none(), st.booleans()
)


@given(
    field_and_value=st.one_of(
        st.tuples(st.just("initial_interval"), bad_intervals),
        st.tuples(st.just("maximum_interval"), bad_intervals),
        st.tuples(st.just("backoff_coefficient"), bad_coefficients),
        st.tuples(st.just("maximum_attempts"), bad_attempts),
    )
)
def test_bad_policy_arguments_are_refused_naming_the_argument_and_value(field_and_value):
    field, value = field_and_value

    with pytest.raises(ValueError) as info:
        RetryPolicy(**{field: value})

    message = str(info.value)
    assert message.startswith(field)
    assert repr(value) in message


# --- step names ----------------------------------------------------------------------

step_names = st.one_of(
    st.sampled_from(["a", "a:1", "a:2", "a:1:1", "a:10", "b", ":", "1", " "]),
    storable_text.filter(bool).map(lambda text: text[:20]),
)


def expected_names(names: list[str]) -> list[str]:
    """The rule of docs/api.md (Steps), stated without the engine: a name is used as given unless an
    earlier call took it; then it is ``name:k`` for the smallest k not taken."""
    taken: list[str] = []
    for name in names:
        numbered = (f"{name}:{k}" for k in range(1, len(taken) + 2))
        taken.append(name if name not in taken else next(n for n in numbered if n not in taken))
    return taken


def fresh_execution(history: list[str] | None = None) -> Execution:
    """An execution pass of an unsaved run; ``history`` is the step order of a past pass."""
    run = WorkflowRun(workflow_name="names", claim_token=uuid.uuid4())
    claim = Claim(run, run.claim_token, timezone.now(), first_start=False, lease_seconds=30)
    execution = Execution(claim, Workflow(lambda ctx: None, name="names"))
    execution.history.bound = dict(enumerate(history or []))
    return execution


@given(names=st.lists(step_names, max_size=30))
def test_step_names_are_unique_follow_the_rule_and_replay_the_same(names):
    first = fresh_execution()
    stored = [first.step_name(name) for name in names]

    assert len(set(stored)) == len(stored)
    assert stored == expected_names(names)
    for name, given_as in zip(stored, names, strict=True):
        assert name == given_as or re.fullmatch(re.escape(given_as) + r":[1-9][0-9]*", name)
    replay = fresh_execution(history=stored)
    assert [replay.step_name(name) for name in names] == stored


@given(data=st.data(), names=st.lists(step_names, min_size=2, max_size=12))
def test_a_replay_in_another_order_fails_naming_both_steps(data, names):
    stored = expected_names(names)
    reordered = data.draw(st.permutations(names))
    replayed = expected_names(reordered)
    assume(replayed != stored)
    position = next(i for i, (a, b) in enumerate(zip(replayed, stored, strict=True)) if a != b)
    replay = fresh_execution(history=stored)

    for name in reordered[:position]:
        replay.step_name(name)
    with pytest.raises(NonDeterminism) as info:
        replay.step_name(reordered[position])

    message = str(info.value)
    assert f'called step "{replayed[position]}" as step call #{position + 1}' in message
    assert f'where an earlier execution called "{stored[position]}"' in message


@given(
    name=st.one_of(
        st.just(""),
        st.none(),
        st.integers(),
        st.binary(),
        st.lists(st.text(), max_size=2),
    )
)
def test_a_step_name_that_is_not_a_non_empty_string_is_a_type_error(name):
    with pytest.raises(TypeError) as info:
        fresh_execution().step_name(name)
    assert str(info.value) == f"step name must be a non-empty string, not {name!r}"


@given(name=st.text(min_size=256, max_size=600))
def test_a_step_name_longer_than_its_column_is_a_value_error(name):
    with pytest.raises(ValueError, match=r"is \d+ characters; at most 255"):
        fresh_execution().step_name(name)


@given(name=st.text(min_size=254, max_size=255).filter(lambda name: "\x00" not in name))
def test_numbering_that_would_make_a_name_too_long_is_a_value_error(name):
    execution = fresh_execution()
    execution.step_name(name)

    with pytest.raises(ValueError, match=r"is \d+ characters with its number; at most 255"):
        execution.step_name(name)


@given(before=st.text(max_size=5), after=st.text(max_size=5))
def test_a_step_name_with_nul_is_a_value_error(before, after):
    with pytest.raises(ValueError, match=r"U\+0000"):
        fresh_execution().step_name(f"{before}\x00{after}")


@given(before=st.text(max_size=5), after=st.text(max_size=5))
def test_signal_names_and_idempotency_keys_with_nul_are_value_errors(before, after):
    text = f"{before}\x00{after}"

    with pytest.raises(ValueError, match=r"U\+0000"):
        check_name(text, "signal")
    with pytest.raises(ValueError, match=r"U\+0000"):
        echo.start(None, idempotency_key=text)


ops = st.lists(
    st.tuples(st.sampled_from(["run", "run", "sleep"]), step_names), min_size=1, max_size=8
)
calls: list[tuple[str, int]] = []


@workflow(name="property-step-names")
def named_steps(ctx):
    results = []
    for index, (kind, name) in enumerate(ctx.input):
        if kind == "sleep":
            ctx.step.sleep(name, "1s")  # parks: the next pass replays everything before
        else:

            def step(index=index):
                calls.append((ctx.run_id, index))
                return index

            results.append(ctx.step.run(name, step))
    return results


@pytest.mark.django_db
def test_stored_step_names_are_unique_and_replays_reuse_them():
    @given(ops=ops)
    @hypothesis_settings(max_examples=25)
    def check(ops):
        with rolled_back():
            calls.clear()
            run = named_steps.start([list(op) for op in ops])

            drain()

            run.refresh_from_db()
            assert run.status == "completed", run.error
            attempts = list(run.step_attempts.order_by("position"))
            assert [a.step_name for a in attempts] == expected_names([name for _, name in ops])
            assert [a.position for a in attempts] == list(range(len(ops)))
            assert {a.status for a in attempts} == {"completed"}
            # every step ran once, however many passes replayed it, and each call got
            # its own stored result back
            runs = [index for index, (kind, _) in enumerate(ops) if kind == "run"]
            assert sorted(index for _, index in calls) == runs
            assert run.output == runs

    check()


# --- workflow names ------------------------------------------------------------------

workflow_name_text = storable_text.filter(lambda text: text.strip()).map(lambda text: text[:255])


def step_fn(ctx):
    return None


@contextlib.contextmanager
def registry_restored():
    registry, duplicates = dict(_registry), list(_duplicates)
    try:
        yield
    finally:
        _registry.clear()
        _registry.update(registry)
        _duplicates[:] = duplicates


@given(name=workflow_name_text)
def test_a_registered_name_resolves_to_its_workflow(name):
    assume(name not in _registry)
    with registry_restored():
        duplicates = len(_duplicates)
        wf = workflow(name=name)(step_fn)
        again = workflow(name=name)(step_fn)  # the same function again: not a duplicate

        assert wf.name == again.name == name
        assert get_workflow(name) is again
        assert name in workflow_names()
        assert workflow_names() == sorted(workflow_names())
        assert len(_duplicates) == duplicates
    assert get_workflow(name) is None


@given(name=st.text())
def test_an_unknown_name_resolves_to_nothing(name):
    assume(name not in _registry)
    assert get_workflow(name) is None


@given(
    name=st.one_of(
        st.just(""),
        st.text(alphabet=" \t\n\r\x0b\x0c\u00a0\u2003", min_size=1),
        st.integers(),
        st.binary(),
        st.floats(allow_nan=False),
    )
)
def test_an_empty_or_non_string_workflow_name_is_a_type_error(name):
    with registry_restored():
        before = dict(_registry)
        for make in (lambda: workflow(name=name)(step_fn), lambda: Workflow(step_fn, name=name)):
            with pytest.raises(TypeError) as info:
                make()
            assert str(info.value) == f"workflow name must be a non-empty string, not {name!r}"
        assert _registry == before


@given(
    name=st.one_of(
        st.text(min_size=256, max_size=600).filter(lambda text: text.strip()),
        st.builds("{}\x00{}".format, st.text(max_size=5), st.text(max_size=5)),
    )
)
def test_a_workflow_name_the_database_cannot_store_is_a_value_error(name):
    with registry_restored():
        before = dict(_registry)
        for make in (lambda: workflow(name=name)(step_fn), lambda: Workflow(step_fn, name=name)):
            with pytest.raises(ValueError, match=r"at most 255|U\+0000"):
                make()
        assert _registry == before


@pytest.mark.django_db
def test_a_started_run_is_stored_and_claimed_under_its_exact_name():
    @given(name=workflow_name_text, payload=storable_text)
    @hypothesis_settings(max_examples=25)
    def check(name, payload):
        assume(name not in _registry)
        with registry_restored(), rolled_back():
            wf = workflow(name=name)(lambda ctx: ctx.step.run("echo", lambda: ctx.input))
            run = wf.start({"payload": payload})

            drain()

            run.refresh_from_db()
            assert run.workflow_name == name
            assert (run.status, run.output) == ("completed", {"payload": payload})
            assert StepAttempt.objects.get(workflow_run=run).step_name == "echo"

    check()


# --- JSON values -------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-9e15, max_value=9e15),
    storable_text,
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(storable_text.map(lambda key: key[:8]), children, max_size=4),
    ),
    max_leaves=20,
)


def same(stored, value) -> bool:
    """Equal, and of the same JSON type all the way down (1 is neither 1.0 nor True)."""
    if type(stored) is not type(value):
        return False
    if isinstance(value, list):
        return len(stored) == len(value) and all(map(same, stored, value))
    if isinstance(value, dict):
        return stored.keys() == value.keys() and all(same(stored[k], value[k]) for k in value)
    return bool(stored == value)


def stored_by_a_run(value):
    """``value`` as the database gives it back after a run of "echo": input, step result, output.

    The whole way of a value through our code: ``start()`` (the fast path on
    PostgreSQL), the claim that reads the input back, the step result stored
    with the next write (deferred) and the run's output.
    """
    run = echo.start(value)
    drain()
    run = WorkflowRun.objects.get(pk=run.pk)
    assert run.status == "completed", run.error
    [step_output] = StepAttempt.objects.filter(workflow_run=run).values_list("output", flat=True)
    return run.input, step_output, run.output


@pytest.mark.django_db
def test_a_float_that_postgresql_would_give_back_as_an_integer_is_refused():
    for value in (1e16, -1e16, 1e308):
        with pytest.raises(TypeError) as refused:
            echo.start([value])
        assert str(refused.value) == (
            f'input of workflow "echo" is not a JSON value: $[0] is the float {value!r}: '
            "PostgreSQL gives floats of 1e16 and more back as integers; store it as an int or "
            "a string"
        )
    largest = [9.999999999999998e15, 2.0]  # the largest float below the limit comes back a float
    assert all(same(each, largest) for each in stored_by_a_run(largest))


@pytest.mark.django_db
def test_an_accepted_value_is_stored_and_read_back_unchanged():
    @given(value=json_values)
    def check(value):
        assert json_problem(value) is None
        ensure_json(value, "input")
        with rolled_back():
            stored = stored_by_a_run(value)
        assert all(same(each, value) for each in stored), (value, stored)

    check()


class Opaque:
    def __repr__(self) -> str:
        return "<Opaque>"


not_json = st.one_of(
    st.tuples(st.integers()),
    st.sets(st.integers(), max_size=3),
    st.frozensets(st.integers(), max_size=3),
    st.binary(max_size=5),
    st.binary(max_size=5).map(bytearray),
    st.dates(),
    st.datetimes(),
    st.times(),
    st.timedeltas(),
    st.decimals(allow_nan=False),
    st.fractions(),
    st.complex_numbers(),
    st.uuids(),
    st.builds(Opaque),
)
non_finite = st.sampled_from([math.nan, math.inf, -math.inf])
huge_ints = st.integers(min_value=4400, max_value=5000).map(lambda digits: 10**digits)
nul_text = st.builds("{}\x00{}".format, st.text(max_size=4), st.text(max_size=4))


@st.composite
def nested_in_json(draw, bad):
    """A JSON value with ``bad`` somewhere inside, and the path of that place."""
    value, path = bad, ""
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.booleans()):
            before = draw(st.lists(json_values, max_size=3))
            after = draw(st.lists(json_values, max_size=3))
            value, path = [*before, value, *after], f"[{len(before)}]{path}"
        else:
            key = draw(storable_text.map(lambda key: key[:8]))
            others = list(draw(st.dictionaries(storable_text, json_values, max_size=3)).items())
            others = [(k, v) for k, v in others if k != key]
            where = draw(st.integers(0, len(others)))
            value = dict([*others[:where], (key, value), *others[where:]])
            path = f"[{key!r}]{path}"
    return value, f"${path}"


def expected_problem(path: str, bad) -> str:
    if isinstance(bad, float):
        return f"{path} is {bad!r}, which JSON cannot hold"
    if isinstance(bad, int):
        return f"{path} is an integer with more digits than JSON text can hold here"
    if isinstance(bad, str):
        return f"{path} contains the character U+0000 (NUL), which PostgreSQL cannot store"
    return f"{path} is a {type(bad).__module__}.{type(bad).__qualname__} ("


@given(data=st.data(), bad=st.one_of(not_json, non_finite, huge_ints, nul_text))
def test_a_value_that_is_not_json_is_reported_where_it_sits(data, bad):
    value, path = data.draw(nested_in_json(bad))

    problem = json_problem(value)

    assert problem is not None
    assert problem.startswith(expected_problem(path, bad))
    with pytest.raises(TypeError) as info:
        ensure_json(value, 'result of step "s"')
    assert str(info.value) == f'result of step "s" is not a JSON value: {problem}'


@given(
    data=st.data(),
    key=st.one_of(st.integers(), st.none(), st.booleans(), st.floats(), st.tuples(st.integers())),
    item=json_values,
)
def test_a_key_that_is_not_a_string_is_reported_where_it_sits(data, key, item):
    value, path = data.draw(nested_in_json({key: item}))

    assert json_problem(value) == (
        f"{path} has the key {key!r} of type {type(key).__name__}; JSON keys are strings"
    )


@given(data=st.data(), key=nul_text, item=json_values)
def test_a_key_with_nul_is_reported_where_it_sits(data, key, item):
    value, path = data.draw(nested_in_json({key: item}))

    assert json_problem(value) == (
        f"{path} has the key {key!r}, which contains the character U+0000 (NUL), "
        "which PostgreSQL cannot store"
    )


def test_a_value_that_contains_itself_is_reported_not_raised():
    loop: list = [1]
    loop.append({"again": loop})
    deep: list = []
    for _ in range(10_000):
        deep = [deep]

    for value in (loop, deep):
        assert json_problem(value) == "$ is nested too deeply for JSON (or contains itself)"
        with pytest.raises(TypeError, match="nested too deeply"):
            ensure_json(value, "input")


@given(value=json_values, limit=st.integers(min_value=1, max_value=200))
def test_values_over_the_size_limit_are_refused_with_size_and_limit(value, limit):
    size = len(json.dumps(value, separators=(",", ":")).encode())
    with override_settings(OPENWORKFLOW={"MAX_PAYLOAD_BYTES": limit}):
        if size <= limit or not isinstance(value, (str, list, dict)):
            ensure_json(value, "output")
            return
        with pytest.raises(ValueError) as info:
            ensure_json(value, "output")
    assert str(info.value) == (
        f"output is too large: it is {size:,} bytes of JSON, more than "
        f"OPENWORKFLOW['MAX_PAYLOAD_BYTES'] ({limit:,})"
    )


mixed = st.recursive(
    st.one_of(json_scalars, not_json, non_finite, nul_text, st.text()),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.one_of(st.text(max_size=4), st.integers()), children, max_size=3),
        st.tuples(children, children),
    ),
    max_leaves=10,
)


@pytest.mark.django_db
def test_a_value_is_either_refused_naming_where_or_stored_unchanged():
    @given(value=mixed)
    def check(value):
        problem = json_problem(value)
        with rolled_back():
            if problem is None:
                stored = stored_by_a_run(value)
                assert all(same(each, value) for each in stored), (value, stored)
                return
            assert problem.startswith("$"), problem
            with pytest.raises(TypeError) as info:
                echo.start(value)
            assert str(info.value) == f'input of workflow "echo" is not a JSON value: {problem}'
            assert not WorkflowRun.objects.exists()

    check()


def test_examples_of_refusals_read_well():
    # Spelled out once, so a change of wording is seen here and not only in the properties.
    when = datetime.date(2026, 1, 1)
    assert json_problem({"a": [1, when]}) == (
        "$['a'][1] is a datetime.date (datetime.date(2026, 1, 1))"
    )
    assert json_problem([decimal.Decimal("1.5")]) == "$[0] is a decimal.Decimal (Decimal('1.5'))"
    assert json_problem({"k": "a\x00b"}) == (
        "$['k'] contains the character U+0000 (NUL), which PostgreSQL cannot store"
    )
