"""The admin's history (``django.contrib.admin``'s ``LogEntry``) of what people did to runs.

One helper for everyone who records a change there: the managers (a resume
with changes, a rerun: whoever calls them, the shell included), and the
run pages (a plain resume or cancel, as the admin actions' ``log_change``
does).
"""

from __future__ import annotations

import logging
from typing import Any

from django.apps import apps
from django.db import router, transaction

logger = logging.getLogger(__name__)


def log_run_change(run: Any, by: Any, message: str, *, using: str) -> None:
    """Record ``message`` as a change of ``run`` by the user ``by`` in the admin's history.

    Nothing when the admin app is not installed or ``by`` is no saved user
    (None, say: a change made from code). ``using`` is the database of the
    change: when ``LogEntry`` lives there too, the entry is written in the
    change's transaction (both commit, or neither); otherwise once that
    transaction has committed (at once outside one), and a failure to write
    it is logged, not raised: the change itself stands.
    """
    user_id = getattr(by, "pk", None)
    if user_id is None or not apps.is_installed("django.contrib.admin"):
        return
    from django.contrib.admin.models import CHANGE, LogEntry

    def write() -> None:
        LogEntry.objects.log_actions(
            user_id=user_id,
            queryset=[run],
            action_flag=CHANGE,
            change_message=message,
            single_object=True,
        )

    def write_after_commit() -> None:
        try:
            write()
        except Exception as exc:  # the change committed; the entry is the lesser loss
            logger.error(
                "admin log entry not written run=%s user=%s error=%s",
                run.pk,
                user_id,
                type(exc).__name__,
                exc_info=exc,
            )

    if router.db_for_write(LogEntry) == using:
        write()
    else:
        transaction.on_commit(write_after_commit, using=using)
