from contextlib import contextmanager
from io import StringIO

import pytest
from django.conf import settings
from django.core import checks
from django.core.management import call_command
from django.db import connections
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


@contextmanager
def without_immediate_transactions():
    """The default (SQLite) database's settings without ``transaction_mode``, for a while."""
    options = connections["default"].settings_dict["OPTIONS"]
    saved = dict(options)
    options.pop("transaction_mode")
    try:
        yield
    finally:
        options.clear()
        options.update(saved)


# A plain run_checks() (no databases named) lets Django 6's model checks ask every
# database what it supports (JSONField): these tests may touch all of them.
ALL_DATABASES = pytest.mark.django_db(databases="__all__")


on_sqlite = pytest.mark.skipif(connections["default"].vendor != "sqlite", reason="a SQLite setting")


def test_sqlite_without_immediate_transactions_is_warned_about():
    assert check_sqlite_transaction_mode(databases=["default"]) == []
    if connections["default"].vendor != "sqlite":
        return
    with without_immediate_transactions():
        [warning] = check_sqlite_transaction_mode(databases=["default"])
    assert warning.id == "django_openworkflow.W001"
    assert warning.level == checks.WARNING
    assert warning.msg == "SQLite database 'default' does not use IMMEDIATE transactions."
    assert warning.hint == (
        "SQLite has no row locks, so workers and resume need the write lock from the start of "
        'each transaction: give the SQLite database "OPTIONS": {"transaction_mode": '
        '"IMMEDIATE", "timeout": 20} (IMMEDIATE takes the write lock when a transaction '
        "begins; timeout is how many seconds a connection waits for that lock)."
    )


@on_sqlite
@ALL_DATABASES
def test_a_plain_check_reports_sqlite_without_immediate_transactions():
    # manage.py check and runserver run the checks without naming databases.
    assert "django_openworkflow.W001" not in [m.id for m in checks.run_checks()]
    with without_immediate_transactions():
        assert "django_openworkflow.W001" in [m.id for m in checks.run_checks()]


@on_sqlite
@pytest.mark.django_db(transaction=True, databases="__all__")
def test_runworker_prints_the_sqlite_warning_at_start():
    err = StringIO()
    with without_immediate_transactions():
        call_command("runworker", "--burst", skip_checks=False, stderr=err, verbosity=0)
    assert "?: (django_openworkflow.W001) SQLite database 'default' does not use IMMEDIATE" in (
        err.getvalue()
    )


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


@pytest.mark.postgres
@pytest.mark.parametrize("level", ["REPEATABLE_READ", "SERIALIZABLE", "READ_COMMITTED", None])
def test_a_postgresql_isolation_level_other_than_read_committed_is_an_error(level):
    import psycopg

    from django_openworkflow.checks import check_postgresql_isolation_level

    options = connections["default"].settings_dict.setdefault("OPTIONS", {})
    saved = dict(options)
    if level is not None:
        options["isolation_level"] = getattr(psycopg.IsolationLevel, level)
    try:
        found = ids(check_postgresql_isolation_level())
    finally:
        options.clear()
        options.update(saved)
    if level in (None, "READ_COMMITTED"):
        assert found == []
    else:
        assert found == [
            (
                "django_openworkflow.E011",
                f"PostgreSQL database 'default' uses the isolation level {level}; "
                "django-openworkflow needs READ COMMITTED.",
            )
        ]


@pytest.mark.skipif(connections["default"].vendor != "mysql", reason="a MySQL/MariaDB setting")
@pytest.mark.parametrize(
    ("level", "shown"),
    [
        ("repeatable read", "REPEATABLE READ"),
        ("serializable", "SERIALIZABLE"),
        ("read uncommitted", "READ UNCOMMITTED"),
        (None, "of the server (None)"),
        ("read committed", None),
        ("READ COMMITTED", None),
        ("absent", None),
    ],
)
def test_a_mysql_isolation_level_other_than_read_committed_is_an_error(level, shown):
    from django_openworkflow.checks import check_mysql_isolation_level

    options = connections["default"].settings_dict.setdefault("OPTIONS", {})
    saved = dict(options)
    options.pop("isolation_level", None)
    if level != "absent":
        options["isolation_level"] = level
    try:
        found = ids(check_mysql_isolation_level())
    finally:
        options.clear()
        options.update(saved)
    if shown is None:
        assert found == []
    else:
        assert found == [
            (
                "django_openworkflow.E011",
                f"MySQL/MariaDB database 'default' uses the isolation level {shown}; "
                "django-openworkflow needs READ COMMITTED.",
            )
        ]


@pytest.mark.parametrize("value", ["", "nowhere", None, 1])
def test_a_database_that_is_not_an_alias_is_reported(value):
    from django_openworkflow.checks import check_database, check_database_routing

    with override_settings(OPENWORKFLOW={"DATABASE": value}):
        [error] = check_database()
        assert check_database_routing() == []  # E012 says it
    assert (error.id, error.msg) == (
        "django_openworkflow.E012",
        f"OPENWORKFLOW['DATABASE'] must name a database of DATABASES, not {value!r}.",
    )
    aliases = ", ".join(map(repr, sorted(settings.DATABASES)))  # 'default', 'workflows', ...
    assert error.hint == (
        f"The alias where the engine's tables live; the aliases of DATABASES: {aliases}. "
        "The default is 'default'."
    )


def test_an_existing_database_alias_passes():
    from django_openworkflow.checks import check_database

    assert check_database() == []
    with override_settings(OPENWORKFLOW={"DATABASE": "workflows"}):
        assert check_database() == []


ROUTER = "django_openworkflow.routers.WorkflowRouter"


@pytest.mark.parametrize(
    ("database", "routers", "elsewhere"),
    [
        ("workflows", [], "reads to 'default' and writes to 'default'"),
        ("default", [ROUTER], None),
        ("workflows", [ROUTER], None),
        ("default", ["tests.test_checks.ReadsElsewhere"], "reads to 'workflows'"),
    ],
)
@ALL_DATABASES
def test_routers_that_disagree_with_the_database_setting_are_reported(database, routers, elsewhere):
    from django_openworkflow.checks import check_database_routing

    with override_settings(OPENWORKFLOW={"DATABASE": database}, DATABASE_ROUTERS=routers):
        found = check_database_routing()
        assert [m.id for m in checks.run_checks()].count("django_openworkflow.E013") == len(found)
    if elsewhere is None:
        assert found == []
        return
    [error] = found
    assert (error.id, error.msg) == (
        "django_openworkflow.E013",
        f"The database routers send the django_openworkflow models' {elsewhere}, but "
        f"OPENWORKFLOW['DATABASE'] is {database!r}.",
    )
    assert error.hint == (
        "Add 'django_openworkflow.routers.WorkflowRouter' to DATABASE_ROUTERS (before routers "
        "that would claim the app's models): it routes them to OPENWORKFLOW['DATABASE']. The "
        "engine always uses that alias; the admin, the run pages and WorkflowRun.objects use "
        "the routers."
    )


class ReadsElsewhere:
    """A project's router that reads everything from a replica."""

    def db_for_read(self, model, **hints):
        return "workflows"


def test_the_isolation_level_check_looks_at_the_engine_database():
    from django_openworkflow.checks import engine_alias

    assert engine_alias() == "default"
    with override_settings(OPENWORKFLOW={"DATABASE": "workflows"}):
        assert engine_alias() == "workflows"
    with override_settings(OPENWORKFLOW={"DATABASE": "nowhere"}):
        assert engine_alias() == "default"  # E012 reports it; E011 does not crash


@pytest.mark.postgres
def test_the_isolation_level_of_the_engine_database_is_checked():
    import psycopg

    from django_openworkflow.checks import check_postgresql_isolation_level

    options = connections["workflows"].settings_dict.setdefault("OPTIONS", {})
    saved = dict(options)
    options["isolation_level"] = psycopg.IsolationLevel.REPEATABLE_READ
    try:
        assert check_postgresql_isolation_level() == []  # "default" is fine
        with override_settings(OPENWORKFLOW={"DATABASE": "workflows"}):
            found = ids(check_postgresql_isolation_level())
    finally:
        options.clear()
        options.update(saved)
    assert found == [
        (
            "django_openworkflow.E011",
            "PostgreSQL database 'workflows' uses the isolation level REPEATABLE_READ; "
            "django-openworkflow needs READ COMMITTED.",
        )
    ]


# --- behind a pooler: POOLER, PREPARED_STATEMENTS, LISTEN_DATABASE ------------------


@pytest.mark.parametrize("key", ["POOLER", "PREPARED_STATEMENTS"])
@pytest.mark.parametrize("value", [None, True, False])
def test_pooler_and_prepared_statements_may_be_true_false_or_none(key, value):
    from django_openworkflow.checks import check_pooler_settings

    with override_settings(OPENWORKFLOW={key: value}):
        assert check_pooler_settings() == []


@pytest.mark.parametrize("key", ["POOLER", "PREPARED_STATEMENTS"])
@pytest.mark.parametrize("value", ["auto", 1, 0])
def test_pooler_and_prepared_statements_of_another_kind_are_reported(key, value):
    from django_openworkflow.checks import check_pooler_settings

    with override_settings(OPENWORKFLOW={key: value}):
        [error] = check_pooler_settings()
    assert (error.id, error.msg) == (
        "django_openworkflow.E019",
        f"OPENWORKFLOW[{key!r}] must be True, False or None, not {value!r}.",
    )
    assert error.hint


@pytest.mark.parametrize("value", ["nowhere", 5])
def test_a_listen_database_that_is_not_an_alias_is_reported(value):
    from django_openworkflow.checks import check_pooler_settings

    with override_settings(OPENWORKFLOW={"LISTEN_DATABASE": value}):
        [error] = check_pooler_settings()
    assert (error.id, error.msg) == (
        "django_openworkflow.E020",
        f"OPENWORKFLOW['LISTEN_DATABASE'] is {value!r}: it must name a database of DATABASES.",
    )
    assert "reaches OPENWORKFLOW['DATABASE']'s PostgreSQL database directly" in error.hint


def test_a_listen_database_must_be_postgresql():
    from django_openworkflow.checks import check_pooler_settings

    with override_settings(OPENWORKFLOW={"LISTEN_DATABASE": "default"}):
        found = ids(check_pooler_settings())
    engine = connections["default"].settings_dict["ENGINE"]
    if connections["default"].vendor == "postgresql":
        assert found == []
    else:
        assert found == [
            (
                "django_openworkflow.E020",
                "OPENWORKFLOW['LISTEN_DATABASE'] is 'default': it must name a PostgreSQL "
                f"database, not a {engine} one.",
            )
        ]


@ALL_DATABASES
def test_the_pooler_checks_run_with_the_others():
    with override_settings(OPENWORKFLOW={"POOLER": "yes", "LISTEN_DATABASE": "nowhere"}):
        found = [m.id for m in checks.run_checks() if m.id.startswith("django_openworkflow.")]
    assert found == ["django_openworkflow.E019", "django_openworkflow.E020"]
