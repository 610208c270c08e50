"""``manage.py demo_seed``: an admin user, products, cards and three orders. Idempotent."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.utils import timezone

from django_openworkflow.cron import latest_tick
from django_openworkflow.models import WorkflowSchedule
from django_openworkflow.schedules import default_timezone

from ...models import Card, Order, Product
from ...workflows import stock_report

PRODUCTS = [("Espresso beans, 1 kg", 40), ("Ceramic mug", 25), ("Pour-over kettle", 5)]
GOOD_CARD = {"last4": "4242", "holder": "Ada Lovelace", "declined": False}
DECLINED_CARD = {"last4": "0002", "holder": "Charles Babbage", "declined": True}


class Command(BaseCommand):
    help = (
        "Create the demo data: user admin/admin, products, a good and a declined card, and "
        "three orders (one paid with the declined card), and last night's stock report. Running "
        "it again adds nothing."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        self._admin()
        products = [
            Product.objects.get_or_create(name=name, defaults={"stock": stock})[0]
            for name, stock in PRODUCTS
        ]
        good = self._card(GOOD_CARD)
        declined = self._card(DECLINED_CARD)
        plan = [(products[0], 2, good), (products[1], 1, good), (products[2], 1, declined)]
        for n, (product, quantity, card) in enumerate(plan, start=1):
            reference = f"demo-order-{n}"
            order = Order.objects.filter(reference=reference).first()
            if order is not None:
                self.stdout.write(f"Order {reference} exists ({order.get_status_display()}).")
                continue
            # The order row and its workflow run commit together, or not at all.
            order = Order.objects.place(
                product=product, quantity=quantity, card=card, reference=reference
            )
            self.stdout.write(f"Order {reference} placed with card {card}: run {order.run_id}.")
        self._stock_report()
        self.stdout.write(
            self.style.SUCCESS(
                "Demo data ready. Start a worker (manage.py runworker) and the server "
                "(manage.py runserver), then open http://127.0.0.1:8000/: paid orders wait "
                "for the warehouse until you press Confirm packed."
            )
        )

    def _stock_report(self) -> None:
        """Declare the nightly schedule (as a worker does at its start); backfill last night."""
        WorkflowSchedule.objects.declare([stock_report])
        night = latest_tick(stock_report.schedules[0].cron, default_timezone(), timezone.now())
        if WorkflowSchedule.objects.backfill("stock-report", night, night):
            self.stdout.write(f"Stock report of {night:%Y-%m-%d %H:%M %Z} started (a backfill).")

    def _admin(self) -> None:
        User = get_user_model()
        if User.objects.filter(username="admin").exists():
            self.stdout.write("User admin exists (password unchanged).")
            return
        User.objects.create_superuser("admin", "admin@example.com", "admin")
        self.stdout.write(self.style.SUCCESS("Created superuser: username admin, password admin"))

    def _card(self, fields: dict[str, Any]) -> Card:
        card, created = Card.objects.get_or_create(
            last4=fields["last4"],
            defaults={"holder": fields["holder"], "declined": fields["declined"]},
        )
        if created:
            state = "declines every charge" if card.declined else "works"
            self.stdout.write(f"Created card {card}: it {state}.")
        return card
