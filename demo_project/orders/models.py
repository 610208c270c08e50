"""The demo shop: products with stock, payment cards, and orders processed by a workflow."""

from __future__ import annotations

import uuid
from typing import Any

from django.db import models, transaction
from django.urls import reverse


class Product(models.Model):
    name = models.CharField(max_length=100, unique=True)
    stock = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


TOKEN_PREFIX = "tok_"


class Card(models.Model):
    """A fake payment card. Whether it is declined lives here, so every process sees it."""

    holder = models.CharField(max_length=100)
    last4 = models.CharField("last 4 digits", max_length=4, unique=True)
    declined = models.BooleanField(
        default=False, help_text="While set, every charge to this card is declined."
    )

    class Meta:
        ordering = ["holder", "last4"]

    def __str__(self) -> str:
        return f"{self.holder} •••• {self.last4}"

    @property
    def token(self) -> str:
        """What the (fake) payment provider knows the card by: ``tok_<last 4 digits>``."""
        return f"{TOKEN_PREFIX}{self.last4}"

    @classmethod
    def for_token(cls, token: str) -> Card | None:
        if not token.startswith(TOKEN_PREFIX):
            return None
        return cls.objects.filter(last4=token.removeprefix(TOKEN_PREFIX)).first()


class OrderManager(models.Manager["Order"]):
    def place(
        self, *, product: Product, quantity: int, card: Card, reference: str | None = None
    ) -> Order:
        """Create an order and start its ``process-order`` run in one transaction.

        Either both exist or neither does: the run is enqueued atomically with
        the order row. The order is the run's subject: its admin page lists its runs
        (``WorkflowRunInline``), and ``ctx.subject`` is the order.
        """
        from .workflows import process_order

        reference = reference or f"order-{uuid.uuid4().hex[:12]}"
        with transaction.atomic(using=self.db):
            order = self.create(reference=reference, product=product, quantity=quantity, card=card)
            run = process_order.start(order.run_input, idempotency_key=reference, subject=order)
            order.run_id = run.pk
            order.save(update_fields=["run_id"])
        return order


class Order(models.Model):
    class Status(models.TextChoices):
        PLACED = "placed", "placed"
        RESERVED = "reserved", "stock reserved"
        PAID = "paid", "paid"
        AWAITING_WAREHOUSE = "awaiting_warehouse", "awaiting warehouse"
        SHIPPED = "shipped", "shipped"
        OUT_OF_STOCK = "out_of_stock", "out of stock"
        PAYMENT_FAILED = "payment_failed", "payment failed"
        FULFILMENT_FAILED = "fulfilment_failed", "fulfilment failed"

    reference = models.CharField(
        max_length=50,
        unique=True,
        help_text="Also the idempotency key of the order's workflow run.",
    )
    product = models.ForeignKey(Product, on_delete=models.PROTECT, related_name="orders")
    quantity = models.PositiveIntegerField(default=1)
    card = models.ForeignKey(Card, on_delete=models.PROTECT, related_name="orders")
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PLACED)
    run_id = models.UUIDField("workflow run", null=True, blank=True, editable=False)
    charge_id = models.CharField(max_length=50, blank=True)
    tracking_number = models.CharField(max_length=50, blank=True)
    packed_by = models.CharField(
        max_length=150, blank=True, help_text="Who confirmed that the warehouse packed the order."
    )
    created_at = models.DateTimeField(auto_now_add=True)

    objects = OrderManager()

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.reference}: {self.quantity} x {self.product}"

    @property
    def run_input(self) -> dict[str, Any]:
        """The input of the order's ``process-order`` run: the card to charge, by its token.

        A declined order's run can be resumed with another token ("Resume with
        changes" on the run's page): the charge then uses that card.
        """
        return {"order_id": self.pk, "card_token": self.card.token}

    @property
    def awaits_warehouse(self) -> bool:
        return self.status == self.Status.AWAITING_WAREHOUSE

    def get_run_url(self) -> str | None:
        """The django_openworkflow page of this order's run."""
        if self.run_id is None:
            return None
        return reverse("django_openworkflow:run-detail", args=[self.run_id])

    def get_admin_url(self) -> str:
        return reverse("admin:orders_order_change", args=[self.pk])
