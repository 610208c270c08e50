"""What the admin of runs and the admin of their subjects share.

The actions (``RunTransitions``): apply a transition to each run, count,
report. Used by ``WorkflowRunAdmin`` (the runs' own changelist) and by
``WorkflowRunsMixin`` (the changelist of the runs' subjects), so a resume or
a cancel from either reads the same: "2 runs resumed.", "1 run skipped: it
is completed.", "1 run skipped: it is busy in a step.", and each change is in
the run's admin history. And ``ShownOnly``: the inlines of records the engine
owns (steps, events, an object's runs), which nobody adds, changes or deletes
in the admin.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from django.contrib import admin, messages
from django.db import DatabaseError
from django.http import HttpRequest
from django.utils.translation import gettext as _
from django.utils.translation import ngettext

from .conf import app_settings
from .display import refusal_text
from .exceptions import InvalidTransition, RunBusy
from .models import WorkflowRun
from .store import get_store

logger = logging.getLogger(__name__)


def resumed_message(count: int) -> str:
    return ngettext("%(count)d run resumed.", "%(count)d runs resumed.", count)


def canceled_message(count: int) -> str:
    return ngettext("%(count)d run canceled.", "%(count)d runs canceled.", count)


def rerun_message(count: int) -> str:
    return ngettext(
        "%(count)d run rerun from the start.", "%(count)d runs rerun from the start.", count
    )


if TYPE_CHECKING:
    _ModelAdmin = admin.ModelAdmin[Any]
else:
    _ModelAdmin = object


class RunTransitions(_ModelAdmin):
    """A mixin for a ``ModelAdmin``: apply a manager transition to runs, report with counts.

    Uses the ``ModelAdmin``'s ``message_user`` and ``log_change``.
    """

    def _transition_each(
        self,
        request: HttpRequest,
        queryset: Iterable[WorkflowRun],
        transition: Callable[..., WorkflowRun],
        *,
        log_message: str | None,
        done: Callable[[int], str],
    ) -> None:
        """Apply ``transition`` to each run; count the changed and the skipped, by reason.

        Each change is written to the admin history with ``log_message``, unless
        it is None (the transition writes it itself, as ``rerun()`` does). A run
        whose row a step holds longer than ``OPENWORKFLOW["PAGE_LOCK_TIMEOUT"]``
        is skipped as "busy in a step" (``RunBusy``), and the others go on; the
        action waits that long once, not once per run: after a busy run, the
        others are skipped at once when busy (``lock_timeout=0``).
        """
        changed = 0
        skipped: Counter[str] = Counter()
        lock_timeout = app_settings.PAGE_LOCK_TIMEOUT
        for run in queryset:
            try:
                run = transition(run, by=request.user, lock_timeout=lock_timeout)
            except InvalidTransition as exc:  # why, from the manager's own decision
                skipped[refusal_text(exc.reason, exc.status)] += 1
                if isinstance(exc, RunBusy):
                    lock_timeout = 0.0  # the person waited once already
            except WorkflowRun.DoesNotExist:
                skipped[_("it no longer exists")] += 1
            else:
                changed += 1
                if log_message is not None:
                    self._log_change(request, run, log_message)
        self.message_user(
            request,
            done(changed) % {"count": changed},
            messages.SUCCESS if changed else messages.WARNING,
        )
        self._report_skipped(request, skipped)

    def _log_change(self, request: HttpRequest, run: WorkflowRun, message: str) -> None:
        """The admin history entry of a change that committed: a database too busy to take
        it (SQLite's "database is locked", a step holding it) loses the entry, logged, not
        the page (the change stands)."""
        try:
            self.log_change(request, run, message)
        except DatabaseError as exc:
            if not get_store(run._state.db or app_settings.DATABASE).lock_wait_expired(exc):
                raise
            logger.error(
                "admin log entry not written run=%s user=%s error=%s",
                run.pk,
                request.user.pk,
                type(exc).__name__,
            )

    def _report_skipped(self, request: HttpRequest, skipped: Counter[str]) -> None:
        for reason, count in sorted(skipped.items()):
            self.message_user(
                request,
                ngettext(
                    "%(count)d run skipped: %(reason)s.",
                    "%(count)d runs skipped: %(reason)s.",
                    count,
                )
                % {"count": count, "reason": reason},
                messages.WARNING,
            )


class ShownOnly:
    """For an inline: its rows are shown, never added, changed or deleted."""

    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
