"""Tests of the shop's workflows: how to test workflows with ``django_openworkflow.testing``.

``run_to_completion()`` starts a run and ``drain()`` executes every due run
right here, inside the test's transaction. By default they also skip timers
("time travel"): the charge's retry delays, and the warehouse's one-hour
timeout too. To see an order *wait* for the warehouse, pass
``time_travel=False``.

Run them with ``manage.py test demo_project.orders``.
"""

from __future__ import annotations

from unittest import mock

from django.contrib.auth import get_user_model
from django.core import mail
from django.test import TestCase

from django_openworkflow import RetryPolicy, send_signal
from django_openworkflow.models import WorkflowRun
from django_openworkflow.tasks import TASK_WORKFLOW
from django_openworkflow.testing import drain, run_to_completion

from . import workflows
from .models import Card, Order, Product
from .tasks import send_order_confirmation
from .workflows import process_order, warehouse_signal

SLOW_CHARGE_RETRY = RetryPolicy(maximum_attempts=3, initial_interval="1h")


class ProcessOrderTests(TestCase):
    @classmethod
    def setUpTestData(cls):
        cls.mug = Product.objects.create(name="Mug", stock=10)
        cls.good_card = Card.objects.create(holder="Ada", last4="4242")
        cls.bad_card = Card.objects.create(holder="Charles", last4="0002", declined=True)

    def new_order(self, card: Card) -> Order:
        return Order.objects.create(
            reference=f"order-{card.last4}", product=self.mug, quantity=2, card=card
        )

    def assert_order(self, order: Order, status: str, *, stock: int) -> None:
        order.refresh_from_db()
        self.mug.refresh_from_db()
        self.assertEqual(order.status, status)
        self.assertEqual(self.mug.stock, stock)

    def test_order_waits_for_the_warehouse_then_ships(self):
        order = self.new_order(self.good_card)
        run = run_to_completion(process_order, order.run_input, time_travel=False)
        self.assertEqual(run.status, "pending")  # parked until its fulfil-order child ends
        self.assert_order(order, Order.Status.AWAITING_WAREHOUSE, stock=8)

        woken = send_signal(warehouse_signal(order.pk), {"by": "wendy"})
        self.assertEqual(len(woken), 1)  # the fulfil-order run
        drain()

        run.refresh_from_db()
        self.assertEqual(run.status, "completed")
        self.assert_order(order, Order.Status.SHIPPED, stock=8)
        self.assertEqual(order.packed_by, "wendy")
        self.assertEqual(run.output["tracking_number"], order.tracking_number)

    def test_a_second_confirmation_wakes_nothing(self):
        order = self.new_order(self.good_card)
        run_to_completion(process_order, order.run_input, time_travel=False)
        self.assertEqual(len(send_signal(warehouse_signal(order.pk), {"by": "wendy"})), 1)
        drain()

        # A signal only reaches runs waiting for it now, and none is.
        self.assertEqual(send_signal(warehouse_signal(order.pk), {"by": "walter"}), [])
        self.assert_order(order, Order.Status.SHIPPED, stock=8)
        self.assertEqual(order.packed_by, "wendy")

    def test_declined_card_fails_and_resumes_without_reserving_twice(self):
        order = self.new_order(self.bad_card)
        run = run_to_completion(process_order, order.run_input)  # skips the retry delays
        self.assertEqual(run.status, "failed")
        self.assertEqual(run.error["step"], "charge-card")
        self.assert_order(order, Order.Status.PAYMENT_FAILED, stock=8)

        Card.objects.filter(pk=self.bad_card.pk).update(declined=False)
        WorkflowRun.objects.resume(run)
        drain(time_travel=False)
        self.assert_order(order, Order.Status.AWAITING_WAREHOUSE, stock=8)

        send_signal(warehouse_signal(order.pk), {"by": "wendy"})
        drain()
        run.refresh_from_db()
        self.assertEqual(run.status, "completed")
        self.assert_order(order, Order.Status.SHIPPED, stock=8)  # reserved once

    def test_declined_card_resumed_with_another_cards_token(self):
        order = self.new_order(self.bad_card)
        run = run_to_completion(process_order, order.run_input)
        self.assertEqual(run.status, "failed")
        self.assertEqual(run.input["card_token"], "tok_0002")

        # What "Resume with changes" on the run's page does: the same input, another card.
        corrected = {**run.input, "card_token": self.good_card.token}
        WorkflowRun.objects.resume(run, input=corrected)
        drain(time_travel=False)
        order.refresh_from_db()
        self.assertEqual(order.status, Order.Status.AWAITING_WAREHOUSE)
        self.assertEqual(order.card, self.good_card)  # paid by the card of the new token
        self.assert_order(order, Order.Status.AWAITING_WAREHOUSE, stock=8)  # reserved once
        old = {"order_id": order.pk, "card_token": "tok_0002"}
        self.assertEqual(run.events.get().details["input"], {"old": old, "new": corrected})

    def test_a_paid_order_sends_its_confirmation_email_once_through_a_task(self):
        order = self.new_order(self.good_card)
        run = run_to_completion(process_order, order.run_input, time_travel=False)
        self.assertEqual(run.status, "pending")  # waiting for the warehouse
        # The task's own run (Django's task framework), executed by drain() like any run.
        email_run = WorkflowRun.objects.get(workflow_name=TASK_WORKFLOW)
        self.assertEqual(email_run.status, "completed")
        self.assertEqual(email_run.output, "ada@example.com")
        result = send_order_confirmation.get_result(str(email_run.pk))
        self.assertEqual(str(result.status), "SUCCESSFUL")
        self.assertEqual(len(mail.outbox), 1)
        self.assertEqual(mail.outbox[0].subject, "Order order-4242 is confirmed")
        self.assertEqual(mail.outbox[0].to, ["ada@example.com"])

        send_signal(warehouse_signal(order.pk), {"by": "wendy"})
        drain()
        run.refresh_from_db()
        self.assertEqual(run.status, "completed")
        self.assertEqual(len(mail.outbox), 1)  # the replays did not queue it again

    def test_one_charge_at_a_time_per_card(self):
        # charge-card runs in the "payments" queue, keyed by the card (key_concurrency 1):
        # a declined charge waiting for its retry still holds its card's place, so the
        # next charge to that card waits, pending, without being started.
        first = self.new_order(self.bad_card)
        second = Order.objects.create(
            reference="order-0002-b", product=self.mug, quantity=1, card=self.bad_card
        )
        for order in (first, second):
            process_order.start(order.run_input)
        # A retry an hour away: the first charge stays parked whatever the machine's speed.
        with mock.patch.object(workflows, "CHARGE_RETRY", SLOW_CHARGE_RETRY):
            drain(time_travel=False)
        charges = WorkflowRun.objects.filter(workflow_name="charge-card")
        self.assertEqual(
            {(run.input["order_id"], run.queue, run.concurrency_key) for run in charges},
            {(order.pk, "payments", f"card-{self.bad_card.token}") for order in (first, second)},
        )
        # Whichever order's charge came first is in progress, parked for a retry; the
        # other is held back: the same card.
        self.assertEqual(sorted(run.started_at is None for run in charges), [False, True])

        Card.objects.filter(pk=self.bad_card.pk).update(declined=False)
        drain(time_travel="sleeps")  # skips the retry delay, not the warehouse's timeout
        self.assert_order(first, Order.Status.AWAITING_WAREHOUSE, stock=7)
        self.assert_order(second, Order.Status.AWAITING_WAREHOUSE, stock=7)

    def test_no_confirmation_within_an_hour_fails_the_order(self):
        order = self.new_order(self.good_card)
        run = run_to_completion(process_order, order.run_input)  # travels past 1 h
        self.assertEqual(run.status, "failed")
        self.assertIn("WarehouseTimeout", run.error["message"])
        self.assert_order(order, Order.Status.FULFILMENT_FAILED, stock=8)

        # Resuming starts a new fulfil-order, which waits for the warehouse again.
        WorkflowRun.objects.resume(run)
        drain(time_travel=False)
        self.assert_order(order, Order.Status.AWAITING_WAREHOUSE, stock=8)

    def test_confirm_packed_button(self):
        order = Order.objects.place(product=self.mug, quantity=2, card=self.good_card)
        drain(time_travel=False)
        self.client.force_login(get_user_model().objects.create_user("wendy"))
        url = f"/orders/{order.pk}/confirm-packed/"
        self.assertContains(self.client.get("/"), url)

        first = self.client.post(url, follow=True)
        self.assertContains(first, "confirmed packed: 1 run woken")
        again = self.client.post(url, follow=True)  # a double click: nothing new is delivered
        self.assertContains(again, "is not waiting for the warehouse")

        drain()
        self.assert_order(order, Order.Status.SHIPPED, stock=8)
        self.assertEqual(order.packed_by, "wendy")


class OrderAdminTests(TestCase):
    """The order's admin page lists its runs; the order list resumes and cancels them."""

    def test_an_order_page_lists_its_run_and_the_list_resumes_it(self):
        mug = Product.objects.create(name="Mug", stock=10)
        card = Card.objects.create(holder="Charles", last4="0002", declined=True)
        order = Order.objects.place(product=mug, quantity=1, card=card)
        drain()  # the charge is declined three times: the order's run fails
        run = WorkflowRun.objects.for_subject(order).get()
        self.assertEqual((run.pk, run.status), (order.run_id, "failed"))
        self.assertEqual(run.subject, order)
        self.client.force_login(
            get_user_model().objects.create_superuser("admin", "admin@example.com", "admin")
        )

        page = self.client.get(order.get_admin_url())
        self.assertContains(page, f'<a href="/workflows/{run.pk}/" class="owf-run-link">')
        self.assertContains(page, '<td class="field-step">charge-card</td>')

        Card.objects.filter(pk=card.pk).update(declined=False)
        response = self.client.post(
            "/admin/orders/order/",
            {"action": "resume_workflow_runs", "_selected_action": [order.pk]},
            follow=True,
        )
        self.assertContains(response, "1 run resumed.")
        drain(time_travel=False)
        order.refresh_from_db()
        self.assertEqual(order.status, Order.Status.AWAITING_WAREHOUSE)
