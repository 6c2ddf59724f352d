"""A unit of work writes a `Write` (its request id: no unique constraint, so one
committed twice shows as two rows) and increments its worker's `Total` in the same
transaction; the two must never be split."""

from __future__ import annotations

from django.db import models


class Write(models.Model):  # type: ignore[misc]
    request_id = models.CharField(max_length=64)
    worker = models.IntegerField()

    class Meta:
        app_label = "faultapp"
        db_table = "dj_fault_writes"


class Total(models.Model):  # type: ignore[misc]
    worker = models.IntegerField(primary_key=True)
    n = models.IntegerField()

    class Meta:
        app_label = "faultapp"
        db_table = "dj_fault_totals"
