"""Resume, Resume with changes and Rerun in a real browser: Playwright driving Debian's
Chromium against a live server.

A worker runs in-process on the test database. The screenshots of the run page
and of the Workers page are saved under ``test-artifacts/``.
"""

import os
import shutil
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.contrib.auth.models import Permission
from django.db import connection, connections

from django_openworkflow import WorkflowFailed
from django_openworkflow.clock import Now
from django_openworkflow.models import StepAttempt, WorkflowRun, WorkflowWorker
from django_openworkflow.worker import Worker
from tests.testapp.models import SideEffect
from tests.testapp.workflows import reserve_then_charge, three_steps, waits_for_file

pytestmark = pytest.mark.django_db(transaction=True)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def browser():
    if not os.path.exists(CHROMIUM):
        message = "Chromium is missing: `make test` installs Debian's chromium package"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    # Playwright's sync API runs an event loop in this thread; the ORM calls the
    # test makes around it are still plain synchronous calls.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    from playwright.sync_api import sync_playwright

    try:
        with sync_playwright() as playwright:
            chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            yield chromium
            chromium.close()
            # ORM calls made while Playwright's loop runs got their own connection.
            connections.close_all()
    finally:
        os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)


@pytest.fixture
def worker(request):
    # A short lease (a heartbeat every second) when a test asks for one: its busy slots show.
    lease = getattr(request, "param", None)
    worker = Worker(concurrency=2, poll_interval=0.1, lease_seconds=lease)

    def run():
        try:
            worker.run()
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    yield worker
    worker.stop()
    thread.join(10)
    assert not thread.is_alive()


@pytest.fixture
def operator(django_user_model):
    user = django_user_model.objects.create_user("operator", password="s3cret!pw", is_staff=True)
    user.user_permissions.add(
        Permission.objects.get(
            content_type__app_label="django_openworkflow", codename="change_workflowrun"
        )
    )
    return user


def test_resume_a_failed_run_from_its_page(live_server, browser, worker, operator):
    run = reserve_then_charge.start({"failures": 1})
    with pytest.raises(WorkflowFailed):
        run.result(timeout=20)

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    run_url = f"{live_server.url}{run.get_absolute_url()}"
    page.goto(f"{live_server.url}/admin/login/?next={run.get_absolute_url()}")
    page.fill("#id_username", "operator")
    page.fill("#id_password", "s3cret!pw")
    page.click("input[type=submit]")
    page.wait_for_url(run_url)
    assert page.inner_text("h1 .owf-status") == "failed"
    assert "card declined" in page.inner_text("body")

    questions = []

    def confirm(dialog):
        questions.append(dialog.message)
        dialog.accept()

    page.on("dialog", confirm)
    page.click("button.owf-button-resume")
    assert questions == [
        "Resume this run? Completed steps keep their results; the failed step runs again."
    ]
    # The page refreshes itself while the run is active, until the worker finishes it.
    page.wait_for_selector("h1 .owf-status-completed", timeout=20_000)
    assert "After resume 1" in page.inner_text("body")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"run-page-{connection.vendor}.png", full_page=True)

    run.refresh_from_db()
    assert (run.status, run.output, run.resume_generation) == ("completed", "charged", 1)
    assert SideEffect.objects.filter(run_id=run.pk, step="reserve").count() == 1
    [event] = run.events.all()
    assert (event.action, event.by) == ("resume", operator)
    assert WorkflowRun.objects.get(pk=run.pk).status == "completed"


def test_dismissing_the_confirmation_changes_nothing(live_server, browser, operator):
    run = WorkflowRun.objects.create(
        workflow_name="reserve-then-charge",
        status="failed",
        error={"type": "RuntimeError", "message": "card declined"},
    )
    page = browser.new_page()
    page.goto(f"{live_server.url}/admin/login/?next={run.get_absolute_url()}")
    page.fill("#id_username", "operator")
    page.fill("#id_password", "s3cret!pw")
    page.click("input[type=submit]")
    page.wait_for_url(f"{live_server.url}{run.get_absolute_url()}")
    page.on("dialog", lambda dialog: dialog.dismiss())
    page.click("button.owf-button-resume")
    page.wait_for_timeout(300)
    run.refresh_from_db()
    assert run.status == "failed"
    assert not run.events.exists()


def login(page, live_server, next_url: str) -> None:
    page.goto(f"{live_server.url}/admin/login/?next={next_url}")
    page.fill("#id_username", "operator")
    page.fill("#id_password", "s3cret!pw")
    page.click("input[type=submit]")
    page.wait_for_url(f"{live_server.url}{next_url}")


def wait_until(condition, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "not reached in time"
        time.sleep(0.05)


@pytest.mark.parametrize("worker", [3.0], indirect=True)
def test_the_workers_page_and_the_worker_holding_a_run(
    live_server, browser, worker, operator, tmp_path
):
    # Two workers gone in the last day, beside the live one.
    WorkflowWorker.objects.register(
        "web-2:3121:9f3c2a1b",
        namespace="default",
        host="web-2",
        pid=3121,
        concurrency=8,
        queues=["emails"],
        workflows=["echo"],
    )
    WorkflowWorker.objects.filter(pk="web-2:3121:9f3c2a1b").update(
        last_seen_at=Now() - timedelta(minutes=42)
    )
    WorkflowWorker.objects.register(
        "web-3:977:4d2e8b70", namespace="default", host="web-3", pid=977, concurrency=4,
        workflows=["echo"],
    )  # fmt: skip
    WorkflowWorker.objects.stopped("web-3:977:4d2e8b70")

    flag = tmp_path / "go"
    run = waits_for_file.start({"path": str(flag)})
    wait_until(lambda: StepAttempt.objects.filter(workflow_run=run, step_name="block").exists())
    wait_until(lambda: WorkflowWorker.objects.get(pk=worker.worker_id).busy_slots == 1)

    page = browser.new_page(viewport={"width": 1280, "height": 700})
    login(page, live_server, "/workflows/workers/")
    live_row = page.locator(f"tr.owf-worker-row.owf-worker-live >> text={worker.worker_id}")
    assert live_row.count() == 1
    assert page.locator("tr.owf-worker-live .owf-slots").inner_text() == "1 / 2"
    assert page.locator("tr.owf-worker-dead .owf-worker-state").inner_text() == "dead"
    assert page.locator("tr.owf-worker-stopped .owf-worker-state").inner_text() == "stopped"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"workers-page-{connection.vendor}.png", full_page=True)

    page.goto(f"{live_server.url}{run.get_absolute_url()}")
    holder = page.locator("dd.owf-holder")
    assert holder.inner_text() == f"{worker.worker_id} live"
    page.screenshot(path=ARTIFACTS / f"run-page-worker-{connection.vendor}.png", full_page=True)
    holder.locator("a").click()  # to the worker's row on the Workers page
    page.wait_for_url("**/workflows/workers/#worker-*")

    flag.touch()
    assert run.result(timeout=20) == 3


@pytest.fixture
def corrector(operator):
    """The operator, who may also resume runs with changes (correct_workflowrun)."""
    operator.user_permissions.add(
        Permission.objects.get(
            content_type__app_label="django_openworkflow", codename="correct_workflowrun"
        )
    )
    return operator


def test_resume_with_changes_from_the_run_page(live_server, browser, worker, corrector):
    run = reserve_then_charge.start({"failures": 1})
    with pytest.raises(WorkflowFailed):
        run.result(timeout=20)

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    login(page, live_server, run.get_absolute_url())
    page.click("a.owf-button-correct")
    page.wait_for_url(f"**{run.get_absolute_url()}resume-with-changes/")
    assert "RuntimeError: card declined" in page.inner_text("fieldset.owf-step-output")
    page.fill("#id_input", '{\n  "failures": 1,\n  "note": "paid by phone"\n}')
    page.check("#id_step-0-use")
    page.fill("#id_step-0-output", '{"receipt": "phone-0042"}')
    page.click("button[name=preview]")

    diffs = page.locator("pre.owf-diff")
    assert diffs.count() == 2
    assert page.locator(".owf-diff-add").all_inner_texts() == [
        '+  "failures": 1,',
        '+  "note": "paid by phone"',
        "+{",
        '+  "receipt": "phone-0042"',
        "+}",
    ]
    assert page.locator(".owf-diff-del").all_inner_texts() == [
        '-  "failures": 1',
        "-RuntimeError: card declined",
    ]
    run.refresh_from_db()
    assert (run.status, run.input) == ("failed", {"failures": 1})  # nothing changed yet
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"run-page-correct-{connection.vendor}.png", full_page=True)

    page.click("button[name=confirm]")
    page.wait_for_url(f"{live_server.url}{run.get_absolute_url()}")
    page.wait_for_selector("h1 .owf-status-completed", timeout=20_000)
    [note] = page.locator(".owf-attempt-note").all_inner_texts()
    assert note.startswith("output given by operator at ")
    page.screenshot(path=ARTIFACTS / f"run-page-corrected-{connection.vendor}.png", full_page=True)

    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", {"receipt": "phone-0042"})
    assert run.input == {"failures": 1, "note": "paid by phone"}
    assert SideEffect.objects.filter(run_id=run.pk, step="charge").count() == 1
    [event] = run.events.all()
    assert (event.action, event.by) == ("resume", corrector)


def test_rerun_from_a_step_on_the_run_page(live_server, browser, worker, operator):
    run = three_steps.start({"i": 1})
    assert run.result(timeout=20) == {"total": 3}

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    login(page, live_server, run.get_absolute_url())
    questions = []

    def confirm(dialog):
        questions.append(dialog.message)
        dialog.accept()

    page.on("dialog", confirm)
    page.select_option("#owf-from-step", "s1")
    page.click("button.owf-button-rerun")
    page.wait_for_selector(".owf-message-success")
    assert page.inner_text(".owf-message-success") == f'Run {run.pk} rerun from step "s1".'
    assert questions == [
        "Rerun this run? The chosen step and every step after it run again; the steps before "
        "it keep their results."
    ]
    page.wait_for_selector("h1 .owf-status-completed", timeout=20_000)
    assert "After rerun 1" in page.inner_text("body")
    assert page.locator("tr.owf-attempt.owf-attempt-superseded").count() == 2
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"run-page-rerun-{connection.vendor}.png", full_page=True)

    run.refresh_from_db()
    assert (run.status, run.output, run.resume_generation) == ("completed", {"total": 3}, 1)
    ran = SideEffect.objects.filter(run_id=run.pk)
    assert [ran.filter(step=f"s{i}").count() for i in range(3)] == [1, 2, 2]
