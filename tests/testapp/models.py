import uuid

from django.db import models


class SideEffect(models.Model):
    """One row each time a step function really executes (counts re-executions)."""

    run_id = models.UUIDField()
    step = models.CharField(max_length=100)
    pid = models.IntegerField(default=0)
    at = models.DateTimeField(auto_now_add=True)

    def __str__(self):
        return f"{self.step} of {self.run_id}"


class Ledger(models.Model):
    """Rows written by step.atomic functions."""

    run_id = models.UUIDField()
    note = models.CharField(max_length=100)

    def __str__(self):
        return f"{self.note} for {self.run_id}"


# --- subjects of runs (tests/test_subjects.py): one per kind of primary key ------------


class Invoice(models.Model):
    """A subject with an integer primary key."""

    number = models.CharField(max_length=50)

    def __str__(self):
        return f"Invoice {self.number}"


class Parcel(models.Model):
    """A subject with a UUID primary key."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    label = models.CharField(max_length=50)

    def __str__(self):
        return f"Parcel {self.label}"


class Coupon(models.Model):
    """A subject with a text primary key."""

    code = models.CharField(max_length=50, primary_key=True)

    def __str__(self):
        return f"Coupon {self.code}"
