"""Settings for the test suite.

``DATABASE_URL`` picks the database: unset, a SQLite file; ``make test`` runs
the suite once on SQLite, once on PostgreSQL
(``postgres://postgres@127.0.0.1:5432/test``) and once on MariaDB
(``mysql://root@127.0.0.1:3306/test``). Worker subprocesses started by tests
use the same settings with ``OPENWORKFLOW_TEST_DB`` naming the test database
the test runner created.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

import django
import environ

BASE_DIR = Path(__file__).resolve().parent
env = environ.Env()

SECRET_KEY = "tests-only-not-secret"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
ALLOWED_HOSTS = ["*"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_openworkflow",
    "tests.testapp",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]

if django.VERSION < (6, 0):
    INSTALLED_APPS.append("django_tasks")  # django.tasks' backport (the extra [tasks])

# Django's task framework on durable runs (tests/test_tasks.py).
TASKS = {
    "default": {"BACKEND": "django_openworkflow.tasks.WorkflowTaskBackend", "QUEUES": []},
    "retrying": {
        "BACKEND": "django_openworkflow.tasks.WorkflowTaskBackend",
        "QUEUES": [],
        "OPTIONS": {"retry_policy": {"maximum_attempts": 3, "initial_interval": "1s"}},
    },
}

ROOT_URLCONF = "tests.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

# One file per test process, so parallel test runs never share a SQLite database.
_sqlite_file = os.environ.get(
    "OPENWORKFLOW_SQLITE", f"{tempfile.gettempdir()}/openworkflow-tests-{os.getpid()}.sqlite3"
)
DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{_sqlite_file}")}
_db = DATABASES["default"]
if _db["ENGINE"] == "django.db.backends.sqlite3":
    _db["OPTIONS"] = {"transaction_mode": "IMMEDIATE", "timeout": 30}
    _db["TEST"] = {"NAME": _sqlite_file.replace(".sqlite3", "-test.sqlite3")}
elif _db["ENGINE"] == "django.db.backends.mysql":
    _db["OPTIONS"] = {
        "charset": "utf8mb4",  # 4-byte characters (emoji) in names and JSON
        "isolation_level": "read committed",  # Django's default for MySQL, stated: check E011
        # Now() is the session's CURRENT_TIMESTAMP; Django writes datetimes in UTC.
        "init_command": "SET time_zone = '+00:00'",
    }
    # A case- and accent-insensitive collation, as most MySQL databases have: names and
    # keys must still compare exactly (their columns carry a binary collation).
    _db["TEST"] = {"CHARSET": "utf8mb4", "COLLATION": "utf8mb4_unicode_ci"}
    if os.environ.get("OPENWORKFLOW_MYSQL_TEST_NAME"):
        # Several checkouts testing at once on one server: a test database each.
        _db["TEST"]["NAME"] = os.environ["OPENWORKFLOW_MYSQL_TEST_NAME"]
elif os.environ.get("OPENWORKFLOW_PG_TEST_NAME"):
    # Several checkouts testing at once on one PostgreSQL server: a test database each.
    _db["TEST"] = {"NAME": os.environ["OPENWORKFLOW_PG_TEST_NAME"]}


def _second_database(db: dict) -> dict:
    """The default database's settings for another database on the same server (or file)."""
    second = copy.deepcopy(db)
    if db["ENGINE"] == "django.db.backends.sqlite3":
        second["NAME"] = db["NAME"].replace(".sqlite3", "-workflows.sqlite3")
        second["TEST"] = {"NAME": db["TEST"]["NAME"].replace(".sqlite3", "-workflows.sqlite3")}
    else:
        test_name = (db.get("TEST") or {}).get("NAME") or f"test_{db['NAME']}"
        second["NAME"] = f"{db['NAME']}_workflows"
        second["TEST"] = {**(db.get("TEST") or {}), "NAME": f"{test_name}_workflows"}
    return second


# OPENWORKFLOW["DATABASE"] = "workflows" (tests/test_database_alias.py). pytest-django creates
# only the databases the collected tests ask for: the others never touch this one.
DATABASES["workflows"] = _second_database(_db)
# tests/test_partitions.py (PostgreSQL): the test database through a partition proxy, whose
# port the test sets; a mirror, so no database is created for it.
if _db["ENGINE"] == "django.db.backends.postgresql":
    DATABASES["partitioned"] = {**copy.deepcopy(_db), "TEST": {"MIRROR": "default"}}
if os.environ.get("OPENWORKFLOW_TEST_DB"):
    # A worker subprocess: talk to the database the test runner created.
    _db["NAME"] = os.environ["OPENWORKFLOW_TEST_DB"]

STATIC_URL = "/static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

OPENWORKFLOW = {
    "POLL_INTERVAL": 0.2,
}
if os.environ.get("OPENWORKFLOW_TEST_QUEUES"):
    # A worker subprocess of tests/test_queue_workers.py: OPENWORKFLOW["QUEUES"] as JSON, the
    # same queues the test runner set with override_settings.
    OPENWORKFLOW["QUEUES"] = json.loads(os.environ["OPENWORKFLOW_TEST_QUEUES"])

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django_openworkflow": {"handlers": ["console"], "level": "WARNING"}},
}

if os.environ.get("OPENWORKFLOW_TEST_CLOCK_SKEW"):
    # A worker subprocess with a wrong clock: Django's now() is off by this many seconds.
    import datetime as _datetime

    import django.utils.timezone as _timezone

    _skew = _datetime.timedelta(seconds=float(os.environ["OPENWORKFLOW_TEST_CLOCK_SKEW"]))
    _real_now = _timezone.now
    _timezone.now = lambda: _real_now() + _skew
