"""System checks: bad settings are reported with an id and a hint, never asserted."""

from __future__ import annotations

import uuid
from typing import Any

from django.conf import settings
from django.core.checks import Error, Tags, Warning, register
from django.db import DatabaseError, connections

from .conf import DEFAULTS
from .queues import check_queue, queue_problems
from .retention import retention_problems


@register()
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    errors: list[Any] = []
    user = getattr(settings, "OPENWORKFLOW", None)
    if user is None:
        return errors
    if not isinstance(user, dict):
        return [
            Error(
                f"OPENWORKFLOW must be a dict, not {type(user).__name__}.",
                hint="Set OPENWORKFLOW = {...} in settings.py, or remove it to use the defaults.",
                id="django_openworkflow.E001",
            )
        ]
    for key in sorted(set(user) - set(DEFAULTS)):
        errors.append(
            Error(
                f"OPENWORKFLOW has an unknown key {key!r}.",
                hint=f"Known keys: {', '.join(sorted(DEFAULTS))}.",
                id="django_openworkflow.E002",
            )
        )
    positive = {"LEASE_SECONDS", "POLL_INTERVAL", "CONCURRENCY", "PAGE_LOCK_TIMEOUT"}
    for key in sorted(positive & set(user)):
        value = user[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            errors.append(
                Error(
                    f"OPENWORKFLOW[{key!r}] must be a positive number, not {value!r}.",
                    hint=f"The default is {DEFAULTS[key]!r}.",
                    id="django_openworkflow.E003",
                )
            )
    if "CONCURRENCY" in user and not isinstance(user["CONCURRENCY"], int):
        errors.append(
            Error(
                f"OPENWORKFLOW['CONCURRENCY'] must be an integer, not {user['CONCURRENCY']!r}.",
                hint="The number of runs one runworker process executes at once, e.g. 10.",
                id="django_openworkflow.E004",
            )
        )
    heartbeat = user.get("HEARTBEAT_SECONDS")
    lease = user.get("LEASE_SECONDS", DEFAULTS["LEASE_SECONDS"])
    if heartbeat is not None and (
        isinstance(heartbeat, bool)
        or not isinstance(heartbeat, (int, float))
        or heartbeat <= 0
        or (isinstance(lease, (int, float)) and heartbeat >= lease)
    ):
        errors.append(
            Error(
                f"OPENWORKFLOW['HEARTBEAT_SECONDS'] must be a positive number below "
                f"LEASE_SECONDS, not {heartbeat!r}.",
                hint="Leave it unset to renew leases every third of the lease.",
                id="django_openworkflow.E005",
            )
        )
    limit = user.get("MAX_PAYLOAD_BYTES", 0)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        errors.append(
            Error(
                f"OPENWORKFLOW['MAX_PAYLOAD_BYTES'] must be a whole number of bytes (0 for no "
                f"limit), not {limit!r}.",
                hint=f"The default is {DEFAULTS['MAX_PAYLOAD_BYTES']:,} (1 MiB).",
                id="django_openworkflow.E009",
            )
        )
    if "NAMESPACE" in user and (not isinstance(user["NAMESPACE"], str) or not user["NAMESPACE"]):
        errors.append(
            Error(
                f"OPENWORKFLOW['NAMESPACE'] must be a non-empty string, not {user['NAMESPACE']!r}.",
                hint="The default is 'default'.",
                id="django_openworkflow.E006",
            )
        )
    if "QUEUES" in user:
        for problem in queue_problems(user["QUEUES"]):
            errors.append(
                Error(
                    f"OPENWORKFLOW['QUEUES']: {problem}.",
                    hint='For example {"default": {}, "emails": {"concurrency": 5, '
                    '"rate_limit": "100/m"}, "billing": {"key_concurrency": 1}}.',
                    id="django_openworkflow.E010",
                )
            )
    for problem in retention_problems(user.get("RETENTION")):
        errors.append(
            Error(
                f"OPENWORKFLOW['RETENTION']: {problem}.",
                hint='For example {"completed": "30d", "canceled": "30d", "failed": "90d"}: '
                "how long finished runs are kept after they finish, per status (a duration "
                'such as "30d" or "12h", a timedelta or seconds). None keeps every run.',
                id="django_openworkflow.E014",
            )
        )
    if "TRACING" in user and not isinstance(user["TRACING"], bool):
        errors.append(
            Error(
                f"OPENWORKFLOW['TRACING'] must be True or False, not {user['TRACING']!r}.",
                hint="True (the default) makes OpenTelemetry spans when opentelemetry-api is "
                "installed and a tracer provider is configured; False turns tracing off.",
                id="django_openworkflow.E017",
            )
        )
    for key in LIVENESS_KEYS:
        value = user.get(key)
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not 0 < value < float("inf")
        ):
            errors.append(
                Error(
                    f"OPENWORKFLOW[{key!r}] must be a positive number of seconds or None, "
                    f"not {value!r}.",
                    hint=f"The default is {DEFAULTS[key]!r}; None turns it off. See "
                    "'Connection liveness' in the operations docs.",
                    id="django_openworkflow.E021",
                )
            )
    return errors


# The worker's connection liveness settings (liveness.py): each seconds, or None.
LIVENESS_KEYS = ("CONNECT_TIMEOUT", "TCP_KEEPALIVE", "TCP_USER_TIMEOUT", "STATEMENT_TIMEOUT")


# Shown by W001 and by the worker's log when SQLite answers "database is locked".
SQLITE_LOCKED_HINT = (
    'give the SQLite database "OPTIONS": {"transaction_mode": "IMMEDIATE", "timeout": 20} '
    "(IMMEDIATE takes the write lock when a transaction begins; timeout is how many seconds "
    "a connection waits for that lock)"
)


@register()
def check_sqlite_transaction_mode(
    app_configs: Any = None, databases: Any = None, **kwargs: Any
) -> list[Any]:
    """W001. Not a "database" check: it reads settings only (no query), so a plain
    ``check``, ``runserver`` and ``runworker`` report it, not only ``migrate``."""
    warnings: list[Any] = []
    for alias in databases or connections:
        connection = connections[alias]
        if connection.vendor != "sqlite":
            continue
        mode = (connection.settings_dict.get("OPTIONS") or {}).get("transaction_mode")
        if str(mode).upper() != "IMMEDIATE":
            warnings.append(
                Warning(
                    f"SQLite database {alias!r} does not use IMMEDIATE transactions.",
                    hint=(
                        f"SQLite has no row locks, so workers and resume need the write lock "
                        f"from the start of each transaction: {SQLITE_LOCKED_HINT}."
                    ),
                    id="django_openworkflow.W001",
                )
            )
    return warnings


def engine_alias() -> str:
    """``OPENWORKFLOW["DATABASE"]``, or "default" while it names no database (E001, E012)."""
    user = getattr(settings, "OPENWORKFLOW", None)
    alias = user.get("DATABASE", "default") if isinstance(user, dict) else "default"
    return alias if isinstance(alias, str) and alias in settings.DATABASES else "default"


@register()
def check_postgresql_isolation_level(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    """E011. The engine re-reads after each lock it takes (a child's status, waiting signal
    steps, an idempotency key's earlier run): that needs READ COMMITTED, where each
    statement sees what committed before it; REPEATABLE READ reads an older snapshot."""
    alias = engine_alias()
    connection = connections[alias]
    if connection.vendor != "postgresql":
        return []
    import psycopg

    level = (connection.settings_dict.get("OPTIONS") or {}).get("isolation_level")
    if level is None or int(level) == psycopg.IsolationLevel.READ_COMMITTED:
        return []
    name = getattr(level, "name", str(level))
    return [
        Error(
            f"PostgreSQL database {alias!r} uses the isolation level {name}; "
            "django-openworkflow needs READ COMMITTED.",
            hint=(
                "Remove OPTIONS['isolation_level'] (PostgreSQL's default is READ COMMITTED) or "
                "give the engine a database alias of its own (OPENWORKFLOW's tables, routed "
                "with a database router). Under a stricter level, two start()s with one "
                "idempotency key can both insert a run."
            ),
            id="django_openworkflow.E011",
        )
    ]


ROUTER = "django_openworkflow.routers.WorkflowRouter"


@register()
def check_database(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    """E012. ``OPENWORKFLOW["DATABASE"]`` names an alias of ``DATABASES``."""
    user = getattr(settings, "OPENWORKFLOW", None)
    if not isinstance(user, dict) or "DATABASE" not in user:
        return []
    alias = user["DATABASE"]
    if isinstance(alias, str) and alias in settings.DATABASES:
        return []
    return [
        Error(
            f"OPENWORKFLOW['DATABASE'] must name a database of DATABASES, not {alias!r}.",
            hint=(
                f"The alias where the engine's tables live; the aliases of DATABASES: "
                f"{', '.join(sorted(map(repr, settings.DATABASES)))}. The default is 'default'."
            ),
            id="django_openworkflow.E012",
        )
    ]


@register()
def check_database_routing(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    """E013. The engine uses ``OPENWORKFLOW["DATABASE"]``; the admin, the pages and the
    managers use the database routers: they must send the app's models to the same alias."""
    from django.db import router

    from .models import WorkflowRun

    if not isinstance(getattr(settings, "OPENWORKFLOW", None) or {}, dict) or check_database():
        return []  # E001 or E012 said it
    alias = engine_alias()
    routed = {"reads": router.db_for_read(WorkflowRun), "writes": router.db_for_write(WorkflowRun)}
    wrong = {what: db for what, db in routed.items() if db != alias}
    if not wrong:
        return []
    elsewhere = " and ".join(f"{what} to {db!r}" for what, db in wrong.items())
    return [
        Error(
            f"The database routers send the django_openworkflow models' {elsewhere}, but "
            f"OPENWORKFLOW['DATABASE'] is {alias!r}.",
            hint=(
                f"Add {ROUTER!r} to DATABASE_ROUTERS (before routers that would claim the app's "
                f"models): it routes them to OPENWORKFLOW['DATABASE']. The engine always uses "
                f"that alias; the admin, the run pages and WorkflowRun.objects use the routers."
            ),
            id="django_openworkflow.E013",
        )
    ]


@register()
def check_mysql_isolation_level(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    """E011 for MySQL and MariaDB, for the same reason: under REPEATABLE READ (the server's
    default, which Django replaces with READ COMMITTED unless OPTIONS say otherwise) a
    start() that waited for an idempotency key's lock reads a snapshot taken before it."""
    alias = engine_alias()
    connection = connections[alias]
    options = connection.settings_dict.get("OPTIONS") or {}
    if connection.vendor != "mysql" or "isolation_level" not in options:
        return []  # Django's default for MySQL is READ COMMITTED
    level = options["isolation_level"]
    if isinstance(level, str) and level.lower() == "read committed":
        return []
    name = level.upper() if isinstance(level, str) else "of the server (None)"
    return [
        Error(
            f"MySQL/MariaDB database {alias!r} uses the isolation level {name}; "
            "django-openworkflow needs READ COMMITTED.",
            hint=(
                "Remove OPTIONS['isolation_level'] (Django's default for MySQL is 'read "
                "committed') or set it to 'read committed', or give the engine a database "
                "alias of its own. Under a stricter level, two start()s with one idempotency "
                "key can both insert a run."
            ),
            id="django_openworkflow.E011",
        )
    ]


@register()
def check_workflows(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    from .registry import (
        duplicate_registrations,
        qualified_name,
        registered_workflows,
        schedule_clashes,
    )

    errors: list[Any] = []
    for previous, later in duplicate_registrations():
        errors.append(
            Error(
                f"Workflow name {later.name!r} is registered twice: by "
                f"{qualified_name(previous.fn)} and by {qualified_name(later.fn)}.",
                hint="Runs find their code by name: give one of them another @workflow(name=...).",
                id="django_openworkflow.E007",
            )
        )
    for wf in registered_workflows():
        if not callable(wf.fn):
            errors.append(
                Error(
                    f"Workflow {wf.name!r} is registered with {wf.fn!r}, which is not callable.",
                    hint="Register functions with @workflow; a run calls the function with ctx.",
                    id="django_openworkflow.E008",
                )
            )
    for wf in registered_workflows():
        if wf.schedules:
            names = ", ".join(str(declared.name) for declared in wf.schedules)
            errors.extend(unqueued_schedules(wf, f"its schedules ({names}) start no run"))
    for name, owners in schedule_clashes():
        errors.append(
            Error(
                f"Schedule name {name!r} is declared by {len(owners)} workflows: "
                f"{', '.join(owners)}.",
                hint="A schedule is found by its name: give one of them Schedule(cron, name=...).",
                id="django_openworkflow.E015",
            )
        )
    return errors


def unqueued_schedules(workflow: Any, consequence: str) -> list[Any]:
    """W004 when the queue of a scheduled workflow is not in ``QUEUES``: its ticks fail."""
    try:
        check_queue(workflow.queue, f' of workflow "{workflow.name}"')
    except ValueError as exc:
        return [
            Warning(
                f"{exc}: {consequence}.",
                hint="Add the queue to OPENWORKFLOW['QUEUES'], or give the workflow a "
                "configured queue.",
                id="django_openworkflow.W004",
            )
        ]
    return []


@register(Tags.database)
def check_stored_schedules(
    app_configs: Any = None, databases: Any = None, **kwargs: Any
) -> list[Any]:
    """E016 and W003: schedules stored in the database (added in the admin, or by hand).

    A "database" check: ``manage.py check --database default`` and ``migrate``
    run it.
    """
    from .conf import app_settings
    from .cron import check_cron, check_timezone
    from .models import WorkflowSchedule
    from .registry import get_workflow

    alias = engine_alias()
    if alias not in (databases or []):
        return []
    try:
        stored = list(
            WorkflowSchedule.objects.using(alias)
            .filter(namespace=app_settings.NAMESPACE)
            .values_list("name", "cron", "timezone", "workflow_name", "enabled")
        )
    except DatabaseError:  # not migrated yet
        return []
    errors: list[Any] = []
    for name, cron, zone, workflow_name, enabled in stored:
        of = f' of schedule "{name}"'
        for checker, value in ((check_cron, cron), (check_timezone, zone)):
            try:
                checker(value, of)
            except (TypeError, ValueError) as exc:
                errors.append(
                    Error(
                        f"{exc}.",
                        hint="Correct it on the schedule's admin page: the schedule does not "
                        "start runs until then.",
                        id="django_openworkflow.E016",
                    )
                )
        workflow = get_workflow(workflow_name)
        if enabled and workflow is not None and not workflow.schedules:  # (else W004 said it)
            errors.extend(unqueued_schedules(workflow, f"schedule {name!r} starts no run"))
        if enabled and workflow is None:
            errors.append(
                Warning(
                    f"Schedule {name!r} starts workflow {workflow_name!r}, which no @workflow "
                    "registers in this project.",
                    hint="Workers fire only the schedules of the workflows they know; pause or "
                    "delete the schedule, or register the workflow.",
                    id="django_openworkflow.W003",
                )
            )
    return errors


@register(Tags.urls)
def check_pages_included(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    from .views import run_page_url

    if run_page_url(uuid.UUID(int=0)) is not None:
        return []
    return [
        Warning(
            "The run pages are not in the URLconf: the namespace 'django_openworkflow' "
            "is not registered.",
            hint=(
                'Add path("workflows/", include("django_openworkflow.urls")) to your urls.py '
                "(from django.urls import include, path). Without it the admin works, but "
                "its run pages and its Resume and Cancel buttons do not. Silence "
                "django_openworkflow.W002 if you want the admin only."
            ),
            id="django_openworkflow.W002",
        )
    ]


@register()
def check_pooler_settings(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    """E019: ``POOLER`` and ``PREPARED_STATEMENTS`` are True, False or None. E020:
    ``LISTEN_DATABASE`` is None or the alias of a PostgreSQL database of ``DATABASES``."""
    user = getattr(settings, "OPENWORKFLOW", None)
    if not isinstance(user, dict):
        return []
    errors: list[Any] = []
    hints = {
        "POOLER": "None (the default) lets the worker detect PgBouncer; True or False says "
        "whether OPENWORKFLOW['DATABASE'] is reached through a pooler in transaction mode.",
        "PREPARED_STATEMENTS": "None (the default) prepares the worker's statements unless "
        "the database is behind a pooler; True prepares them there too (PgBouncer 1.21+ with "
        "max_prepared_statements); False never.",
    }
    for key, hint in hints.items():
        if not (user.get(key) is None or isinstance(user[key], bool)):
            errors.append(
                Error(
                    f"OPENWORKFLOW[{key!r}] must be True, False or None, not {user[key]!r}.",
                    hint=hint,
                    id="django_openworkflow.E019",
                )
            )
    alias = user.get("LISTEN_DATABASE")
    if alias is None:
        return errors
    if not isinstance(alias, str) or alias not in settings.DATABASES:
        problem = "must name a database of DATABASES"
    elif connections[alias].vendor != "postgresql":
        engine = settings.DATABASES[alias].get("ENGINE")
        problem = f"must name a PostgreSQL database, not a {engine} one"
    else:
        return errors
    errors.append(
        Error(
            f"OPENWORKFLOW['LISTEN_DATABASE'] is {alias!r}: it {problem}.",
            hint=(
                "The alias of a database of DATABASES that reaches OPENWORKFLOW['DATABASE']'s "
                "PostgreSQL database directly, not through a pooler: the worker LISTENs there. "
                "None (the default) listens on OPENWORKFLOW['DATABASE'] unless it is behind a "
                "pooler in transaction mode; then the worker polls."
            ),
            id="django_openworkflow.E020",
        )
    )
    return errors
