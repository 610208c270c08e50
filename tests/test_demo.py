"""Smoke test of demo_project: the one test allowed to touch the demo.

The suite's settings do not install the demo's app, so everything runs in
subprocesses with ``DJANGO_SETTINGS_MODULE=demo_project.settings`` against
a throwaway SQLite file: migrate, seed (twice: it is idempotent), work the
queue, check the pages, fix the declined card, resume its run, work again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Works the queue until no run is active. A burst worker exits as soon as
# nothing is due, and sleeping runs (packing: 2 s) or runs waiting for a
# retry (1 s, then 2 s) are not due yet, so it is started again until done.
DRAIN = """
import time
from django.core.management import call_command
from django_openworkflow.models import WorkflowRun

deadline = time.monotonic() + 20
while WorkflowRun.objects.active().exists():
    if time.monotonic() > deadline:
        raise SystemExit("runs still active after 20 s")
    call_command("runworker", burst=True, verbosity=0)
    time.sleep(0.2)
"""

STATE = """
import json
from django.contrib.auth import get_user_model
from django_openworkflow.models import WorkflowRun
from demo_project.orders.models import Card, Order, Product

orders = {}
for order in Order.objects.all():
    run = WorkflowRun.objects.get(pk=order.run_id)
    orders[order.reference] = {
        "status": order.status,
        "tracking_number": order.tracking_number,
        "run_id": str(run.pk),
        "run_status": run.status,
        "run_error": (run.error or {}).get("message"),
        "run_events": list(run.events.values_list("action", flat=True)),
    }
print(json.dumps({
    "orders": orders,
    "runs": WorkflowRun.objects.count(),
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
    "order_admin": order_admin.status_code,
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

    def run(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, f"manage.py {args[0]} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    return run


def shell(manage, code: str) -> str:
    return manage("shell", "--no-imports", "-c", textwrap.dedent(code))


def state(manage) -> dict:
    return json.loads(shell(manage, STATE))


def test_demo_end_to_end(manage):
    manage("migrate", "--verbosity", "0")
    seeded = manage("demo_seed")
    assert "Created superuser: username admin, password admin" in seeded
    again = manage("demo_seed")
    assert "Created" not in again
    assert "Order demo-order-3 exists" in again

    before = state(manage)
    assert before["users"] == 1
    assert before["runs"] == 3
    assert before["cards"] == {"4242": False, "0002": True}
    assert {o["run_status"] for o in before["orders"].values()} == {"pending"}

    shell(manage, DRAIN)
    after = state(manage)
    orders = after["orders"]
    for reference in ("demo-order-1", "demo-order-2"):
        assert orders[reference]["status"] == "shipped"
        assert orders[reference]["run_status"] == "completed"
        assert orders[reference]["tracking_number"].startswith("TRK")
    failed = orders["demo-order-3"]
    assert failed["status"] == "payment_failed"
    assert failed["run_status"] == "failed"
    assert failed["run_error"] == (
        'step "charge-card" failed after 3 attempts: '
        "CardDeclined: card ending 0002 (Charles Babbage) was declined"
    )
    assert after["stock"] == {"Ceramic mug": 24, "Espresso beans, 1 kg": 38, "Pour-over kettle": 4}

    pages = json.loads(shell(manage, PAGES))
    assert pages["anonymous"] == [302, "/admin/login/?next=/"]
    status, html = pages["listing"]
    assert status == 200
    assert "demo-order-3" in html
    assert f'href="/workflows/{failed["run_id"]}/"' in html
    assert "card ending 0002 (Charles Babbage) was declined" in html
    assert 'action="/cards/' in html
    assert "csrfmiddlewaretoken" in html
    status, html = pages["run_page"]
    assert status == 200
    assert "card ending 0002 (Charles Babbage) was declined" in html
    assert pages["order_admin"] == 200
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
    final = state(manage)
    assert final["cards"] == {"4242": False, "0002": False}
    resumed = final["orders"]["demo-order-3"]
    assert resumed["status"] == "shipped"
    assert resumed["run_status"] == "completed"
    assert resumed["run_error"] is None
    assert resumed["run_events"] == ["resume"]
    assert final["runs"] == 4
    assert [o["status"] for o in final["orders"].values()] == ["shipped"] * 4
    # The resume did not reserve the kettle twice; the new order took 2 mugs.
    assert final["stock"] == {"Ceramic mug": 22, "Espresso beans, 1 kg": 38, "Pour-over kettle": 4}
