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
