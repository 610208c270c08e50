"""The shop's workflows: ``process-order`` and its children ``charge-card`` and ``fulfil-order``.

``process-order`` reserves the stock, charges the card in the child workflow
``charge-card``, then runs the child workflow ``fulfil-order`` and waits for
it.

``charge-card`` runs in the ``payments`` queue (``settings.OPENWORKFLOW
["QUEUES"]``): at most two charges at once across all workers, and one at a
time per card, whatever else the workers are doing. Its runs are keyed by
the order's card (``concurrency_key``), so a customer's second order waits
for the first charge while other customers' charges go on. The parent,
which waits for the charge, stays in the unlimited ``default`` queue: a
waiting parent in a limited queue would hold a place its child needs.

Once the order is paid, ``process-order`` enqueues the task
``send_order_confirmation`` (orders/tasks.py), Django's task framework run
durably by ``WorkflowTaskBackend``: the confirmation email is its own run.

``fulfil-order`` marks the order
"awaiting warehouse" and waits for the warehouse's confirmation, the signal
``warehouse-confirmed:<order id>`` (the "Confirm packed" button on the orders
page sends it), then ships.

``stock-report`` runs every night at 03:00 (``settings.TIME_ZONE``): a
schedule declared in code, which a worker creates when it starts. It lists
the products whose stock is low; the Schedules page shows its next and last
runs, and the admin's "Run now" starts one at once.

Each step is stored once it finishes, so a worker that dies mid-order
resumes at the first unfinished step, and an order whose card was declined
can be resumed (``WorkflowRun.objects.resume(order.run_id)``, or the Resume
button on the run's page) once the card is fixed: the stock is not reserved
twice. The charge uses the card token in the run's input, so the order can
also be resumed with another card: "Resume with changes" on the run's page
(``WorkflowRun.objects.resume(run, input={..., "card_token": "tok_4242"})``).

If the warehouse does not confirm within an hour, ``fulfil-order`` fails and
so does the order's run ("fulfilment failed"): a person should chase the
warehouse. Resuming the order's run then starts a new ``fulfil-order`` that
waits for the warehouse again; the stock and the charge are not done twice.
"""

from __future__ import annotations

import logging
import uuid

from django_openworkflow import RetryPolicy, StepFailed, workflow

from .models import Card, Order, Product
from .tasks import send_order_confirmation

logger = logging.getLogger(__name__)

NO_RETRY = RetryPolicy(maximum_attempts=1)
CHARGE_RETRY = RetryPolicy(maximum_attempts=3, initial_interval="1s")
WAREHOUSE_TIMEOUT = "1h"
LOW_STOCK = 10


class OutOfStock(Exception):
    """Not enough stock for the order."""


class CardDeclined(Exception):
    """The payment provider refused the charge."""


class WarehouseTimeout(Exception):
    """The warehouse did not confirm the order in time."""


def warehouse_signal(order_id: int) -> str:
    """The signal the warehouse sends once the order is packed."""
    return f"warehouse-confirmed:{order_id}"


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


def call_payment_provider(order_id: int, card_token: str) -> str:
    """Stands in for a payment provider's API: an external call, not a database write.

    The provider knows cards by their token (``Card.token``). The card is read
    from the database on every attempt, so fixing it (the demo page's "Fix
    card" button) makes the next attempt, or a resume, succeed; so does a
    resume with another card's token in the run's input ("Resume with changes").
    """
    order = Order.objects.get(pk=order_id)
    card = Card.for_token(card_token)
    if card is None:
        raise CardDeclined(f"no card has the token {card_token!r}")
    if card.declined:
        raise CardDeclined(f"card ending {card.last4} ({card.holder}) was declined")
    charge_id = f"ch_{uuid.uuid4().hex[:16]}"
    logger.info("card charged order=%s card=%s charge=%s", order.reference, card.last4, charge_id)
    return charge_id


def record_charge(order_id: int, charge_id: str, card_token: str) -> None:
    """The order is paid, by the card charged (another one, after a corrected resume)."""
    card = Card.for_token(card_token)
    paid = {"status": Order.Status.PAID, "charge_id": charge_id}
    Order.objects.filter(pk=order_id).update(**paid, **({"card": card} if card else {}))


def await_warehouse(order_id: int) -> None:
    Order.objects.filter(pk=order_id).update(status=Order.Status.AWAITING_WAREHOUSE)


def ship(order_id: int, packed_by: str) -> str:
    tracking_number = f"TRK{uuid.uuid4().hex[:10].upper()}"
    Order.objects.filter(pk=order_id).update(
        status=Order.Status.SHIPPED, tracking_number=tracking_number, packed_by=packed_by
    )
    return tracking_number


@workflow(name="charge-card", queue="payments")
def charge_card(ctx):
    """Charge the order's card: 3 attempts, then this run fails, and so does the parent's step."""
    order_id, card_token = ctx.input["order_id"], ctx.input["card_token"]
    return ctx.step.run(
        "charge", lambda: call_payment_provider(order_id, card_token), retry_policy=CHARGE_RETRY
    )


@workflow(name="fulfil-order")
def fulfil_order(ctx):
    order_id = ctx.input["order_id"]
    ctx.step.atomic("await-warehouse", lambda: await_warehouse(order_id))
    confirmation = ctx.step.wait_for_signal(
        warehouse_signal(order_id), name="warehouse-confirmed", timeout=WAREHOUSE_TIMEOUT
    )
    if confirmation is None:
        # A workflow's own exception fails its run (workflows are not retried
        # by default), which fails the parent's "fulfil-order" step.
        raise WarehouseTimeout(
            f"the warehouse did not confirm order {order_id} within {WAREHOUSE_TIMEOUT}"
        )
    packed_by = (confirmation["data"] or {}).get("by", "")
    return ctx.step.atomic("ship", lambda: ship(order_id, packed_by))


FAILED_STATUS = {
    "reserve-stock": Order.Status.OUT_OF_STOCK,
    "charge-card": Order.Status.PAYMENT_FAILED,
    "fulfil-order": Order.Status.FULFILMENT_FAILED,
}


@workflow(name="process-order")
def process_order(ctx):
    order_id, card_token = ctx.input["order_id"], ctx.input["card_token"]
    try:
        ctx.step.atomic("reserve-stock", lambda: reserve_stock(order_id), retry_policy=NO_RETRY)
        # A child run in the "payments" queue, one at a time per card: parks this run
        # until the charge ends; a failed charge raises StepFailed ("charge-card").
        charge_id = ctx.step.run_workflow(
            charge_card,
            {"order_id": order_id, "card_token": card_token},
            concurrency_key=f"card-{card_token}",
        )
        ctx.step.atomic("record-charge", lambda: record_charge(order_id, charge_id, card_token))
        # A task of Django's task framework (orders/tasks.py), enqueued in this step's
        # transaction: queued exactly once, however often this run is replayed.
        ctx.step.atomic(
            "queue-confirmation-email", lambda: send_order_confirmation.enqueue(order_id).id
        )
        # Parks this run until the child ends; a failed child raises StepFailed.
        tracking_number = ctx.step.run_workflow(fulfil_order, {"order_id": order_id})
    except StepFailed as exc:
        # Not a step on purpose: it must run each time the run fails, also
        # after a resume, and writing the same status twice is harmless.
        if exc.step_name in FAILED_STATUS:
            Order.objects.filter(pk=order_id).update(status=FAILED_STATUS[exc.step_name])
        raise  # uncaught, StepFailed fails the run; it can be resumed later
    return {"order_id": order_id, "charge_id": charge_id, "tracking_number": tracking_number}


def count_stock() -> dict[str, int]:
    return dict(Product.objects.order_by("name").values_list("name", "stock"))


@workflow(name="stock-report", schedule="0 3 * * *")
def stock_report(ctx):
    """The nightly stock report: every product's stock, and those running low."""
    stock = ctx.step.run("count-stock", count_stock)
    low = sorted(name for name, count in stock.items() if count < LOW_STOCK)
    if low:
        logger.warning("stock is low night=%s products=%s", ctx.scheduled_at.date(), low)
    return {"night": ctx.scheduled_at.isoformat(), "stock": stock, "low": low}
