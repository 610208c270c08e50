import pytest
from django.core import checks
from django.test import override_settings

from django_openworkflow.checks import (
    check_pages_included,
    check_settings,
    check_sqlite_transaction_mode,
)


def ids(messages):
    return [(m.id, m.msg) for m in messages]


def test_default_settings_pass():
    with override_settings(OPENWORKFLOW={}):
        assert check_settings() == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ([], [("django_openworkflow.E001", "OPENWORKFLOW must be a dict, not list.")]),
        (
            {"LEASE": 10},
            [("django_openworkflow.E002", "OPENWORKFLOW has an unknown key 'LEASE'.")],
        ),
        (
            {"LEASE_SECONDS": 0},
            [
                (
                    "django_openworkflow.E003",
                    "OPENWORKFLOW['LEASE_SECONDS'] must be a positive number, not 0.",
                )
            ],
        ),
        (
            {"CONCURRENCY": 2.5},
            [
                (
                    "django_openworkflow.E004",
                    "OPENWORKFLOW['CONCURRENCY'] must be an integer, not 2.5.",
                )
            ],
        ),
        (
            {"LEASE_SECONDS": 10, "HEARTBEAT_SECONDS": 10},
            [
                (
                    "django_openworkflow.E005",
                    "OPENWORKFLOW['HEARTBEAT_SECONDS'] must be a positive number below "
                    "LEASE_SECONDS, not 10.",
                )
            ],
        ),
        (
            {"NAMESPACE": ""},
            [
                (
                    "django_openworkflow.E006",
                    "OPENWORKFLOW['NAMESPACE'] must be a non-empty string, not ''.",
                )
            ],
        ),
    ],
)
def test_bad_settings_are_reported(value, expected):
    with override_settings(OPENWORKFLOW=value):
        assert ids(check_settings()) == expected


def test_every_error_has_a_hint():
    with override_settings(OPENWORKFLOW={"LEASE": 1, "POLL_INTERVAL": -1}):
        assert all(m.hint for m in check_settings())


def test_sqlite_without_immediate_transactions_is_warned_about(settings):
    from django.db import connections

    connection = connections["default"]
    if connection.vendor != "sqlite":
        assert check_sqlite_transaction_mode(databases=["default"]) == []
        return
    assert check_sqlite_transaction_mode(databases=["default"]) == []
    options = connection.settings_dict["OPTIONS"]
    saved = dict(options)
    try:
        options.pop("transaction_mode")
        [warning] = check_sqlite_transaction_mode(databases=["default"])
    finally:
        options.clear()
        options.update(saved)
    assert warning.id == "django_openworkflow.W001"
    assert warning.level == checks.WARNING
    assert 'OPTIONS": {"transaction_mode": "IMMEDIATE"}' in warning.hint


def test_two_functions_with_one_workflow_name_are_reported():
    from django_openworkflow import workflow
    from django_openworkflow.checks import check_workflows
    from django_openworkflow.registry import _duplicates, _registry

    def first(ctx):
        return 1

    def second(ctx):
        return 2

    try:
        workflow(name="twice")(first)
        workflow(name="twice")(second)
        assert ids(check_workflows()) == [
            (
                "django_openworkflow.E007",
                "Workflow name 'twice' is registered twice: by "
                "tests.test_checks.test_two_functions_with_one_workflow_name_are_reported."
                "<locals>.first and by "
                "tests.test_checks.test_two_functions_with_one_workflow_name_are_reported."
                "<locals>.second.",
            )
        ]
    finally:
        _registry.pop("twice", None)
        _duplicates.clear()
    assert check_workflows() == []


def test_a_non_callable_registration_is_reported():
    from django_openworkflow.checks import check_workflows
    from django_openworkflow.registry import Workflow, _registry, register

    wf = Workflow(lambda ctx: None, name="broken")
    wf.fn = "not a function"
    register(wf)
    try:
        assert ids(check_workflows()) == [
            (
                "django_openworkflow.E008",
                "Workflow 'broken' is registered with 'not a function', which is not callable.",
            )
        ]
    finally:
        _registry.pop("broken", None)


@pytest.mark.parametrize("value", [-1, 1.5, "1MB", True])
def test_a_bad_payload_limit_is_reported(value):
    with override_settings(OPENWORKFLOW={"MAX_PAYLOAD_BYTES": value}):
        assert [m.id for m in check_settings()] == ["django_openworkflow.E009"]


def test_the_run_pages_in_the_urlconf_pass():
    assert check_pages_included() == []


@override_settings(ROOT_URLCONF="tests.urls_admin_only")
def test_a_urlconf_without_the_run_pages_is_a_warning():
    [warning] = check_pages_included()
    assert (warning.id, warning.msg) == (
        "django_openworkflow.W002",
        "The run pages are not in the URLconf: the namespace 'django_openworkflow' is not "
        "registered.",
    )
    assert warning.hint == (
        'Add path("workflows/", include("django_openworkflow.urls")) to your urls.py '
        "(from django.urls import include, path). Without it the admin works, but its run "
        "pages and its Resume and Cancel buttons do not. Silence django_openworkflow.W002 if "
        "you want the admin only."
    )
    assert warning in checks.run_checks(tags=[checks.Tags.urls])
