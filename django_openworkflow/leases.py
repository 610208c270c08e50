"""Named leases: one holder at a time across every worker of the cluster.

A lease is a ``WorkflowLease`` row. It is taken with one conditional
``UPDATE`` (the row exists and its ``expires_at`` has passed) or, the first
time, an ``INSERT`` that a concurrent taker's primary key makes fail: the same
statements on PostgreSQL, MariaDB/MySQL and SQLite, and no session state
(an advisory lock lives as long as a connection, which Django may close
between two batches). Time is the database's clock. A holder that dies
simply lets its lease expire; a holder that outlives its lease finds it gone
when it ``renew``s and stops.
"""

from __future__ import annotations

from django.db import IntegrityError, transaction

from .clock import Now
from .managers import now_plus


def take(name: str, holder: str, seconds: float, *, using: str) -> bool:
    """Take the lease ``name`` for ``seconds`` if nobody holds it; whether it was taken."""
    from .models import WorkflowLease

    leases = WorkflowLease.objects.using(using)
    with transaction.atomic(using=using):
        if leases.filter(name=name, expires_at__lte=Now()).update(
            holder=holder, expires_at=now_plus(seconds)
        ):
            return True
        if leases.filter(name=name).exists():
            return False
        try:
            with transaction.atomic(using=using):
                leases.create(name=name, holder=holder, expires_at=now_plus(seconds))
        except IntegrityError:  # another holder inserted it first
            return False
    return True


def renew(name: str, holder: str, seconds: float, *, using: str) -> bool:
    """Hold the lease ``seconds`` more from now; False when ``holder`` lost it."""
    from .models import WorkflowLease

    leases = WorkflowLease.objects.using(using).filter(name=name, holder=holder)
    return bool(leases.update(expires_at=now_plus(seconds)))
