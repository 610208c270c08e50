"""``django_openworkflow.loadtest``: only the two load-test commands import it, never the core."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Run in a fresh interpreter: this test process imported the load tests already (test_chaos.py).
IMPORT_THE_CORE = """
import importlib
import json
import pkgutil
import sys

import django

django.setup()

import django_openworkflow
from django.core.management import call_command

LOAD_TESTS = {
    "django_openworkflow.loadtest",
    "django_openworkflow.management.commands.bench_workflows",
    "django_openworkflow.management.commands.chaos_workflows",
}


def walk(package):
    # pkgutil.walk_packages would import the loadtest package to look inside it: skip it first.
    for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        if info.name in LOAD_TESTS:
            continue
        module = importlib.import_module(info.name)
        yield info.name
        if info.ispkg:
            yield from walk(module)


def loaded_load_tests():
    return sorted(name for name in sys.modules if name.startswith("django_openworkflow.loadtest"))


imported = list(walk(django_openworkflow))
call_command("check")
core = loaded_load_tests()
importlib.import_module("django_openworkflow.management.commands.chaos_workflows")
importlib.import_module("django_openworkflow.management.commands.bench_workflows")
print(json.dumps({"imported": imported, "core": core, "commands": loaded_load_tests()}))
"""


def test_the_core_never_imports_the_load_tests():
    env = {k: v for k, v in os.environ.items() if k != "OPENWORKFLOW_TEST_DB"}
    env.update(DJANGO_SETTINGS_MODULE="tests.settings", PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_THE_CORE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.splitlines()[-1])
    # the walk reached the whole core: models, engine, worker, admin, migrations, other commands
    assert {
        "django_openworkflow.admin",
        "django_openworkflow.engine",
        "django_openworkflow.worker",
        "django_openworkflow.testing",
        "django_openworkflow.views",
        "django_openworkflow.migrations.0001_initial",
        "django_openworkflow.management.commands.runworker",
        "django_openworkflow.management.commands.check_workflow_runs",
    } <= set(found["imported"])
    assert not [name for name in found["imported"] if "loadtest" in name]
    assert found["core"] == []
    # ...and the check would see it: the two load-test commands import the package.
    assert found["commands"] == [
        "django_openworkflow.loadtest",
        "django_openworkflow.loadtest.bench",
        "django_openworkflow.loadtest.chaos",
    ]
