"""``runworker --reload``: a real file edit in a temporary app restarts the worker.

Each test writes an app (``reloadapp``) and a settings module that adds it to
``tests.settings`` into a temporary directory, starts ``runworker --reload``
on it, edits ``reloadapp/workflows.py`` and watches the new process run the
new code. The edit is made only once Django's ``StatReloader`` has recorded
the file's first modification time (its DEBUG line "first seen"), so the
change cannot slip in before the watch began.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from django_openworkflow.models import StepAttempt, WorkflowRun, WorkflowWorker
from django_openworkflow.registry import Workflow

pytestmark = pytest.mark.django_db(transaction=True)

SETTINGS = """
from tests.settings import *  # noqa: F403

INSTALLED_APPS = [*INSTALLED_APPS, "reloadapp"]  # noqa: F405
# Django's reloader says when it first saw each file: the test edits only after that.
LOGGING["loggers"]["django.utils.autoreload"] = {  # noqa: F405
    "handlers": ["console"],
    "level": "DEBUG",
}
"""

BUGGY = """
from django_openworkflow import RetryPolicy, workflow

ONCE = RetryPolicy(maximum_attempts=1)


@workflow(name="reload-total")
def total(ctx):
    return ctx.step.run("add", lambda: {"total": sum(ctx.input) / 0}, retry_policy=ONCE)
"""

FIXED = BUGGY.replace("sum(ctx.input) / 0", "sum(ctx.input)")

# A step that runs until a flag file exists (written by no one): a reload must not wait for it.
SLOW = """
import time
from pathlib import Path

from django_openworkflow import RetryPolicy, workflow

HERE = Path(__file__).parent


@workflow(name="reload-slow")
def slow(ctx):
    def work():
        (HERE / "started").touch()
        end = time.monotonic() + 120
        while not (HERE / "never").exists() and time.monotonic() < end:
            time.sleep(0.05)
        return "old code"

    policy = RetryPolicy(initial_interval="10ms", maximum_attempts=3)
    return ctx.step.run("work", work, retry_policy=policy)
"""

QUICK = """
from django_openworkflow import RetryPolicy, workflow


@workflow(name="reload-slow")
def slow(ctx):
    policy = RetryPolicy(initial_interval="10ms", maximum_attempts=3)
    return ctx.step.run("work", lambda: "new code", retry_policy=policy)
"""


def write_project(root: Path, workflows: str) -> Path:
    app = root / "reloadapp"
    app.mkdir()
    (app / "__init__.py").write_text("")
    (app / "workflows.py").write_text(workflows)
    (root / "reload_settings.py").write_text(SETTINGS)
    return app / "workflows.py"


def edit(path: Path, text: str) -> None:
    """Rewrite ``path`` with a modification time the reloader cannot miss."""
    path.write_text(text)
    later = time.time() + 2
    os.utime(path, (later, later))


def start_reloading_worker(worker_process, root: Path, *args: str):
    proc = worker_process(
        "--settings",
        "reload_settings",
        "--pythonpath",
        str(root),
        "--reload",
        "--poll-interval",
        "0.1",
        *args,
        env={"PYTHONDONTWRITEBYTECODE": "1"},
    )
    proc.wait_for(f"File {root / 'reloadapp' / 'workflows.py'} first seen", timeout=30)
    return proc


def worker_ids(output: str) -> list[str]:
    return re.findall(r"worker started worker=(\S+)", output)


def wait_for_status(run: WorkflowRun, status: str, timeout: float = 30.0) -> WorkflowRun:
    end = time.monotonic() + timeout
    run.refresh_from_db()
    while run.status != status:
        assert time.monotonic() < end, f"run {run.pk} is {run.status}, not {status}"
        time.sleep(0.05)
        run.refresh_from_db()
    return run


def wait_for_restarts(proc, count: int, timeout: float = 30.0) -> list[str]:
    """Until the reloader has started ``count`` children; their worker ids."""
    end = time.monotonic() + timeout
    while len(ids := worker_ids(proc.output())) < count:
        assert time.monotonic() < end, f"{count} workers not started:\n{proc.output()[-3000:]}"
        time.sleep(0.05)
    return ids


def alive(pid: int) -> bool:
    """The process exists and is no zombie (one whose parent has not reaped it yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def test_an_edited_workflow_runs_its_new_code_after_a_resume(worker_process, tmp_path):
    workflows = write_project(tmp_path, BUGGY)
    run = Workflow(lambda ctx: None, name="reload-total").start([1, 2, 3])
    proc = start_reloading_worker(worker_process, tmp_path)
    run = wait_for_status(run, WorkflowRun.Status.FAILED)
    assert (run.error["type"], run.error["step"]) == ("StepFailed", "add")

    edit(workflows, FIXED)
    first, second = wait_for_restarts(proc, 2)
    assert f"file changed, reloading worker={first} path={workflows}" in proc.output()
    WorkflowRun.objects.resume(run)
    run = wait_for_status(run, WorkflowRun.Status.COMPLETED)

    assert run.output == {"total": 6}
    attempts = StepAttempt.objects.filter(workflow_run=run).order_by("id")
    assert [(a.step_name, a.resume_generation, a.status) for a in attempts] == [
        ("add", 0, "failed"),
        ("add", 1, "completed"),
    ]
    # tests.settings has DEBUG = False: the parent warned once.
    assert proc.output().count("runworker --reload with DEBUG=False") == 1

    # SIGTERM to the reloader stops the worker child too, cleanly, and waits for it.
    child = int(second.split(":")[1])
    assert alive(child)
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0
    assert not alive(child)
    assert f"worker stopped worker={second} runs=" in proc.output()


def test_a_run_still_in_flight_at_a_reload_is_released_after_the_grace(worker_process, tmp_path):
    workflows = write_project(tmp_path, SLOW)
    run = Workflow(lambda ctx: None, name="reload-slow").start()
    proc = start_reloading_worker(worker_process, tmp_path, "--reload-grace", "0.5")
    end = time.monotonic() + 30
    while not (tmp_path / "reloadapp" / "started").exists():
        assert time.monotonic() < end, "the slow step did not start"
        time.sleep(0.05)

    edit(workflows, QUICK)
    first, _ = wait_for_restarts(proc, 2)
    run = wait_for_status(run, WorkflowRun.Status.COMPLETED)

    assert run.output == "new code"
    assert (
        f"runs released for the reload, the new process replays them worker={first} runs=1 "
        "grace=0.5s"
    ) in proc.output()
    attempts = StepAttempt.objects.filter(workflow_run=run).order_by("id")
    assert [(a.status, (a.error or {}).get("type"), a.output) for a in attempts] == [
        ("failed", "WorkerLost", None),
        ("completed", None, "new code"),
    ]
    # The old process exited without its worker stopping: it marked its row stopped itself.
    assert WorkflowWorker.objects.with_state().get(pk=first).state == "stopped"
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0


def test_a_sigterm_during_a_reloads_grace_stops_the_reloader_cleanly(worker_process, tmp_path):
    workflows = write_project(tmp_path, SLOW)
    Workflow(lambda ctx: None, name="reload-slow").start()
    proc = start_reloading_worker(worker_process, tmp_path, "--reload-grace", "3")
    end = time.monotonic() + 30
    while not (tmp_path / "reloadapp" / "started").exists():
        assert time.monotonic() < end, "the slow step did not start"
        time.sleep(0.05)
    edit(workflows, QUICK)
    proc.wait_for("file changed, reloading", timeout=30)
    proc.signal(signal.SIGTERM)  # while the slow run has its grace: the child exits for the reload
    assert proc.wait() == 0
    assert "runs released for the reload" in proc.output()
    assert proc.output().count("worker started") == 1  # no new child


def test_a_file_that_fails_to_import_waits_for_its_fix(worker_process, tmp_path):
    """The new process dies on the broken file; the reloader waits for the next change."""
    workflows = write_project(tmp_path, FIXED)
    proc = start_reloading_worker(worker_process, tmp_path)
    edit(workflows, FIXED + "\ndef broken(:\n")
    proc.wait_for("worker process failed, waiting for a file change code=1", timeout=30)
    # The reloader (the parent) saw the file when it began to watch: only then the fix.
    first_seen = f"File {workflows} first seen"
    end = time.monotonic() + 30
    while proc.output().count(first_seen) < 2:
        assert time.monotonic() < end, proc.output()[-3000:]
        time.sleep(0.05)
    assert "SyntaxError" in proc.output()

    edit(workflows, FIXED)
    wait_for_restarts(proc, 2)
    run = Workflow(lambda ctx: None, name="reload-total").start([1, 2])
    assert wait_for_status(run, WorkflowRun.Status.COMPLETED).output == {"total": 3}
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0


def test_a_sigkilled_reloader_leaves_no_worker_behind(worker_process, tmp_path):
    write_project(tmp_path, BUGGY)
    proc = start_reloading_worker(worker_process, tmp_path)
    [worker_id] = wait_for_restarts(proc, 1)
    child = int(worker_id.split(":")[1])

    proc.signal(signal.SIGKILL)
    proc.wait()
    end = time.monotonic() + 30
    while alive(child):  # no longer our child: reaped by init once it exits
        assert time.monotonic() < end, "the worker outlived its reloader"
        time.sleep(0.05)
    assert f"reloader stopping or gone, stopping worker={worker_id}" in proc.output()


def test_reload_and_burst_cannot_be_combined():
    with pytest.raises(CommandError) as raised:
        call_command("runworker", "--reload", "--burst")
    assert str(raised.value) == "--reload and --burst cannot be combined"
