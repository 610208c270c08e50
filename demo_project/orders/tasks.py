"""The shop's tasks, written for Django's task framework and run durably.

``settings.TASKS`` sets ``django_openworkflow.tasks.WorkflowTaskBackend``, so
``send_order_confirmation.enqueue(order_id)`` starts a durable run that a
worker executes: it shows on the run pages, survives a crash of the worker,
and when the mail server is down it can be resumed from its run page.
``process-order`` enqueues it inside a ``step.atomic``, so the email is
queued exactly once per order, however often the order's run is replayed.
"""

from __future__ import annotations

from django.core.mail import send_mail

try:
    from django.tasks import task
except ImportError:  # Django 5.2: the django-tasks backport
    from django_tasks import task

from .models import Order


def customer_address(order: Order) -> str:
    """Stands in for the customer's email address (the demo keeps none)."""
    return f"{order.card.holder.lower().replace(' ', '.')}@example.com"


@task
def send_order_confirmation(order_id: int) -> str:
    """Email the customer that the order is paid; return the address it went to."""
    order = Order.objects.select_related("product", "card").get(pk=order_id)
    address = customer_address(order)
    send_mail(
        subject=f"Order {order.reference} is confirmed",
        message=(
            f"Thank you for your order {order.reference}: {order.quantity} x "
            f"{order.product.name}, paid with the card ending {order.card.last4}. "
            "We will let you know when it ships."
        ),
        from_email=None,
        recipient_list=[address],
    )
    return address
