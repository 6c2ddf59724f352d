"""The stress tables as Django models (unmanaged: the harness creates the tables).

The same rows as :mod:`pgwarden.stress.orm` (the SQLAlchemy models): a unit of work is a
`StressWrite` (the request's id, in the table every client writes to) and
``LINES_PER_UNIT`` `StressLine` children, so duplicates, lost acknowledged writes and
torn units are counted the same way for every client.
"""

from __future__ import annotations

from django.db import models

from pgwarden.stress.clients import LINES_TABLE, TABLE


class StressWrite(models.Model):  # type: ignore[misc]
    """A row of ``pgwarden_stress_writes`` (``created_at`` is left to its server default)."""

    seq = models.BigAutoField(primary_key=True)
    run = models.TextField()
    req_id = models.UUIDField()
    worker = models.IntegerField()

    class Meta:
        app_label = "pgwarden_stress"
        db_table = TABLE
        managed = False


class StressLine(models.Model):  # type: ignore[misc]
    """A row of ``pgwarden_stress_lines``: a child of one `StressWrite`."""

    seq = models.BigAutoField(primary_key=True)
    write = models.ForeignKey(
        StressWrite, on_delete=models.DO_NOTHING, db_column="write_seq", db_constraint=False
    )
    run = models.TextField()
    req_id = models.UUIDField()
    n = models.IntegerField()

    class Meta:
        app_label = "pgwarden_stress"
        db_table = LINES_TABLE
        managed = False
