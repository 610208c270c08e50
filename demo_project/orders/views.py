"""The demo's pages: orders, placing one, fixing or breaking a card, Confirm packed.

"Confirm packed" stands in for the warehouse: it sends the workflow signal
an order's ``fulfil-order`` run waits for.

State changes are POST-only, follow Post/Redirect/Get and report with
django.contrib.messages. Every page needs a logged-in user; anonymous users
are sent to the admin login (``LOGIN_URL``).
"""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_POST

from django_openworkflow import send_signal
from django_openworkflow.models import WorkflowRun

from .forms import OrderForm
from .models import Card, Order, Product
from .workflows import warehouse_signal


def _render_list(request: HttpRequest, form: OrderForm, *, status: int = 200) -> HttpResponse:
    orders = list(Order.objects.select_related("product", "card")[:50])
    runs = WorkflowRun.objects.in_bulk([o.run_id for o in orders if o.run_id])
    for order in orders:
        order.run = runs.get(order.run_id)
    context = {
        "orders": orders,
        "products": Product.objects.all(),
        "cards": Card.objects.all(),
        "form": form,
    }
    return render(request, "orders/order_list.html", context, status=status)


@require_GET
@login_required
def order_list(request: HttpRequest) -> HttpResponse:
    return _render_list(request, OrderForm())


@require_POST
@login_required
def place_order(request: HttpRequest) -> HttpResponse:
    form = OrderForm(request.POST)
    if not form.is_valid():
        messages.error(request, "The order was not placed: see the form below.")
        return _render_list(request, form, status=400)
    order = Order.objects.place(
        product=form.cleaned_data["product"],
        quantity=form.cleaned_data["quantity"],
        card=form.cleaned_data["card"],
    )
    messages.success(request, f"Order {order.reference} placed; a worker will process it.")
    return redirect("orders:order-list")


@require_POST
@login_required
def set_card_declined(request: HttpRequest, pk: int, *, declined: bool) -> HttpResponse:
    card = get_object_or_404(Card, pk=pk)
    Card.objects.filter(pk=card.pk).update(declined=declined)
    if declined:
        messages.warning(request, f"Card {card} now declines every charge.")
    else:
        messages.success(
            request,
            f"Card {card} fixed. Resume the failed runs of its orders from their run pages.",
        )
    return redirect("orders:order-list")


@require_POST
@login_required
def confirm_packed(request: HttpRequest, pk: int) -> HttpResponse:
    """The warehouse packed the order: wake its ``fulfil-order`` run, which ships it."""
    order = get_object_or_404(Order, pk=pk)
    if not order.awaits_warehouse:
        # Checked first so a click on a stale page does not use up the
        # idempotency key of a confirmation that may still be needed.
        messages.warning(request, f"Order {order.reference} is not waiting for the warehouse.")
        return redirect("orders:order-list")
    woken = send_signal(
        warehouse_signal(order.pk),
        {"by": request.user.get_username()},
        # A second POST (a double click, a reload) delivers nothing new.
        idempotency_key=f"warehouse-{order.pk}",
    )
    if woken:
        messages.success(
            request,
            f"Order {order.reference} confirmed packed: {len(woken)} run woken; "
            "a worker will ship it.",
        )
    else:
        messages.warning(
            request,
            f"Order {order.reference} is not waiting for the warehouse "
            "(already confirmed?): no run was woken.",
        )
    return redirect("orders:order-list")
