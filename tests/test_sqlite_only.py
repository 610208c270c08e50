"""A project on SQLite never imports psycopg: the PostgreSQL code loads only on PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from django.db import connection

from tests.conftest import ROOT

SCRIPT = textwrap.dedent(
    """
    import importlib, pkgutil, sys

    import django
    django.setup()
    from django.core.management import call_command

    import django_openworkflow
    postgres_only = {"django_openworkflow.store.postgres"}
    # a settings module of the bench's workers, read only with its environment variables
    bench_worker = {"django_openworkflow.loadtest.worker_settings"}
    for module in pkgutil.walk_packages(django_openworkflow.__path__, "django_openworkflow."):
        if module.name not in postgres_only | bench_worker:
            importlib.import_module(module.name)
    call_command("check")

    from django_openworkflow.models import WorkflowRun
    from django_openworkflow.testing import drain
    from tests.testapp.workflows import three_steps

    run = three_steps.start({"i": 1})
    drain()
    run = WorkflowRun.objects.get(pk=run.pk)
    assert run.status == "completed", run.status
    loaded = sorted(name for name in sys.modules if "psycopg" in name)
    print("psycopg modules:", loaded)
    """
)


@pytest.mark.skipif(connection.vendor != "sqlite", reason="a SQLite project")
@pytest.mark.django_db(transaction=True)
def test_a_sqlite_project_never_imports_psycopg():
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DATABASE_URL", "OPENWORKFLOW_PG_TEST_NAME")
    }
    env.update(
        DJANGO_SETTINGS_MODULE="tests.settings",
        OPENWORKFLOW_TEST_DB=str(connection.settings_dict["NAME"]),
        PYTHONPATH=str(ROOT),
    )
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "psycopg modules: []"
