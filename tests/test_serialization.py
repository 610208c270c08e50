import datetime
import decimal

import pytest

from django_openworkflow.serialization import describe_exception, ensure_json, json_problem


@pytest.mark.parametrize(
    "value",
    [None, True, 0, -3, 1.5, "text", [], {}, [1, "a", None], {"a": {"b": [1, 2.5, False]}}],
)
def test_plain_json_values_pass(value):
    assert json_problem(value) is None


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ((1, 2), "$ is a builtins.tuple ((1, 2))"),
        ({1, 2}, "$ is a builtins.set ({1, 2})"),
        ({"a": [1, datetime.date(2026, 1, 1)]}, "$['a'][1] is a datetime.date"),
        ({"n": decimal.Decimal("1.5")}, "$['n'] is a decimal.Decimal"),
        ({1: "x"}, "$ has the key 1 of type int; JSON keys are strings"),
        (float("nan"), "$ is nan, which JSON cannot hold"),
        ([float("inf")], "$[0] is inf, which JSON cannot hold"),
        (b"bytes", "$ is a builtins.bytes"),
        ({"a": ["ok", "x\ud800"]}, "$['a'][1] contains '\\ud800', which is not valid Unicode text"),
        ({"\udfff": 1}, "$ has the key '\\udfff', which contains '\\udfff', which is not valid"),
    ],
)
def test_other_values_are_refused_with_their_path(value, problem):
    assert json_problem(value).startswith(problem)


def test_ensure_json_names_what_was_refused():
    with pytest.raises(TypeError) as info:
        ensure_json({"when": datetime.date(2026, 1, 1)}, 'input of workflow "w"')
    assert str(info.value).startswith(
        "input of workflow \"w\" is not a JSON value: $['when'] is a datetime.date"
    )


def test_describe_exception_keeps_type_message_and_traceback():
    try:
        raise ValueError("card declined")
    except ValueError as exc:
        error = describe_exception(exc)
    assert error["type"] == "ValueError"
    assert error["message"] == "card declined"
    assert "raise ValueError" in error["traceback"]


def test_describe_exception_makes_any_text_storable_and_never_raises():
    class Unprintable(Exception):
        def __str__(self):
            raise RuntimeError("no")

    error = describe_exception(Unprintable())
    assert error["message"] == "<str() of the Unprintable failed: RuntimeError>"
    assert error["type"] == "Unprintable"
    error = describe_exception(ValueError("a\x00b\ud800c"))
    assert error["message"] == "a\\x00b\\ud800c"
    assert json_problem(error) is None


def test_long_error_text_is_cut_keeping_the_start_of_a_message_and_the_end_of_a_traceback():
    from django_openworkflow.serialization import MAX_ERROR_MESSAGE, storable_text

    message = describe_exception(ValueError("x" * (MAX_ERROR_MESSAGE + 10)))["message"]
    assert message == "x" * MAX_ERROR_MESSAGE + "… [10 characters cut]"
    assert storable_text("abcdef", 2, keep_end=True) == "… [4 characters cut]ef"
