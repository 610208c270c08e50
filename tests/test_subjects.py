"""Runs attached to domain objects: ``start(..., subject=obj)``, ``run.subject``,
``ctx.subject``, ``for_subject()``, the subject's admin (inline and actions), the run
list's subject filter and the run page's link to the subject (SPEC section 13).

The subjects are the test app's ``Invoice`` (integer key), ``Parcel`` (UUID key) and
``Coupon`` (text key), registered in the admin by ``tests/testapp/admin.py``.
"""

from __future__ import annotations

import itertools
import re
import uuid
from datetime import timedelta

import pytest
from django.contrib.admin.models import CHANGE, LogEntry
from django.contrib.admin.utils import quote
from django.contrib.auth.models import Permission
from django.contrib.contenttypes.models import ContentType
from django.contrib.messages import get_messages
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from django_openworkflow.models import StepAttempt, WorkflowRun, WorkflowRunEvent
from django_openworkflow.testing import drain
from tests.testapp.admin import InvoiceAdmin
from tests.testapp.models import Coupon, Invoice, Parcel, SideEffect
from tests.testapp.workflows import echo, ignores_subject, parent, reads_subject
from tests.users import CSRF_SECRET, ROLES, create_user, login_as

pytestmark = pytest.mark.django_db

SUBJECTS = {
    "integer": lambda: Invoice.objects.create(number="A-1"),
    "uuid": lambda: Parcel.objects.create(label="box"),
    "text": lambda: Coupon.objects.create(code="SPRING_25/ü"),
}
RUN_LIST = reverse("django_openworkflow:run-list")
T0 = timezone.now() - timedelta(days=1)


def content_type(model) -> ContentType:
    return ContentType.objects.get_for_model(model)


_created = itertools.count()


def make_run(status: str, subject=None, **fields) -> WorkflowRun:
    """A run in ``status`` (created directly, as the admin tests do), about ``subject``.

    Each one a second newer than the one before (the database clock may give runs of one
    transaction one time).
    """
    fields.setdefault("created_at", T0 + timedelta(seconds=next(_created)))
    if status == "failed":
        fields.setdefault("error", {"type": "ValueError", "message": "card declined"})
    run = WorkflowRun(workflow_name=fields.pop("workflow_name", "charge-order"), status=status)
    for name, value in fields.items():
        setattr(run, name, value)
    if subject is not None:
        run.subject = subject
    run.save()
    return run


def messages_of(response) -> list[tuple[str, str]]:
    return [(m.level_tag, str(m)) for m in get_messages(response.wsgi_request)]


def grant(user, *codenames: str, app_label: str = "testapp") -> None:
    for codename in codenames:
        user.user_permissions.add(
            Permission.objects.get(content_type__app_label=app_label, codename=codename)
        )


def admin_change_url(obj) -> str:
    opts = obj._meta
    return reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[quote(obj.pk)])


# --- start(subject=...) --------------------------------------------------------------


@pytest.mark.parametrize("kind", list(SUBJECTS))
def test_start_stores_the_content_type_and_the_key_as_text(kind):
    obj = SUBJECTS[kind]()

    run = echo.start({"a": 1}, subject=obj)

    stored = WorkflowRun.objects.get(pk=run.pk)
    assert (stored.subject_type_id, stored.subject_id) == (content_type(type(obj)).pk, str(obj.pk))
    assert (run.subject_type_id, run.subject_id) == (stored.subject_type_id, stored.subject_id)
    assert stored.subject == obj
    assert type(stored.subject) is type(obj)
    assert list(WorkflowRun.objects.for_subject(obj)) == [run]


@pytest.mark.parametrize("kind", list(SUBJECTS))
def test_a_run_with_a_subject_executes_and_ctx_subject_is_the_object(kind):
    obj = SUBJECTS[kind]()
    run = reads_subject.start(subject=obj)

    drain()

    run.refresh_from_db()
    assert run.status == "completed"
    assert run.output == {"stored": str(obj), "now": str(obj)}


@pytest.mark.postgres
def test_start_with_a_subject_takes_the_postgresql_fast_insert():
    """One statement of our own (psycopg, not the ORM): no INSERT goes through Django."""
    invoice = Invoice.objects.create(number="A-1")
    ContentType.objects.get_for_model(Invoice)  # cached: only the insert is left

    with CaptureQueriesContext(connection) as queries:
        run = echo.start({"a": 1}, subject=invoice, idempotency_key="k-1")

    assert [q["sql"] for q in queries if "INSERT" in q["sql"].upper()] == []
    stored = WorkflowRun.objects.get(pk=run.pk)
    assert (stored.subject_id, stored.idempotency_key, stored.input) == (
        str(invoice.pk),
        "k-1",
        {"a": 1},
    )
    assert (run.subject_type_id, run.subject_id) == (content_type(Invoice).pk, str(invoice.pk))
    assert run.subject == invoice


def test_start_without_a_subject_stores_none():
    run = echo.start({})

    stored = WorkflowRun.objects.get(pk=run.pk)
    assert (stored.subject_type_id, stored.subject_id, stored.subject) == (None, None, None)


def test_start_with_an_idempotency_key_and_a_subject_returns_the_first_run():
    invoice = Invoice.objects.create(number="A-1")

    first = echo.start({}, idempotency_key="invoice-1", subject=invoice)
    again = echo.start({}, idempotency_key="invoice-1", subject=invoice)

    assert again.pk == first.pk
    assert again.subject == invoice
    assert WorkflowRun.objects.for_subject(invoice).count() == 1


def test_start_refuses_an_unsaved_object():
    with pytest.raises(ValueError) as info:
        echo.start({}, subject=Invoice(number="A-1"))

    assert str(info.value) == (
        'subject of workflow "echo" must be saved first: Invoice <Invoice: Invoice A-1> '
        "has no primary key"
    )
    assert not WorkflowRun.objects.exists()


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ({"id": 1}, "dict {'id': 1}"),
        (7, "int 7"),
        (Invoice, "ModelBase <class 'tests.testapp.models.Invoice'>"),
    ],
)
def test_start_refuses_a_subject_that_is_no_model_instance(value, shown):
    with pytest.raises(TypeError) as info:
        echo.start({}, subject=value)

    assert str(info.value) == f'subject of workflow "echo" must be a model instance, not {shown}'
    assert not WorkflowRun.objects.exists()


def test_subject_is_keyword_only():
    invoice = Invoice.objects.create(number="A-1")
    with pytest.raises(TypeError):
        echo.start({}, None, None, None, None, None, None, invoice)  # type: ignore[misc]


def test_start_many_takes_no_subject():
    with pytest.raises(TypeError):
        echo.start_many([{}], subject=Invoice.objects.create(number="A-1"))  # type: ignore[call-arg]


# --- for_subject / for_subjects --------------------------------------------------------


def test_for_subject_lists_the_objects_runs_newest_first():
    invoice, other = Invoice.objects.create(number="A-1"), Invoice.objects.create(number="A-2")
    # The same key as text, on another model: not the invoice's runs.
    coupon = Coupon.objects.create(code=str(invoice.pk))
    runs = [make_run("completed", invoice), make_run("failed", invoice)]
    make_run("failed", other)
    make_run("failed", coupon)
    make_run("failed")

    assert list(WorkflowRun.objects.for_subject(invoice)) == runs[::-1]
    assert list(WorkflowRun.objects.for_subject(coupon)) != []
    assert [r.subject for r in WorkflowRun.objects.for_subject(coupon)] == [coupon]


def test_for_subject_chains_after_other_filters():
    invoice = Invoice.objects.create(number="A-1")
    make_run("completed", invoice)
    failed = make_run("failed", invoice)

    assert list(WorkflowRun.objects.filter(status="failed").for_subject(invoice)) == [failed]
    assert list(WorkflowRun.objects.for_subject(invoice).failed()) == [failed]


def test_for_subject_refuses_an_unsaved_object_and_a_non_model():
    with pytest.raises(ValueError, match="must be saved first"):
        WorkflowRun.objects.for_subject(Invoice(number="A-1"))
    with pytest.raises(TypeError, match="must be a model instance, not str 'A-1'"):
        WorkflowRun.objects.for_subject("A-1")  # type: ignore[arg-type]


def test_for_subjects_takes_instances_of_several_models_or_a_queryset():
    invoices = [Invoice.objects.create(number=f"A-{i}") for i in range(3)]
    parcel = Parcel.objects.create(label="box")
    runs = {obj.pk: make_run("failed", obj) for obj in [*invoices, parcel]}

    of_list = WorkflowRun.objects.for_subjects([invoices[0], parcel])
    of_queryset = WorkflowRun.objects.for_subjects(
        Invoice.objects.filter(number__in=["A-1", "A-2"])
    )

    assert set(of_list) == {runs[invoices[0].pk], runs[parcel.pk]}
    assert list(of_queryset) == [runs[invoices[2].pk], runs[invoices[1].pk]]  # newest first
    assert list(WorkflowRun.objects.for_subjects([])) == []
    assert list(WorkflowRun.objects.for_subjects(Invoice.objects.none())) == []


def test_for_subject_uses_the_subject_index_on_postgresql():
    if connection.vendor != "postgresql":
        pytest.skip("the plan is PostgreSQL's")
    invoice = Invoice.objects.create(number="A-1")
    for _ in range(3):
        make_run("failed", invoice)
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        plan = WorkflowRun.objects.for_subject(invoice).explain()
    assert "owf_run_subject_idx" in plan


# --- run.subject -----------------------------------------------------------------------


def test_run_subject_is_cached_on_the_instance(django_assert_num_queries):
    invoice = Invoice.objects.create(number="A-1")
    run = WorkflowRun.objects.get(pk=make_run("failed", invoice).pk)
    ContentType.objects.get_for_model(Invoice)

    with django_assert_num_queries(1):
        assert run.subject == invoice
        assert run.subject is run.subject


def test_run_subject_is_read_again_when_the_columns_change():
    invoice, other = Invoice.objects.create(number="A-1"), Invoice.objects.create(number="A-2")
    run = make_run("failed", invoice)
    assert run.subject == invoice

    run.subject_id = str(other.pk)

    assert run.subject == other


def test_assigning_the_subject_sets_both_columns():
    parcel = Parcel.objects.create(label="box")
    run = make_run("failed")

    run.subject = parcel
    run.save()

    stored = WorkflowRun.objects.get(pk=run.pk)
    assert (stored.subject_type_id, stored.subject_id) == (content_type(Parcel).pk, str(parcel.pk))
    assert stored.subject == parcel

    stored.subject = None
    stored.save()
    assert WorkflowRun.objects.filter(pk=run.pk, subject_type=None, subject_id=None).exists()


def test_assigning_an_unsaved_object_refuses_the_save_as_a_generic_foreign_key_does():
    run = make_run("failed")
    run.subject = Invoice(number="A-1")

    with pytest.raises(ValueError, match="unsaved related object 'subject'"):
        run.save()


def test_a_key_longer_than_the_column_is_refused_by_start_and_by_assignment():
    coupon = Coupon(code="x" * 300)  # a key as text of 300 characters; subject_id holds 255
    expected = (
        "the primary key of Coupon <Coupon: Coupon " + "x" * 300 + "> is 300 characters as "
        "text; at most 255"
    )
    with pytest.raises(ValueError) as info:
        echo.start({}, subject=coupon)
    assert str(info.value) == f'subject of workflow "echo": {expected}'
    run = make_run("failed")
    with pytest.raises(ValueError) as info:
        run.subject = coupon
    assert str(info.value) == f"subject of a run: {expected}"
    assert WorkflowRun.objects.filter(subject_id__isnull=False).count() == 0


def test_assigning_a_non_model_is_a_type_error():
    run = make_run("failed")
    with pytest.raises(TypeError) as info:
        run.subject = "order 12"
    assert str(info.value) == "a run's subject must be a model instance, not str 'order 12'"


@pytest.mark.parametrize(
    ("model", "subject_id"),
    [
        (Invoice, "abc"),
        (Invoice, "12.5"),
        (Invoice, str(10**30)),  # no integer column holds it
        (Invoice, ""),
        (Parcel, "not-a-uuid"),
        (Parcel, "12"),
    ],
)
def test_run_subject_is_none_for_a_stored_id_that_is_no_key_of_the_model(model, subject_id):
    run = make_run("failed", subject_type_id=content_type(model).pk, subject_id=subject_id)

    assert WorkflowRun.objects.get(pk=run.pk).subject is None


def test_run_subject_is_none_when_the_model_or_the_content_type_is_gone(request):
    request.addfinalizer(ContentType.objects.clear_cache)
    gone = ContentType.objects.create(app_label="gone", model="thing")
    of_removed_model = make_run("failed", subject_type_id=gone.pk, subject_id="1")
    of_missing_type = make_run("failed", subject_type_id=gone.pk + 1000, subject_id="1")

    assert WorkflowRun.objects.get(pk=of_removed_model.pk).subject is None
    assert WorkflowRun.objects.get(pk=of_missing_type.pk).subject is None


def test_prefetch_related_subject_reads_each_model_once(django_assert_num_queries):
    invoices = [Invoice.objects.create(number=f"A-{i}") for i in range(3)]
    parcel = Parcel.objects.create(label="box")
    for obj in [*invoices, parcel]:
        make_run("failed", obj)
    make_run("failed", subject_type_id=content_type(Invoice).pk, subject_id="abc")
    make_run("failed", subject_type_id=content_type(Invoice).pk, subject_id=str(10**30))
    deleted = Invoice.objects.create(number="gone")
    make_run("failed", deleted)
    deleted.delete()
    make_run("failed")
    ContentType.objects.get_for_model(Invoice)
    ContentType.objects.get_for_model(Parcel)

    with django_assert_num_queries(3):  # the runs, the invoices, the parcels
        runs = list(WorkflowRun.objects.order_by("created_at", "id").prefetch_related("subject"))
        subjects = [run.subject for run in runs]

    assert subjects == [*invoices, parcel, None, None, None, None]


# --- ctx.subject -----------------------------------------------------------------------


def test_ctx_subject_is_read_afresh_in_each_pass():
    invoice = Invoice.objects.create(number="A-1")
    run = reads_subject.start(subject=invoice)
    drain(time_travel=False)  # the first pass: reads in a step, then sleeps
    Invoice.objects.filter(pk=invoice.pk).update(number="A-1 (corrected)")

    drain()

    run.refresh_from_db()
    assert run.output == {"stored": "Invoice A-1", "now": "Invoice A-1 (corrected)"}


def test_ctx_subject_is_none_when_the_object_was_deleted_or_there_is_none():
    invoice = Invoice.objects.create(number="A-1")
    run = reads_subject.start(subject=invoice)
    drain(time_travel=False)
    invoice.delete()
    without = reads_subject.start()

    drain()

    run.refresh_from_db()
    without.refresh_from_db()
    assert run.output == {"stored": "Invoice A-1", "now": None}
    assert without.output == {"stored": "None", "now": None}


def test_ctx_subject_costs_no_query_when_the_workflow_never_reads_it():
    invoice = Invoice.objects.create(number="A-1")
    run = ignores_subject.start(subject=invoice)

    with CaptureQueriesContext(connection) as queries:
        drain()

    run.refresh_from_db()
    assert run.status == "completed"
    assert [q["sql"] for q in queries if Invoice._meta.db_table in q["sql"]] == []


# --- a deleted subject -----------------------------------------------------------------


def test_deleting_the_subject_leaves_its_runs(admin_client):
    invoice = Invoice.objects.create(number="A-1")
    runs = [make_run("failed", invoice), make_run("completed", invoice)]
    StepAttempt.objects.create(workflow_run=runs[0], step_name="charge", status="failed")
    pk = invoice.pk

    invoice.delete()

    assert set(WorkflowRun.objects.values_list("pk", flat=True)) == {run.pk for run in runs}
    assert StepAttempt.objects.count() == 1
    for run in runs:
        stored = WorkflowRun.objects.get(pk=run.pk)
        assert (stored.subject_id, stored.subject) == (str(pk), None)
    page = admin_client.get(runs[0].get_absolute_url())
    assert page.status_code == 200
    deleted = f'class="owf-subject owf-subject-deleted">invoice {pk} <span class="owf-muted">'
    assert f"{deleted}(deleted)" in page.content.decode()
    admin_page = admin_client.get(
        reverse("admin:django_openworkflow_workflowrun_change", args=[runs[0].pk])
    )
    assert admin_page.status_code == 200
    assert f"invoice {pk} <span" in admin_page.content.decode()
    listed = admin_client.get(RUN_LIST, {"subject": f"{content_type(Invoice).pk}:{pk}"})
    assert [run.pk for run in listed.context["page"]] == [runs[1].pk, runs[0].pk]
    assert f"Subject: invoice {pk}" in listed.content.decode()


def test_deleting_a_subject_from_its_admin_page_leaves_its_runs(admin_client):
    invoice = Invoice.objects.create(number="A-1")
    run = make_run("failed", invoice)

    confirm = admin_client.get(reverse("admin:testapp_invoice_delete", args=[invoice.pk]))
    response = admin_client.post(
        reverse("admin:testapp_invoice_delete", args=[invoice.pk]), {"post": "yes"}
    )

    assert confirm.status_code == 200
    assert "workflow run" not in confirm.content.decode()  # nothing to delete with it
    assert response.status_code == 302
    assert not Invoice.objects.exists()
    assert WorkflowRun.objects.get(pk=run.pk).subject is None


# --- fixtures of the pages -------------------------------------------------------------


@pytest.fixture
def superuser():
    return create_user("root", superuser=True)


@pytest.fixture
def admin_client(client, superuser):
    client.force_login(superuser)
    return client


def subject_client(client, *run_perms: str, subject_perms=("view_invoice",)):
    """A staff client with these run permissions and these permissions on the test app."""
    user = create_user("clerk", *run_perms)
    grant(user, *subject_perms)
    client.force_login(user)
    return client


# --- the inline on the subject's change page --------------------------------------------


def test_the_inline_lists_the_objects_runs_newest_first(admin_client):
    invoice = Invoice.objects.create(number="A-1")
    done = make_run("completed", invoice, workflow_name="send-invoice")
    failed = make_run("failed", invoice, workflow_name="charge-invoice")
    StepAttempt.objects.create(workflow_run=failed, step_name="charge-card", status="failed")
    make_run("failed", Invoice.objects.create(number="A-2"))  # another invoice's

    page = admin_client.get(admin_change_url(invoice))

    assert page.status_code == 200
    html = page.content.decode()
    assert html.index(str(failed.pk)) < html.index(str(done.pk))
    rows = html.split('class="form-row owf-subject-run"')[1:]
    assert len(rows) == 2
    assert '<td class="field-status">failed</td>' in rows[0]
    assert '<td class="field-workflow_name">charge-invoice</td>' in rows[0]
    assert '<td class="field-step">charge-card</td>' in rows[0]
    assert f'<a href="/workflows/{failed.pk}/" class="owf-run-link">{failed.pk}</a>' in rows[0]
    assert '<td class="field-status">completed</td>' in rows[1]
    assert '<td class="field-step">—</td>' in rows[1]
    for header in ("Status", "Workflow", "Step", "Created at", "Finished at", "Run"):
        assert f">{header}</th>" in html
    assert "Add another" not in html


@pytest.mark.parametrize("kind", ["integer", "uuid", "text"])
def test_the_inline_finds_the_runs_of_each_kind_of_key(admin_client, kind):
    obj = SUBJECTS[kind]()
    run = echo.start({}, subject=obj)

    page = admin_client.get(admin_change_url(obj))

    assert page.status_code == 200
    assert f'class="owf-run-link">{run.pk}</a>' in page.content.decode()


def test_the_inline_shows_the_latest_20_and_links_to_all(admin_client):
    invoice = Invoice.objects.create(number="A-1")
    runs = [make_run("completed", invoice) for _ in range(23)]

    html = admin_client.get(admin_change_url(invoice)).content.decode()

    assert html.count('class="form-row owf-subject-run"') == 20
    assert str(runs[0].pk) not in html  # the oldest three are not shown
    assert str(runs[3].pk) in html
    subject = f"{content_type(Invoice).pk}%3A{invoice.pk}"
    assert (
        f'The latest 20 runs are shown. <a href="{RUN_LIST}?subject={subject}">All 23 runs</a>'
        in html
    )


def test_the_inline_has_no_link_to_more_when_all_are_shown(admin_client):
    invoice = Invoice.objects.create(number="A-1")
    for _ in range(20):
        make_run("completed", invoice)

    html = admin_client.get(admin_change_url(invoice)).content.decode()

    assert html.count('class="form-row owf-subject-run"') == 20
    assert "All 20 runs" not in html


def test_the_inline_says_when_there_are_no_runs_and_is_not_on_the_add_page(admin_client):
    invoice = Invoice.objects.create(number="A-1")

    change = admin_client.get(admin_change_url(invoice)).content.decode()
    add = admin_client.get(reverse("admin:testapp_invoice_add")).content.decode()

    assert "No workflow runs." in change
    assert "owf-subject-runs" not in add


def test_the_inline_has_no_n_plus_1(admin_client, django_assert_max_num_queries):
    invoice = Invoice.objects.create(number="A-1")
    for _ in range(20):
        run = make_run("failed", invoice)
        StepAttempt.objects.create(workflow_run=run, step_name="charge", status="failed")
    admin_client.get(admin_change_url(invoice))

    with django_assert_max_num_queries(5):  # session, user, invoice, its runs, their count
        admin_client.get(admin_change_url(invoice))


# Who sees the inline: staff with view or change on the runs (and access to the invoice).
INLINE_MATRIX = {
    "anonymous": (302, False),
    "non_staff": (302, False),
    "staff_without_perm": (200, False),
    "staff_view": (200, True),
    "staff_change": (200, True),
    "superuser": (200, True),
}


@pytest.mark.parametrize("kind", list(ROLES))
def test_inline_permissions(client, kind):
    invoice = Invoice.objects.create(number="A-1")
    run = make_run("failed", invoice)
    user = login_as(client, kind)
    if user is not None:
        grant(user, "view_invoice")

    response = client.get(admin_change_url(invoice))

    status, shown = INLINE_MATRIX[kind]
    assert response.status_code == status
    assert (str(run.pk) in response.content.decode()) is shown


def test_saving_the_subject_ignores_the_inline(admin_client):
    """The change form posts no data for the inline (nothing is editable in it), and what a
    form posts for it is neither checked nor saved."""
    invoice = Invoice.objects.create(number="A-1")
    run = make_run("failed", invoice)
    prefix = "django_openworkflow-workflowrun-subject_type-subject_id"

    plain = admin_client.post(admin_change_url(invoice), {"number": "A-1b"})
    forged = admin_client.post(
        admin_change_url(invoice),
        {
            "number": "A-1c",
            f"{prefix}-TOTAL_FORMS": "2",
            f"{prefix}-INITIAL_FORMS": "1",
            f"{prefix}-0-id": str(run.pk),
            f"{prefix}-0-status": "completed",
            f"{prefix}-0-DELETE": "on",
            f"{prefix}-1-workflow_name": "injected",
        },
    )

    assert (plain.status_code, forged.status_code) == (302, 302)
    invoice.refresh_from_db()
    assert invoice.number == "A-1c"
    assert list(WorkflowRun.objects.values_list("pk", "status")) == [(run.pk, "failed")]


@override_settings(ROOT_URLCONF="tests.urls_admin_only")
def test_the_inline_links_to_the_admin_without_the_run_pages(admin_client):
    invoice = Invoice.objects.create(number="A-1")
    runs = [make_run("completed", invoice) for _ in range(21)]
    make_run("completed", Invoice.objects.create(number="A-2"))

    html = admin_client.get(admin_change_url(invoice)).content.decode()

    newest = runs[-1]
    change = reverse("admin:django_openworkflow_workflowrun_change", args=[newest.pk])
    assert f'<a href="{change}" class="owf-run-link">{newest.pk}</a>' in html
    changelist = reverse("admin:django_openworkflow_workflowrun_changelist")
    query = f"subject_type={content_type(Invoice).pk}&amp;subject_id={invoice.pk}"
    assert f'<a href="{changelist}?{query}">All 21 runs</a>' in html
    listed = admin_client.get(f"{changelist}?{query.replace('&amp;', '&')}")
    assert listed.status_code == 200
    assert {run.pk for run in listed.context["cl"].result_list} == {run.pk for run in runs}


# --- the mixin's actions on the subject's changelist -------------------------------------

INVOICES = reverse("admin:testapp_invoice_changelist")


def run_action(client, action: str, objects, url: str = INVOICES, **extra):
    return client.post(
        url, {"action": action, "_selected_action": [str(obj.pk) for obj in objects], **extra}
    )


def state() -> tuple:
    return (
        sorted(WorkflowRun.objects.values_list("pk", "status")),
        WorkflowRunEvent.objects.count(),
        LogEntry.objects.count(),
    )


def test_the_mixin_adds_its_actions_to_the_model_admins_own(client):
    subject_client(client, "change_workflowrun")

    page = client.get(INVOICES)

    choices = dict(page.context["action_form"].fields["action"].choices)
    assert list(choices) == ["", "mark_checked", "resume_workflow_runs", "cancel_workflow_runs"]
    assert choices["resume_workflow_runs"] == "Resume failed workflow runs"
    assert choices["cancel_workflow_runs"] == "Cancel active workflow runs"
    assert choices["mark_checked"] == "Mark checked"


def test_the_model_admins_own_action_still_works(client):
    subject_client(client, "change_workflowrun")
    invoice = Invoice.objects.create(number="A-1")

    response = run_action(client, "mark_checked", [invoice])

    assert messages_of(response) == [("success", "1 checked.")]


def test_a_superuser_gets_every_action(admin_client):
    page = admin_client.get(INVOICES)
    choices = [value for value, _label in page.context["action_form"].fields["action"].choices]
    assert choices == [
        "",
        "delete_selected",
        "mark_checked",
        "resume_workflow_runs",
        "cancel_workflow_runs",
    ]


def test_the_inline_and_the_mixin_pass_the_admin_checks():
    from django.contrib import admin

    from django_openworkflow.admin import WorkflowRunInline

    assert WorkflowRunInline(Invoice, admin.site).check() == []
    assert admin.site.get_model_admin(Invoice).check() == []


def test_the_mixin_adds_nothing_where_the_model_admin_turned_actions_off(superuser):
    from django.contrib import admin
    from django.test import RequestFactory

    from django_openworkflow.admin import WorkflowRunsMixin

    class NoActions(WorkflowRunsMixin, admin.ModelAdmin):
        actions = None

    request = RequestFactory().get(INVOICES)
    request.user = superuser

    assert NoActions(Invoice, admin.site).get_actions(request) == {}


def test_the_mixin_offers_no_action_in_a_popup(admin_client):
    page = admin_client.get(INVOICES, {"_popup": "1"})
    assert page.context["action_form"] is None


def test_resume_failed_workflow_runs_of_the_selected_objects(admin_client, superuser):
    first, second, unselected = (Invoice.objects.create(number=f"A-{i}") for i in range(3))
    failed = [make_run("failed", first), make_run("failed", second)]
    completed = make_run("completed", first)
    running = make_run("running", second)
    elsewhere = make_run("failed", unselected)

    response = run_action(admin_client, "resume_workflow_runs", [first, second])

    assert response.status_code == 302
    assert messages_of(response) == [
        ("success", "2 runs resumed."),
        ("warning", "1 run skipped: it is completed."),
        ("warning", "1 run skipped: it is running."),
    ]
    statuses = dict(WorkflowRun.objects.values_list("pk", "status"))
    assert [statuses[run.pk] for run in failed] == ["pending", "pending"]
    assert (statuses[completed.pk], statuses[running.pk]) == ("completed", "running")
    assert statuses[elsewhere.pk] == "failed"
    assert sorted(
        WorkflowRunEvent.objects.filter(by=superuser).values_list("run_id", "action")
    ) == sorted((run.pk, "resume") for run in failed)
    run_type = content_type(WorkflowRun)
    assert sorted(
        LogEntry.objects.filter(action_flag=CHANGE).values_list(
            "content_type", "object_id", "change_message"
        )
    ) == sorted((run_type.pk, str(run.pk), "Resumed") for run in failed)


def test_the_actions_read_the_runs_a_chunk_of_selected_objects_at_a_time(admin_client, monkeypatch):
    """One statement binds every key it looks for (SQLite: at most 32,766), so the runs of a
    large selection are read in chunks of objects; every selected object's runs count."""
    monkeypatch.setattr(InvoiceAdmin, "workflow_runs_chunk", 2)
    invoices = [Invoice.objects.create(number=f"A-{i}") for i in range(5)]
    failed = [make_run("failed", invoice) for invoice in invoices]

    with CaptureQueriesContext(connection) as queries:
        response = run_action(admin_client, "resume_workflow_runs", invoices)

    assert messages_of(response) == [("success", "5 runs resumed.")]
    assert set(
        WorkflowRun.objects.filter(pk__in=[r.pk for r in failed]).values_list("status", flat=True)
    ) == {"pending"}
    run_reads = [q for q in queries if re.search(r"subject_id.? IN \(", q["sql"])]
    assert len(run_reads) == 3  # 2 + 2 + 1 objects


def test_resume_skips_a_run_past_its_deadline(admin_client):
    invoice = Invoice.objects.create(number="A-1")
    late = make_run("failed", invoice, deadline_at=timezone.now() - timedelta(minutes=5))

    response = run_action(admin_client, "resume_workflow_runs", [invoice])

    assert messages_of(response) == [
        ("warning", "0 runs resumed."),
        ("warning", "1 run skipped: its deadline has passed."),
    ]
    late.refresh_from_db()
    assert late.status == "failed"
    assert not LogEntry.objects.exists()


def test_cancel_active_workflow_runs_of_the_selected_objects(admin_client):
    first, second = Invoice.objects.create(number="A-1"), Invoice.objects.create(number="A-2")
    active = [make_run("pending", first), make_run("running", second)]
    finished = [make_run("completed", first), make_run("completed", second)]
    failed = make_run("failed", second)

    response = run_action(admin_client, "cancel_workflow_runs", [first, second])

    assert messages_of(response) == [
        ("success", "2 runs canceled."),
        ("warning", "2 runs skipped: it is completed."),
        ("warning", "1 run skipped: it is failed."),
    ]
    statuses = dict(WorkflowRun.objects.values_list("pk", "status"))
    assert [statuses[run.pk] for run in active] == ["canceled", "canceled"]
    assert [statuses[run.pk] for run in [*finished, failed]] == ["completed", "completed", "failed"]
    assert sorted(LogEntry.objects.values_list("object_id", "change_message")) == sorted(
        (str(run.pk), "Canceled") for run in active
    )


def test_an_object_without_runs_changes_nothing(admin_client):
    invoice = Invoice.objects.create(number="A-1")

    response = run_action(admin_client, "cancel_workflow_runs", [invoice])

    assert messages_of(response) == [("warning", "0 runs canceled.")]


@pytest.mark.parametrize(
    ("model", "url"),
    [
        (Parcel, reverse("admin:testapp_parcel_changelist")),
        (Coupon, reverse("admin:testapp_coupon_changelist")),
    ],
)
def test_the_actions_work_with_uuid_and_text_keys(admin_client, model, url):
    obj = SUBJECTS["uuid" if model is Parcel else "text"]()
    run = make_run("failed", obj)

    response = run_action(admin_client, "resume_workflow_runs", [obj], url=url)

    assert messages_of(response) == [("success", "1 run resumed.")]
    run.refresh_from_db()
    assert run.status == "pending"


# Each role, with view permission on the invoices (so the changelist opens): only
# change_workflowrun applies the actions. The others are shown "No action selected."
# (the invoice admin has an action of its own, so the list has an action form).
ACTION_MATRIX = {
    "anonymous": (302, False),
    "non_staff": (302, False),
    "staff_without_perm": (302, False),
    "staff_view": (302, False),
    "staff_change": (302, True),
    "superuser": (302, True),
}


@pytest.mark.parametrize("kind", list(ROLES))
@pytest.mark.parametrize(
    ("action", "status", "changed_status"),
    [
        ("resume_workflow_runs", "failed", "pending"),
        ("cancel_workflow_runs", "running", "canceled"),
    ],
)
def test_action_permissions(client, kind, action, status, changed_status):
    invoice = Invoice.objects.create(number="A-1")
    run = make_run(status, invoice)
    user = login_as(client, kind)
    if user is not None:
        grant(user, "view_invoice")

    response = run_action(client, action, [invoice])

    expected_code, changes = ACTION_MATRIX[kind]
    assert response.status_code == expected_code
    if kind in ("anonymous", "non_staff"):
        assert response["Location"] == f"{reverse('admin:login')}?next={INVOICES}"
    elif not changes:
        assert messages_of(response) == [("warning", "No action selected.")]
    run.refresh_from_db()
    assert run.status == (changed_status if changes else status)
    assert WorkflowRunEvent.objects.count() == (1 if changes else 0)
    assert LogEntry.objects.count() == (1 if changes else 0)


def test_the_actions_need_the_run_permission_not_the_subjects_change_permission(client):
    """View permission on the invoices and change on the runs: the actions apply."""
    subject_client(client, "change_workflowrun", subject_perms=("view_invoice",))
    invoice = Invoice.objects.create(number="A-1")
    run = make_run("failed", invoice)

    response = run_action(client, "resume_workflow_runs", [invoice])

    assert messages_of(response) == [("success", "1 run resumed.")]
    run.refresh_from_db()
    assert run.status == "pending"


def test_change_permission_on_the_subject_does_not_allow_the_actions(client):
    subject_client(client, "view_workflowrun", subject_perms=("view_invoice", "change_invoice"))
    invoice = Invoice.objects.create(number="A-1")
    make_run("failed", invoice)
    before = state()

    page = client.get(INVOICES)
    response = run_action(client, "resume_workflow_runs", [invoice])

    choices = [value for value, _label in page.context["action_form"].fields["action"].choices]
    assert choices == ["", "mark_checked"]
    assert messages_of(response) == [("warning", "No action selected.")]
    assert state() == before


@pytest.mark.parametrize("kind", list(ROLES))
@pytest.mark.parametrize("action", ["resume_workflow_runs", "cancel_workflow_runs"])
def test_the_action_post_needs_the_csrf_token(kind, action):
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    user = login_as(client, kind)
    if user is not None:
        grant(user, "view_invoice")
    client.cookies["csrftoken"] = CSRF_SECRET
    invoice = Invoice.objects.create(number="A-1")
    make_run("failed", invoice)
    make_run("running", invoice)
    before = state()

    response = run_action(client, action, [invoice])

    assert response.status_code == 403
    assert b"CSRF verification failed" in response.content
    assert state() == before


def test_the_action_works_with_a_valid_csrf_token():
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    login_as(client, "superuser")
    client.cookies["csrftoken"] = CSRF_SECRET
    invoice = Invoice.objects.create(number="A-1")
    run = make_run("failed", invoice)

    response = run_action(
        client, "resume_workflow_runs", [invoice], csrfmiddlewaretoken=CSRF_SECRET
    )

    assert response.status_code == 302
    run.refresh_from_db()
    assert run.status == "pending"


def test_the_run_admins_actions_still_report_as_before(admin_client):
    """The run admin and the mixin share one implementation of the counted reports."""
    runs = [make_run("failed"), make_run("completed")]

    response = admin_client.post(
        reverse("admin:django_openworkflow_workflowrun_changelist"),
        {"action": "resume_runs", "_selected_action": [str(run.pk) for run in runs]},
    )

    assert messages_of(response) == [
        ("success", "1 run resumed."),
        ("warning", "1 run skipped: it is completed."),
    ]


# --- the run list's subject filter -------------------------------------------------------


def test_the_run_list_filters_by_subject(admin_client):
    invoice, other = Invoice.objects.create(number="A-1"), Invoice.objects.create(number="A-2")
    runs = [make_run("failed", invoice), make_run("completed", invoice)]
    make_run("failed", other)
    make_run("failed")
    value = f"{content_type(Invoice).pk}:{invoice.pk}"

    page = admin_client.get(RUN_LIST, {"subject": value})

    assert page.status_code == 200
    assert [run.pk for run in page.context["page"]] == [runs[1].pk, runs[0].pk]
    html = page.content.decode()
    assert "Subject: Invoice A-1" in html
    assert f'<input type="hidden" name="subject" value="{value}">' in html
    failed_tab = page.context["status_tabs"][4]
    assert (failed_tab["value"], failed_tab["count"]) == ("failed", 1)


@pytest.mark.parametrize("kind", ["integer", "uuid", "text"])
def test_the_run_list_filters_by_each_kind_of_key(admin_client, kind):
    obj = SUBJECTS[kind]()
    run = make_run("failed", obj)
    make_run("failed")

    page = admin_client.get(RUN_LIST, {"subject": f"{content_type(type(obj)).pk}:{obj.pk}"})

    assert [r.pk for r in page.context["page"]] == [run.pk]


def test_the_subject_filter_reads_a_key_as_the_model_does(admin_client):
    invoice = Invoice.objects.create(number="A-1")
    parcel = Parcel.objects.create(label="box")
    runs = [make_run("failed", invoice), make_run("failed", parcel)]

    by_padded_int = admin_client.get(
        RUN_LIST, {"subject": f"{content_type(Invoice).pk}:00{invoice.pk}"}
    )
    by_bare_uuid = admin_client.get(
        RUN_LIST, {"subject": f"{content_type(Parcel).pk}:{parcel.pk.hex.upper()}"}
    )

    assert [r.pk for r in by_padded_int.context["page"]] == [runs[0].pk]
    assert [r.pk for r in by_bare_uuid.context["page"]] == [runs[1].pk]


@pytest.mark.parametrize(
    "value",
    [
        "garbage",
        "12",
        ":1",
        "{invoice}:",
        "x:1",
        "²:1",
        "99999999:1",
        "99999999999999999999999999:1",
        "{invoice}:abc",
        "{invoice}:" + "9" * 40,
        "{parcel}:not-a-uuid",
        "{invoice}:1\x00",
        "{coupon}:" + "x" * 300,
    ],
)
def test_a_bad_subject_filter_shows_no_runs(admin_client, value):
    invoice = Invoice.objects.create(number="A-1")
    make_run("failed", invoice)
    make_run("failed")
    value = value.format(
        invoice=content_type(Invoice).pk,
        parcel=content_type(Parcel).pk,
        coupon=content_type(Coupon).pk,
    )

    page = admin_client.get(RUN_LIST, {"subject": value, "status": "failed"})

    assert page.status_code == 200
    assert list(page.context["page"]) == []
    assert "No runs match." in page.content.decode()
    assert "not a subject: no runs shown" in page.content.decode()
    assert all(tab["count"] == 0 for tab in page.context["status_tabs"])


def test_an_empty_subject_filter_shows_every_run(admin_client):
    make_run("failed", Invoice.objects.create(number="A-1"))
    make_run("failed")

    page = admin_client.get(RUN_LIST, {"subject": ""})

    assert len(page.context["page"]) == 2


def test_the_subject_filter_of_a_removed_model_still_lists_its_runs(admin_client, request):
    request.addfinalizer(ContentType.objects.clear_cache)
    gone = ContentType.objects.create(app_label="gone", model="thing")
    run = make_run("failed", subject_type_id=gone.pk, subject_id="k-1")

    page = admin_client.get(RUN_LIST, {"subject": f"{gone.pk}:k-1"})

    assert [r.pk for r in page.context["page"]] == [run.pk]
    assert "Subject: deleted model k-1" in page.content.decode()


# --- the run page and the run's admin page show the subject --------------------------------


def test_the_run_page_links_to_the_subjects_admin_page(admin_client):
    coupon = Coupon.objects.create(code="SPRING_25/ü")
    run = make_run("failed", coupon)

    html = admin_client.get(run.get_absolute_url()).content.decode()

    url = reverse("admin:testapp_coupon_change", args=[quote(coupon.pk)])
    assert url == "/admin/testapp/coupon/SPRING_5F25_2F%C3%BC/change/"
    assert f'<a href="{url}" class="owf-subject">Coupon SPRING_25/ü</a>' in html
    runs_link = f"{RUN_LIST}?subject={content_type(Coupon).pk}%3ASPRING_25%2F%C3%BC"
    assert f'<a href="{runs_link}" class="owf-subject-runs">its runs</a>' in html


def test_the_run_page_shows_plain_text_without_permission_on_the_subject(client):
    subject_client(client, "view_workflowrun", subject_perms=())
    invoice = Invoice.objects.create(number="A-1")
    run = make_run("failed", invoice)

    html = client.get(run.get_absolute_url()).content.decode()

    assert '<span class="owf-subject">Invoice A-1</span>' in html
    assert admin_change_url(invoice) not in html


@pytest.mark.parametrize("perm", ["view_invoice", "change_invoice"])
def test_the_run_page_links_with_view_or_change_on_the_subject(client, perm):
    subject_client(client, "view_workflowrun", subject_perms=(perm,))
    invoice = Invoice.objects.create(number="A-1")
    run = make_run("failed", invoice)

    html = client.get(run.get_absolute_url()).content.decode()

    assert f'<a href="{admin_change_url(invoice)}" class="owf-subject">Invoice A-1</a>' in html


def test_the_run_page_shows_plain_text_for_a_model_not_in_the_admin(admin_client):
    effect = SideEffect.objects.create(run_id=uuid.uuid4(), step="s")
    run = make_run("failed", effect)

    html = admin_client.get(run.get_absolute_url()).content.decode()

    assert f'<span class="owf-subject">{effect}</span>' in html


def test_the_run_page_of_a_run_without_subject_shows_none(admin_client):
    html = admin_client.get(make_run("failed").get_absolute_url()).content.decode()

    assert ">Subject</dt>" not in html
    assert "owf-subject" not in html


def test_the_subject_is_escaped(admin_client):
    invoice = Invoice.objects.create(number="<script>alert(1)</script>")
    run = make_run("failed", invoice)

    html = admin_client.get(run.get_absolute_url()).content.decode()
    admin_html = admin_client.get(
        reverse("admin:django_openworkflow_workflowrun_change", args=[run.pk])
    ).content.decode()

    assert "<script>alert(1)" not in html
    assert "<script>alert(1)" not in admin_html
    assert "Invoice &lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_the_runs_admin_page_shows_the_subject(client):
    subject_client(client, "view_workflowrun", subject_perms=("view_invoice",))
    invoice = Invoice.objects.create(number="A-1")
    run = make_run("failed", invoice)

    html = client.get(
        reverse("admin:django_openworkflow_workflowrun_change", args=[run.pk])
    ).content.decode()

    assert "<label>Subject:</label>" in html
    assert f'<a href="{admin_change_url(invoice)}" class="owf-subject">Invoice A-1</a>' in html


def test_the_runs_admin_page_shows_plain_text_without_permission(client):
    subject_client(client, "view_workflowrun", subject_perms=())
    invoice = Invoice.objects.create(number="A-1")
    run = make_run("failed", invoice)

    html = client.get(
        reverse("admin:django_openworkflow_workflowrun_change", args=[run.pk])
    ).content.decode()

    assert '<span class="owf-subject">Invoice A-1</span>' in html


def test_child_runs_have_no_subject():
    """Only the run started with subject= is the object's (docs/subjects.md)."""
    invoice = Invoice.objects.create(number="A-1")
    run = parent.start({"child": "echo", "child_input": {"a": 1}}, subject=invoice)

    drain()

    run.refresh_from_db()
    assert run.status == "completed"
    child = WorkflowRun.objects.get(workflow_name="echo")
    assert (child.subject_type_id, child.subject_id) == (None, None)
    assert list(WorkflowRun.objects.for_subject(invoice)) == [run]


# --- the engine on a database of its own --------------------------------------------------


@pytest.mark.django_db(databases=["default", "workflows"])
def test_subjects_with_the_engine_on_another_database(admin_client, settings, request):
    """Content types are read where the routers send ContentType, never on the engine's
    database, which may number them otherwise: there the invoice's id is the parcel's."""
    settings.OPENWORKFLOW = {**settings.OPENWORKFLOW, "DATABASE": "workflows"}
    settings.DATABASE_ROUTERS = ["django_openworkflow.routers.WorkflowRouter"]
    invoice_type = content_type(Invoice)
    request.addfinalizer(ContentType.objects.clear_cache)  # its rows are rolled back
    engine_types = ContentType.objects.using("workflows")
    engine_types.filter(app_label="testapp", model__in=["invoice", "parcel"]).delete()
    engine_types.create(pk=invoice_type.pk, app_label="testapp", model="parcel")
    engine_types.create(app_label="testapp", model="invoice")
    ContentType.objects.clear_cache()
    invoice = Invoice.objects.create(number="A-1")
    Parcel.objects.create(pk=uuid.UUID(int=invoice.pk), label="decoy")

    run = reads_subject.start(subject=invoice)
    drain()

    assert run._state.db == "workflows"
    stored = WorkflowRun.objects.get(pk=run.pk)
    assert stored._state.db == "workflows"
    assert stored.subject_type_id == invoice_type.pk
    assert stored.subject == invoice
    assert stored.output == {"stored": "Invoice A-1", "now": "Invoice A-1"}
    assert list(WorkflowRun.objects.for_subject(invoice)) == [stored]
    inline = admin_client.get(admin_change_url(invoice)).content.decode()
    assert f'class="owf-run-link">{run.pk}</a>' in inline
    page = admin_client.get(run.get_absolute_url()).content.decode()
    assert f'<a href="{admin_change_url(invoice)}" class="owf-subject">Invoice A-1</a>' in page
    listed = admin_client.get(RUN_LIST, {"subject": f"{invoice_type.pk}:{invoice.pk}"})
    assert [r.pk for r in listed.context["page"]] == [run.pk]
    WorkflowRun.objects.filter(pk=run.pk).update(status="failed")
    response = run_action(admin_client, "resume_workflow_runs", [invoice])
    assert messages_of(response) == [("success", "1 run resumed.")]
    assert WorkflowRun.objects.get(pk=run.pk).status == "pending"
