"""The ``process-order`` workflow: reserve stock, charge the card, pack, ship.

Each step is stored once it finishes, so a worker that dies mid-order
resumes at the first unfinished step, and an order whose card was declined
can be resumed (``WorkflowRun.objects.resume(order.run_id)``, or the Resume
button on the run's page) once the card is fixed: the stock is not reserved
twice.
"""

from __future__ import annotations

import logging
import uuid

from django_openworkflow import RetryPolicy, StepFailed, workflow

from .models import Card, Order, Product

logger = logging.getLogger(__name__)

NO_RETRY = RetryPolicy(maximum_attempts=1)
CHARGE_RETRY = RetryPolicy(maximum_attempts=3, initial_interval="1s")


class OutOfStock(Exception):
    """Not enough stock for the order."""


class CardDeclined(Exception):
    """The payment provider refused the charge."""


def reserve_stock(order_id: int) -> int:
    """Runs in the step's transaction: the decrement commits with the step's result."""
    order = Order.objects.get(pk=order_id)
    product = Product.objects.select_for_update().get(pk=order.product_id)
    if product.stock < order.quantity:
        raise OutOfStock(
            f"order {order.reference} needs {order.quantity} of {product.name}, "
            f"only {product.stock} in stock"
        )
    product.stock -= order.quantity
    product.save(update_fields=["stock"])
    Order.objects.filter(pk=order_id).update(status=Order.Status.RESERVED)
    return product.stock


def charge_card(order_id: int) -> str:
    """Stands in for a payment provider's API: an external call, not a database write.

    The card is read from the database on every attempt, so fixing it (the
    demo page's "Fix card" button) makes the next attempt, or a resume, succeed.
    """
    order = Order.objects.get(pk=order_id)
    card = Card.objects.get(pk=order.card_id)
    if card.declined:
        raise CardDeclined(f"card ending {card.last4} ({card.holder}) was declined")
    charge_id = f"ch_{uuid.uuid4().hex[:16]}"
    logger.info("card charged order=%s charge=%s", order.reference, charge_id)
    return charge_id


def record_charge(order_id: int, charge_id: str) -> None:
    Order.objects.filter(pk=order_id).update(status=Order.Status.PAID, charge_id=charge_id)


def ship(order_id: int) -> str:
    tracking_number = f"TRK{uuid.uuid4().hex[:10].upper()}"
    Order.objects.filter(pk=order_id).update(
        status=Order.Status.SHIPPED, tracking_number=tracking_number
    )
    return tracking_number


FAILED_STATUS = {
    "reserve-stock": Order.Status.OUT_OF_STOCK,
    "charge-card": Order.Status.PAYMENT_FAILED,
}


@workflow(name="process-order")
def process_order(ctx):
    order_id = ctx.input["order_id"]
    try:
        ctx.step.atomic("reserve-stock", lambda: reserve_stock(order_id), retry_policy=NO_RETRY)
        charge_id = ctx.step.run(
            "charge-card", lambda: charge_card(order_id), retry_policy=CHARGE_RETRY
        )
    except StepFailed as exc:
        # Not a step on purpose: it must run each time the run fails, also
        # after a resume, and writing the same status twice is harmless.
        Order.objects.filter(pk=order_id).update(status=FAILED_STATUS[exc.step_name])
        raise  # uncaught, StepFailed fails the run; it can be resumed later
    ctx.step.atomic("record-charge", lambda: record_charge(order_id, charge_id))
    ctx.step.sleep("packing", "2s")
    tracking_number = ctx.step.atomic("ship", lambda: ship(order_id))
    return {"order_id": order_id, "charge_id": charge_id, "tracking_number": tracking_number}
