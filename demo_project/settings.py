"""Settings of the demo project.

Everything that differs between machines comes from the environment (read
with django-environ):

- ``DATABASE_URL``: unset, a SQLite file next to this module
  (``demo_project/db.sqlite3``); e.g. ``postgres://postgres@127.0.0.1:5432/demo``
  to run the demo on PostgreSQL.
- ``DEBUG`` (default ``True``), ``SECRET_KEY`` (a development key),
  ``ALLOWED_HOSTS`` (comma-separated, default the local addresses).
"""

from __future__ import annotations

from pathlib import Path

import django
import environ

BASE_DIR = Path(__file__).resolve().parent

env = environ.Env()

DEBUG = env.bool("DEBUG", default=True)
SECRET_KEY = env.str(
    "SECRET_KEY", default="django-insecure-demo-only-do-not-use-in-production-openworkflow"
)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_openworkflow",
    "demo_project.orders",
]
if django.VERSION < (6, 0):
    INSTALLED_APPS.append("django_tasks")  # Django's task framework, backported to 5.2

# Django's task framework, run as durable workflow runs: every @task's enqueue() starts a
# run that `manage.py runworker` executes (orders/tasks.py sends the order confirmation).
TASKS = {"default": {"BACKEND": "django_openworkflow.tasks.WorkflowTaskBackend"}}
# The demo prints its emails on the worker's console.
EMAIL_BACKEND = env.str("EMAIL_BACKEND", default="django.core.mail.backends.console.EmailBackend")

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "demo_project.urls"
WSGI_APPLICATION = "demo_project.wsgi.application"

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

DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # SQLite has no row locks: every transaction takes the write lock first
    # (django_openworkflow's system check W001 asks for it), waits up to 20 s
    # for it, and WAL lets the pages read while a worker writes.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
            "init_command": "PRAGMA journal_mode=WAL;",
        }
    )

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LOGIN_URL = "admin:login"

OPENWORKFLOW = {
    "CONCURRENCY": 4,
    "POLL_INTERVAL": 0.5,
    "QUEUES": {
        "default": {},
        # The charge-card runs: two charges at once across all workers, one per card.
        "payments": {"concurrency": 2, "key_concurrency": 1},
    },
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        # ``runworker -v 2`` lowers django_openworkflow to DEBUG.
        "django_openworkflow": {"handlers": ["console"], "level": "INFO", "propagate": False},
        "demo_project": {"handlers": ["console"], "level": "INFO", "propagate": False},
    },
}
