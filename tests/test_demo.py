"""Smoke test of demo_project: the one test allowed to touch the demo.

The suite's settings do not install the demo's app, so everything runs in
subprocesses with ``DJANGO_SETTINGS_MODULE=demo_project.settings`` against
a throwaway SQLite file: migrate, seed (twice: it is idempotent), work the
queue (the charges run in the "payments" queue, keyed by card; the good
orders then wait for the warehouse), check the pages and
confirm one order packed, fix the declined card, resume its run, confirm the
rest, work again. A second test runs the demo's own test suite.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Works the queue until no run is due within a minute. A burst worker exits
# as soon as nothing is due, and runs waiting for a charge retry (1 s, then
# 2 s) are not due yet, so it is started again until they are done. Runs
# waiting for the warehouse (1 h timeout) or for their child (no timer) stay.
DRAIN = """
import time
from datetime import timedelta
from django.core.management import call_command
from django.utils import timezone
from django_openworkflow.models import WorkflowRun

def busy():
    soon = timezone.now() + timedelta(minutes=1)
    return WorkflowRun.objects.active().filter(available_at__lte=soon).exists()

deadline = time.monotonic() + 20
while busy():
    if time.monotonic() > deadline:
        raise SystemExit("runs still due after 20 s")
    call_command("runworker", burst=True, verbosity=0)
    time.sleep(0.2)
"""

STATE = """
import json
from collections import Counter
from django.contrib.auth import get_user_model
from django_openworkflow.models import WorkflowRun
from demo_project.orders.models import Card, Order, Product

cards = {f"card-{card.token}": card.last4 for card in Card.objects.all()}
orders = {}
for order in Order.objects.all():
    run = WorkflowRun.objects.get(pk=order.run_id)
    orders[order.reference] = {
        "status": order.status,
        "tracking_number": order.tracking_number,
        "packed_by": order.packed_by,
        "run_id": str(run.pk),
        "run_status": run.status,
        "run_error": (run.error or {}).get("message"),
        "run_events": list(run.events.values_list("action", flat=True)),
    }
print(json.dumps({
    "orders": orders,
    "runs": Counter(
        f"{name} {status}"
        for name, status in WorkflowRun.objects.values_list("workflow_name", "status")
    ),
    "charges": Counter(
        f"{queue} {cards[key]}"
        for queue, key in WorkflowRun.objects.filter(workflow_name="charge-card")
        .values_list("queue", "concurrency_key")
    ),
    "users": get_user_model().objects.count(),
    "cards": {c.last4: c.declined for c in Card.objects.all()},
    "stock": {p.name: p.stock for p in Product.objects.all()},
}))
"""

PAGES = """
import json
from django.contrib.auth import get_user_model
from django.test import Client
from django.test.utils import setup_test_environment
from demo_project.orders.models import Card, Order, Product

setup_test_environment()
anonymous = Client().get("/")
client = Client()
client.force_login(get_user_model().objects.get(username="admin"))
listing = client.get("/")
failed = Order.objects.get(reference="demo-order-3")
run_page = client.get(failed.get_run_url())
order_admin = client.get(failed.get_admin_url())
first = Order.objects.get(reference="demo-order-1")
confirmed = client.post(f"/orders/{first.pk}/confirm-packed/", follow=True)
confirmed_again = client.post(f"/orders/{first.pk}/confirm-packed/", follow=True)
confirm_failed = client.post(f"/orders/{failed.pk}/confirm-packed/", follow=True)
get_confirm = client.get(f"/orders/{first.pk}/confirm-packed/")
declined = Card.objects.get(last4="0002")
fixed = client.post(f"/cards/{declined.pk}/fix/", follow=True)
get_fix = client.get(f"/cards/{declined.pk}/fix/")
bad_order = client.post("/orders/", {"product": "", "quantity": 0})
placed = client.post("/orders/", {
    "product": Product.objects.get(name="Ceramic mug").pk,
    "quantity": 2,
    "card": Card.objects.get(last4="4242").pk,
}, follow=True)
print(json.dumps({
    "anonymous": [anonymous.status_code, anonymous.headers.get("Location")],
    "listing": [listing.status_code, listing.content.decode()],
    "fixed": [fixed.status_code, fixed.redirect_chain, fixed.content.decode()],
    "run_page": [run_page.status_code, run_page.content.decode()],
    "order_admin": [order_admin.status_code, order_admin.content.decode()],
    "order_pks": {o.reference: o.pk for o in Order.objects.all()},
    "confirmed": [confirmed.status_code, confirmed.redirect_chain, confirmed.content.decode()],
    "confirmed_again": confirmed_again.content.decode(),
    "confirm_failed": confirm_failed.content.decode(),
    "get_confirm": get_confirm.status_code,
    "get_fix": get_fix.status_code,
    "bad_order": bad_order.status_code,
    "placed": [placed.status_code, placed.redirect_chain, placed.content.decode()],
}))
"""


@pytest.fixture
def manage(tmp_path):
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("OPENWORKFLOW_", "DJANGO_"))
    }
    env["DJANGO_SETTINGS_MODULE"] = "demo_project.settings"
    env["DATABASE_URL"] = f"sqlite:///{tmp_path / 'demo.sqlite3'}"
    env["DEBUG"] = "False"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, f"manage.py {args[0]} failed:\n{done.stdout}\n{done.stderr}"
        return done

    return run


Manage = Callable[..., subprocess.CompletedProcess[str]]


def shell(manage: Manage, code: str) -> str:
    return manage("shell", "--no-imports", "-c", textwrap.dedent(code)).stdout


def state(manage: Manage) -> dict:
    return json.loads(shell(manage, STATE))


def test_demo_end_to_end(manage):
    manage("migrate", "--verbosity", "0")
    seeded = manage("demo_seed").stdout
    assert "Created superuser: username admin, password admin" in seeded
    assert "Stock report of " in seeded  # last night's tick, backfilled
    again = manage("demo_seed").stdout
    assert "Created" not in again
    assert "Stock report" not in again
    assert "Order demo-order-3 exists" in again

    before = state(manage)
    assert before["users"] == 1
    assert before["runs"] == {"process-order pending": 3, "stock-report pending": 1}
    assert before["cards"] == {"4242": False, "0002": True}
    assert {o["run_status"] for o in before["orders"].values()} == {"pending"}

    shell(manage, DRAIN)
    after = state(manage)
    orders = after["orders"]
    for reference in ("demo-order-1", "demo-order-2"):
        # Paid; the parent is parked on its fulfil-order child, which waits for the warehouse.
        assert orders[reference]["status"] == "awaiting_warehouse"
        assert orders[reference]["run_status"] == "pending"
        assert orders[reference]["tracking_number"] == ""
    failed = orders["demo-order-3"]
    assert failed["status"] == "payment_failed"
    assert failed["run_status"] == "failed"
    # The charge is a child run in the "payments" queue; its failure fails the parent's step.
    assert re.sub(r"[0-9a-f-]{36}", "<id>", failed["run_error"]) == (
        'step "charge-card" failed after 1 attempt: ChildWorkflowFailed: '
        'child run <id> (charge-card) failed: StepFailed: step "charge" failed after 3 attempts: '
        "CardDeclined: card ending 0002 (Charles Babbage) was declined"
    )
    assert after["runs"] == {
        "process-order pending": 2,
        "process-order failed": 1,
        "charge-card completed": 2,
        "charge-card failed": 1,
        "fulfil-order pending": 2,
        "stock-report completed": 1,
        "django-task completed": 2,  # the paid orders' confirmation emails (orders/tasks.py)
    }
    assert after["charges"] == {"payments 4242": 2, "payments 0002": 1}  # queue, key's card
    assert after["stock"] == {"Ceramic mug": 24, "Espresso beans, 1 kg": 38, "Pour-over kettle": 4}

    pages = json.loads(shell(manage, PAGES))
    pks = pages["order_pks"]
    assert pages["anonymous"] == [302, "/admin/login/?next=/"]
    status, html = pages["listing"]
    assert status == 200
    assert "demo-order-3" in html
    assert f'href="/workflows/{failed["run_id"]}/"' in html
    assert "card ending 0002 (Charles Babbage) was declined" in html
    assert 'action="/cards/' in html
    assert "csrfmiddlewaretoken" in html
    assert html.count("Confirm packed</button>") == 2
    assert f'action="/orders/{pks["demo-order-1"]}/confirm-packed/"' in html
    assert f'action="/orders/{pks["demo-order-3"]}/confirm-packed/"' not in html
    status, html = pages["run_page"]
    assert status == 200
    assert "card ending 0002 (Charles Babbage) was declined" in html
    status, html = pages["order_admin"]
    assert status == 200
    # The order is its run's subject: its admin page lists the run (WorkflowRunInline).
    assert f'<a href="/workflows/{failed["run_id"]}/" class="owf-run-link">' in html
    assert '<td class="field-status">failed</td>' in html
    status, html = pages["run_page"]
    assert (
        f'<a href="/admin/orders/order/{pks["demo-order-3"]}/change/" class="owf-subject">' in html
    )
    status, chain, html = pages["confirmed"]
    assert (status, chain) == (200, [["/", 302]])
    assert "Order demo-order-1 confirmed packed: 1 run woken" in html
    assert "Order demo-order-1 is not waiting for the warehouse" in pages["confirmed_again"]
    assert "Order demo-order-3 is not waiting for the warehouse" in pages["confirm_failed"]
    assert pages["get_confirm"] == 405
    status, chain, html = pages["fixed"]
    assert (status, chain) == (200, [["/", 302]])
    assert "Card Charles Babbage •••• 0002 fixed." in html
    assert pages["get_fix"] == 405
    assert pages["bad_order"] == 400
    status, chain, html = pages["placed"]
    assert (status, chain) == (200, [["/", 302]])
    assert "placed; a worker will process it." in html

    shell(
        manage,
        f"""
        from django_openworkflow.models import WorkflowRun
        WorkflowRun.objects.resume("{failed["run_id"]}")
        """,
    )
    shell(manage, DRAIN)
    middle = state(manage)
    statuses = {ref: o["status"] for ref, o in middle["orders"].items()}
    # demo-order-1 was confirmed on the page; the resumed and the new order now wait too.
    assert statuses.pop("demo-order-1") == "shipped"
    assert middle["orders"]["demo-order-1"]["packed_by"] == "admin"
    assert set(statuses.values()) == {"awaiting_warehouse"}
    assert len(statuses) == 3

    woken = shell(
        manage,
        """
        import json
        from django_openworkflow import send_signal
        from demo_project.orders.models import Order
        woken = {
            order.reference: send_signal(f"warehouse-confirmed:{order.pk}", {"by": "shell"})
            for order in Order.objects.filter(status="awaiting_warehouse")
        }
        print(json.dumps({ref: len(runs) for ref, runs in woken.items()}))
        """,
    )
    assert json.loads(woken) == dict.fromkeys(statuses, 1)
    shell(manage, DRAIN)
    final = state(manage)
    assert final["cards"] == {"4242": False, "0002": False}
    resumed = final["orders"]["demo-order-3"]
    assert resumed["status"] == "shipped"
    assert resumed["run_status"] == "completed"
    assert resumed["run_error"] is None
    assert resumed["run_events"] == ["resume"]
    assert resumed["packed_by"] == "shell"
    # The resume started a new charge-card run; the failed one stays as history.
    assert final["runs"] == {
        "process-order completed": 4,
        "charge-card completed": 4,
        "charge-card failed": 1,
        "fulfil-order completed": 4,
        "stock-report completed": 1,
        "django-task completed": 4,  # one confirmation email per paid order, never two
    }
    assert [o["status"] for o in final["orders"].values()] == ["shipped"] * 4
    assert all(o["tracking_number"].startswith("TRK") for o in final["orders"].values())
    # The resume did not reserve the kettle twice; the new order took 2 mugs.
    assert final["stock"] == {"Ceramic mug": 22, "Espresso beans, 1 kg": 38, "Pour-over kettle": 4}


def test_demo_own_test_suite(manage):
    """``manage.py test demo_project.orders``: the demo's tests are examples for users."""
    done = manage("test", "demo_project.orders", "--noinput")
    assert "Ran 9 tests" in done.stderr
    assert "\nOK\n" in done.stderr
