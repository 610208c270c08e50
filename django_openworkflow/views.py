"""The run list, run-detail, Queues, Schedules and Workers pages, the Resume, Cancel and
Rerun endpoints, and the "Resume with changes" page.

The pages need a logged-in staff user with ``view_workflowrun`` or
``change_workflowrun``; Resume, Cancel and Rerun need ``change_workflowrun``;
"Resume with changes" needs ``change_workflowrun`` and ``correct_workflowrun``.
Anonymous users are sent to the login page, everyone else gets 403. State
changes go through ``WorkflowRun.objects.resume()`` / ``.cancel()`` /
``.rerun()`` only.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import datetime
from functools import wraps
from typing import Any, cast

from django import forms
from django.contrib import messages
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import DatabaseError
from django.db.models import OuterRef, Q, QuerySet, Subquery
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404, render
from django.urls import NoReverseMatch, reverse
from django.utils import timezone
from django.utils.functional import cached_property
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy
from django.views.decorators.http import require_http_methods, require_POST, require_safe

from .audit import log_run_change
from .conf import app_settings
from .correction_forms import (
    blank_forms,
    correction_diffs,
    failed_steps,
    posted_forms,
    read_correction,
    unknown_steps,
)
from .corrections import CORRECT_PERMISSION
from .display import duration_of, error_parts, history, refusal_text, timeline
from .exceptions import InvalidTransition, Refusal, RunBusy
from .managers import WorkflowRunQuerySet
from .models import StepAttempt, WorkflowRun, WorkflowSchedule, WorkflowWorker
from .queue_status import queue_overview, slot_wait
from .queues import configured_queues
from .registry import get_workflow, workflow_names
from .store import get_store
from .subjects import load_subject, model_of, parse_filter_value, subject_shown
from .waiting import waiting_for
from .workers import LIVE, LiveWorker, live_q, live_window, unserved_reason

logger = logging.getLogger(__name__)

VIEW_PERMISSION = "django_openworkflow.view_workflowrun"
CHANGE_PERMISSION = "django_openworkflow.change_workflowrun"

RUNS_PER_PAGE = 50
REFRESH_SECONDS = 3

ViewFunc = Callable[..., HttpResponse]


# --- where the pages are -------------------------------------------------------


def run_page_url(run_id: Any) -> str | None:
    """The run's page, or None when the project did not include ``django_openworkflow.urls``.

    The pages are optional (the admin works without them); whatever links to
    them asks here first.
    """
    try:
        return reverse("django_openworkflow:run-detail", args=[run_id])
    except NoReverseMatch:
        return None


# --- permissions ---------------------------------------------------------------


def can_view_runs(user: Any) -> bool:
    """Staff with ``view_workflowrun`` or ``change_workflowrun`` (change implies view)."""
    return bool(
        user.is_active
        and user.is_staff
        and (user.has_perm(VIEW_PERMISSION) or user.has_perm(CHANGE_PERMISSION))
    )


def can_change_runs(user: Any) -> bool:
    """Staff with ``change_workflowrun``: may resume and cancel."""
    return bool(user.is_active and user.is_staff and user.has_perm(CHANGE_PERMISSION))


def can_correct_runs(user: Any) -> bool:
    """Staff with ``change_workflowrun`` and ``correct_workflowrun``: may resume with changes."""
    return can_change_runs(user) and bool(user.has_perm(CORRECT_PERMISSION))


def run_permission_required(
    *, change: bool = False, correct: bool = False
) -> Callable[[ViewFunc], ViewFunc]:
    """Send anonymous users to the login page and refuse (403) anyone else lacking access.

    ``change=False`` asks for view access, ``change=True`` for change access,
    ``correct=True`` for change and correct access. After login, a refused
    POST leads back to the run's page (a GET of the POST-only URL would only
    give 405).
    """
    allowed = can_correct_runs if correct else can_change_runs if change else can_view_runs

    def decorator(view: ViewFunc) -> ViewFunc:
        @wraps(view)
        def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if not request.user.is_authenticated:
                if request.method in ("GET", "HEAD") or "run_id" not in kwargs:
                    next_url = request.get_full_path()
                else:
                    next_url = reverse("django_openworkflow:run-detail", args=[kwargs["run_id"]])
                return redirect_to_login(next_url)
            if not allowed(request.user):
                raise PermissionDenied
            return view(request, *args, **kwargs)

        return wrapped

    return decorator


# --- queries -------------------------------------------------------------------

# The run list counts no further than this: counting a long history (a million runs) takes
# longer than the page may. Beyond it the tabs say "10,000+" and the pages stop.
COUNT_CAP = 10_000


def capped_count(queryset: QuerySet[Any]) -> dict[str, Any]:
    """``{"count": n, "more": bool}``: the rows, counted up to ``COUNT_CAP``, and whether
    there are more."""
    count = queryset.order_by()[: COUNT_CAP + 1].count()
    return {"count": min(count, COUNT_CAP), "more": count > COUNT_CAP}


class CappedPaginator(Paginator):
    """Pages of at most ``COUNT_CAP`` rows: the newest first, the rest through filters."""

    @cached_property
    def count(self) -> int:  # type: ignore[override]
        return int(capped_count(cast(QuerySet[Any], self.object_list))["count"])


class RunFilterForm(forms.Form):
    status = forms.ChoiceField(
        label=gettext_lazy("status"),
        choices=[("", gettext_lazy("all")), *WorkflowRun.Status.choices],
        required=False,
    )
    workflow = forms.CharField(label=gettext_lazy("workflow"), required=False)
    queue = forms.CharField(label=gettext_lazy("queue"), required=False)
    schedule = forms.CharField(label=gettext_lazy("schedule"), required=False)
    # "<content type id>:<primary key>": the runs of one object (start(..., subject=obj))
    subject = forms.CharField(label=gettext_lazy("subject"), required=False, strip=False)
    q = forms.CharField(
        label=gettext_lazy("search"),
        required=False,
        strip=True,
        widget=forms.TextInput(
            attrs={
                "placeholder": gettext_lazy("run id (first characters), idempotency key"),
                "type": "search",
            }
        ),
    )

    def clean_subject(self) -> tuple[int, str] | None:
        value = self.cleaned_data["subject"]
        if not value:
            return None
        try:
            return parse_filter_value(value)
        except ValueError as exc:
            raise forms.ValidationError(str(exc)) from None

    def filter(self, queryset: QuerySet[WorkflowRun]) -> QuerySet[WorkflowRun]:
        """Apply the workflow, queue, schedule, subject and search filters (not the status
        filter). A subject that names no object's runs shows none."""
        self.is_valid()  # an invalid field is left out of cleaned_data, the others apply
        data = self.cleaned_data
        if "subject" in self.errors:
            return queryset.none()
        if subject := data.get("subject"):
            queryset = queryset.filter(subject_type_id=subject[0], subject_id=subject[1])
        if workflow := data.get("workflow"):
            queryset = queryset.filter(workflow_name=workflow)
        if queue := data.get("queue"):
            queryset = queryset.filter(queue=queue)
        if schedule := data.get("schedule"):
            queryset = queryset.filter(schedule_name=schedule)
        if q := data.get("q"):
            queryset = cast(WorkflowRunQuerySet, queryset).matching(q)
        return queryset

    def selected_status(self) -> str:
        self.is_valid()
        return self.cleaned_data.get("status") or ""


# --- pages ---------------------------------------------------------------------


@require_safe
@run_permission_required()
def run_list(request: HttpRequest) -> HttpResponse:
    form = RunFilterForm(request.GET)
    runs = form.filter(WorkflowRun.objects.all())

    status = form.selected_status()
    status_tabs = [
        {"value": None, "label": _("all"), **capped_count(runs), "selected": not status}
    ] + [
        {
            "value": value,
            "label": label,
            **capped_count(runs.filter(status=value)),
            "selected": status == value,
        }
        for value, label in WorkflowRun.Status.choices
    ]
    if status:
        runs = runs.filter(status=status)

    runs = cast(WorkflowRunQuerySet, runs).with_current_step().order_by("-created_at", "-pk")
    page = CappedPaginator(runs, RUNS_PER_PAGE).get_page(request.GET.get("page"))
    selected_workflow = form.cleaned_data.get("workflow", "")
    selected_queue = form.cleaned_data.get("queue", "")
    context = {
        "form": form,
        "page": page,
        "status_tabs": status_tabs,
        "count_cap": COUNT_CAP,
        "capped": next(tab["more"] for tab in status_tabs if tab["selected"]),
        "workflow_names": WorkflowRun.objects.names_to_offer(
            "workflow_name", workflow_names(), selected_workflow
        ),
        "selected_workflow": selected_workflow,
        "queue_names": WorkflowRun.objects.names_to_offer(
            "queue", configured_queues(), selected_queue
        ),
        "selected_queue": selected_queue,
        "schedule_names": WorkflowSchedule.objects.in_namespace(app_settings.NAMESPACE)
        .order_by("name")
        .values_list("name", flat=True),
        "selected_schedule": form.cleaned_data.get("schedule", ""),
        "selected_subject": selected_subject(form),
        "refresh_seconds": REFRESH_SECONDS if any(not run.is_finished for run in page) else None,
    }
    return render(request, "django_openworkflow/run_list.html", context)


def selected_subject(form: RunFilterForm) -> dict[str, Any] | None:
    """The run list's subject filter as the page shows it: the value, and the object's name
    (or its type and id when it is gone, or the value when it names nothing)."""
    value = form.data.get("subject") or ""
    if not value:
        return None
    subject = form.cleaned_data.get("subject")
    if subject is None:
        return {"value": value, "label": value, "valid": False}
    obj = load_subject(*subject)
    if obj is not None:
        label = str(obj)
    else:
        model = model_of(subject[0])
        name = model._meta.verbose_name if model is not None else _("deleted model")
        label = f"{name} {subject[1]}"
    return {"value": value, "label": label, "valid": True}


@require_safe
@run_permission_required()
def run_detail(request: HttpRequest, run_id: uuid.UUID) -> HttpResponse:
    run = get_object_or_404(WorkflowRun.objects.select_related("parent_step_attempt"), pk=run_id)
    attempts = list(run.step_attempts.order_by("id"))
    # prefetch, not a join: the users may live on another database than the events
    events = history(run.events.prefetch_related("by").order_by("at", "id"))
    active = not run.is_finished
    can_change = can_change_runs(request.user)
    now = timezone.now()
    resume_refusal = run.resume_refusal(now)
    context = {
        "run": run,
        "duration": duration_of(run, now=now),
        "generations": timeline(run, attempts, now=now, events=events),
        "attempt_count": len(attempts),
        "failed_attempt_count": sum(a.status == StepAttempt.Status.FAILED for a in attempts),
        "waiting": waiting_for(run, attempts),
        # A typo in start() or run_workflow(): no worker of this project will ever claim it.
        "unknown_workflow": active and get_workflow(run.workflow_name) is None,
        "events": events,
        "subject": subject_shown(run, request.user),
        "error": error_parts(run.error),
        # The buttons follow the rules the managers apply (WorkflowRun.can_resume/can_cancel).
        "can_resume": can_change and resume_refusal is None,
        "can_cancel": can_change and run.can_cancel(),
        # A failed run the button cannot resume: say why rather than hide it silently.
        "resume_refused": refusal_text(resume_refusal, run.status)
        if can_change and resume_refusal is Refusal.DEADLINE
        else None,
        # A run waiting to start while its queue's limit is full: which limit holds it.
        "slot_wait": slot_wait(run),
        **run_edits(request.user, run, resume_refusal, now),
        **run_workers(run),
        "refresh_seconds": REFRESH_SECONDS if active else None,
    }
    return render(request, "django_openworkflow/run_detail.html", context)


def run_edits(
    user: Any, run: WorkflowRun, resume_refusal: Refusal | None, now: datetime
) -> dict[str, Any]:
    """The run page's "Resume with changes" link and Rerun form, for those who may use them.

    They follow the managers' rules (``resume_refusal``, ``WorkflowRun.rerun_refusal``):
    ``can_correct``, a failed run Resume would resume, for a user who may
    correct; ``can_rerun``, a finished run (completed, failed, canceled) before
    its deadline, for a user who may change runs, with ``rerun_steps``, the
    steps the chooser offers (the run's stored path). A finished run past its
    deadline gets ``rerun_refused`` instead: why.
    """
    may_change = can_change_runs(user)
    rerun_refusal = run.rerun_refusal(now) if may_change else Refusal.STATUS
    can_rerun = rerun_refusal is None
    return {
        "can_correct": resume_refusal is None and can_correct_runs(user),
        "can_rerun": can_rerun,
        "rerun_steps": run.stored_path() if can_rerun else [],  # each step once
        "rerun_refused": refusal_text(rerun_refusal, run.status)
        if rerun_refusal is Refusal.DEADLINE
        else None,
    }


def run_workers(run: WorkflowRun) -> dict[str, Any]:
    """The run page's worker context, from one query of the run's namespace's workers.

    ``holder``: the worker that holds a running run, with its ``state`` (None
    when the run is not running, or its worker has no row); ``unserved``: for
    an active run, why no live worker would take it (``workers.unserved_reason``).
    """
    if run.is_finished:
        return {"holder": None, "holder_id": None, "unserved": None, "live_worker_count": None}
    holder_id = run.worker_id if run.status == WorkflowRun.Status.RUNNING else None
    wanted = (live_q() | Q(pk=holder_id)) if holder_id else live_q()
    workers = list(
        WorkflowWorker.objects.using(run._state.db or app_settings.DATABASE)
        .in_namespace(run.namespace)
        .filter(wanted)
        .with_state()
    )
    live = [LiveWorker.of(w) for w in workers if w.state == LIVE]
    return {
        "holder": next((w for w in workers if w.pk == holder_id), None),
        "holder_id": holder_id,
        "unserved": unserved_reason(run.workflow_name, run.queue, live),
        "live_worker_count": len(live),
    }


@require_safe
@run_permission_required()
def queue_list(request: HttpRequest) -> HttpResponse:
    """The queues of this project's namespace: limits, counts, and what holds runs back."""
    queues = queue_overview(app_settings.NAMESPACE)
    context = {
        "namespace": app_settings.NAMESPACE,
        "queues": queues,
        "refresh_seconds": REFRESH_SECONDS if any(q.active for q in queues) else None,
    }
    return render(request, "django_openworkflow/queue_list.html", context)


@require_safe
@run_permission_required()
def schedule_list(request: HttpRequest) -> HttpResponse:
    """The schedules of this project's namespace: next tick, last run and its status, paused."""
    last_run = WorkflowRun.objects.filter(
        namespace=OuterRef("namespace"), schedule_name=OuterRef("name")
    ).order_by("-scheduled_at")
    schedules = (
        WorkflowSchedule.objects.in_namespace(app_settings.NAMESPACE)
        .annotate(
            last_run_id=Subquery(last_run.values("pk")[:1]),
            last_run_status=Subquery(last_run.values("status")[:1]),
            last_run_tick=Subquery(last_run.values("scheduled_at")[:1]),
        )
        .order_by("name")
    )
    context = {
        "namespace": app_settings.NAMESPACE,
        "schedules": schedules,
        "statuses": dict(WorkflowRun.Status.choices),
        "unknown_workflows": {s.workflow_name for s in schedules} - set(workflow_names()),
    }
    return render(request, "django_openworkflow/schedule_list.html", context)


@require_safe
@run_permission_required()
def worker_list(request: HttpRequest) -> HttpResponse:
    """The live workers, and those stopped or dead in the last day, of every namespace."""
    workers = sorted(
        WorkflowWorker.objects.recent().with_state(),
        key=lambda w: (w.state != LIVE, w.namespace, -w.last_seen_at.timestamp()),
    )
    context = {
        "workers": workers,
        "live_window": live_window(),
        "live_count": sum(w.state == LIVE for w in workers),
    }
    return render(request, "django_openworkflow/worker_list.html", context)


# --- transitions ---------------------------------------------------------------


def _back(request: HttpRequest, run_id: uuid.UUID) -> HttpResponseRedirect:
    """Redirect to a safe ``next`` (the admin change page, say) or to the run's page."""
    next_url = request.POST.get("next", "")
    if next_url and url_has_allowed_host_and_scheme(
        next_url, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return HttpResponseRedirect(next_url)
    return HttpResponseRedirect(reverse("django_openworkflow:run-detail", args=[run_id]))


# What a person sees when a step of a worker holds the run's row (or, on SQLite, the
# database) longer than OPENWORKFLOW["PAGE_LOCK_TIMEOUT"]: RunBusy.
BUSY_MESSAGE = gettext_lazy("This run is busy in a step; try again in a moment.")


def _transition(
    request: HttpRequest,
    run_id: uuid.UUID,
    transition: Callable[..., WorkflowRun],
    done: str,
    log_message: str,
) -> HttpResponse:
    """Apply a manager transition for the user; report it, or why it was refused (a run
    busy in a step: after ``PAGE_LOCK_TIMEOUT`` seconds)."""
    try:
        run = transition(run_id, by=request.user, lock_timeout=app_settings.PAGE_LOCK_TIMEOUT)
    except WorkflowRun.DoesNotExist:
        raise Http404(_("No workflow run with this id.")) from None
    except RunBusy:
        messages.error(request, BUSY_MESSAGE)
    except InvalidTransition as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, done % {"id": run_id})
        _log_admin_change(request, run, log_message)
    return _back(request, run_id)


def _log_admin_change(request: HttpRequest, run: WorkflowRun, message: str) -> None:
    """Write the change to the admin history too, as the admin actions do.

    After the change committed: a database too busy to take the entry (SQLite's
    "database is locked", a step holding it) loses the entry, logged, not the page.
    """
    assert request.user.pk is not None  # the views require a logged-in user
    using = run._state.db or app_settings.DATABASE
    try:
        log_run_change(run, request.user, message, using=using)
    except DatabaseError as exc:
        if not get_store(using).lock_wait_expired(exc):
            raise
        logger.error(
            "admin log entry not written run=%s user=%s error=%s", run.pk, request.user.pk, exc
        )


@require_POST
@run_permission_required(change=True)
def run_resume(request: HttpRequest, run_id: uuid.UUID) -> HttpResponse:
    return _transition(
        request, run_id, WorkflowRun.objects.resume, _("Run %(id)s resumed."), "Resumed"
    )


@require_POST
@run_permission_required(change=True)
def run_cancel(request: HttpRequest, run_id: uuid.UUID) -> HttpResponse:
    return _transition(
        request, run_id, WorkflowRun.objects.cancel, _("Run %(id)s canceled."), "Canceled"
    )


@require_POST
@run_permission_required(change=True)
def run_rerun(request: HttpRequest, run_id: uuid.UUID) -> HttpResponse:
    """Rerun a finished run from the start, or from the step chosen (``from_step``)."""
    from_step = request.POST.get("from_step") or None
    try:
        WorkflowRun.objects.rerun(
            run_id,
            from_step=from_step,
            by=request.user,
            lock_timeout=app_settings.PAGE_LOCK_TIMEOUT,
        )
    except WorkflowRun.DoesNotExist:
        raise Http404(_("No workflow run with this id.")) from None
    except RunBusy:
        messages.error(request, BUSY_MESSAGE)
    except (InvalidTransition, ValueError) as exc:  # active, past its deadline, unknown step
        messages.error(request, str(exc))
    else:
        # (the manager writes the admin history of a rerun)
        if from_step is None:
            done = _("Run %(id)s rerun from the start.") % {"id": run_id}
        else:
            done = _('Run %(id)s rerun from step "%(step)s".') % {"id": run_id, "step": from_step}
        messages.success(request, done)
    return _back(request, run_id)


# --- resume with changes ---------------------------------------------------------


@require_http_methods(["GET", "HEAD", "POST"])
@run_permission_required(correct=True)
def run_correct(request: HttpRequest, run_id: uuid.UUID) -> HttpResponse:
    """The "Resume with changes" page: a form (GET), its diff ("preview"), then the resume
    ("confirm"); "edit" goes back from the diff to the form as it was filled in.

    Nothing changes before "confirm", which hands the values to
    ``WorkflowRun.objects.resume(..., expected_generation=...)``: a run resumed
    or rerun since the form was made is refused there, under the row lock.
    """
    run = get_object_or_404(WorkflowRun, pk=run_id)
    failed = failed_steps(run)
    if request.method == "POST" and "confirm" in request.POST:
        return _correct_confirm(request, run, failed, *posted_forms(request.POST))
    refused = _correct_refusal(run)
    if refused is not None:
        return _correct_page(request, run, failed, refused=refused)
    if request.method != "POST":
        return _correct_page(request, run, failed, *blank_forms(run, failed))
    form, formset = posted_forms(request.POST)
    if "edit" in request.POST:
        return _correct_page(request, run, failed, form, formset)
    if not (form.is_valid() and formset.is_valid()):
        return _correct_page(request, run, failed, form, formset)
    if form.cleaned_data["generation"] != run.resume_generation:
        return _correct_page(
            request, run, failed, *blank_forms(run, failed), stale=form.cleaned_data["generation"]
        )
    correction = read_correction(run, form, formset)
    if correction is not None and (unknown := unknown_steps(correction, failed)):
        form.add_error(None, _unknown_steps_error(run, unknown))
        correction = None
    if correction is None:
        return _correct_page(request, run, failed, form, formset)
    return _correct_page(
        request, run, failed, form, formset, diffs=correction_diffs(run, correction, failed)
    )


def _correct_confirm(
    request: HttpRequest, run: WorkflowRun, failed: list[Any], form: Any, formset: Any
) -> HttpResponse:
    """Resume the run with the posted values (checked again here and by the manager)."""
    if not (form.is_valid() and formset.is_valid()):
        refused = _correct_refusal(run)
        return _correct_page(request, run, failed, form, formset, refused=refused)
    correction = read_correction(run, form, formset)
    if correction is None:
        return _correct_page(request, run, failed, form, formset)
    try:
        WorkflowRun.objects.resume(
            run.pk,
            by=request.user,
            lock_timeout=app_settings.PAGE_LOCK_TIMEOUT,
            **correction.resume_kwargs(),
        )
    except WorkflowRun.DoesNotExist:
        raise Http404(_("No workflow run with this id.")) from None
    except RunBusy:  # the form as it was filled in, to confirm again in a moment
        form.add_error(None, BUSY_MESSAGE)
        return _correct_page(
            request, run, failed, form, formset, diffs=correction_diffs(run, correction, failed)
        )
    except InvalidTransition as exc:  # not failed (any more), resumed or rerun meanwhile
        messages.error(request, str(exc))
    except (ValueError, TypeError) as exc:  # a value or a step the manager refused
        form.add_error(None, str(exc))
        return _correct_page(request, run, failed, form, formset)
    else:  # (the manager writes the admin history of a correction)
        messages.success(request, _("Run %(id)s resumed with changes.") % {"id": run.pk})
    return HttpResponseRedirect(reverse("django_openworkflow:run-detail", args=[run.pk]))


def _correct_refusal(run: WorkflowRun) -> str | None:
    """Why the run cannot be resumed with changes now ("it is completed"), or None."""
    refusal = run.resume_refusal()
    return None if refusal is None else refusal_text(refusal, run.status)


def _unknown_steps_error(run: WorkflowRun, names: list[str]) -> str:
    return _(
        "Run %(id)s has no failed step %(steps)s in its current generation: it may have "
        "changed since this form was made."
    ) % {"id": run.pk, "steps": ", ".join(f'"{name}"' for name in names)}


def _correct_page(
    request: HttpRequest,
    run: WorkflowRun,
    failed: list[Any],
    form: Any = None,
    formset: Any = None,
    *,
    refused: str | None = None,
    stale: int | None = None,
    diffs: list[Any] | None = None,
) -> HttpResponse:
    """The form (``diffs`` None), the diff with the confirm button, or why it cannot be."""
    errors = {step.name: step.error_text for step in failed}
    steps = (
        [(step_form, errors.get(step_form["name"].value(), "")) for step_form in formset.forms]
        if formset is not None
        else []
    )
    context = {
        "run": run,
        "refused": refused,
        "stale": stale,
        "form": form,
        "formset": formset,
        "steps": steps,
        "diffs": diffs,
    }
    return render(request, "django_openworkflow/run_correct.html", context)
