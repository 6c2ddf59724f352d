"""The ORM workload of the SQLAlchemy clients: declarative models and one unit of work.

Imported by the SQLAlchemy clients only when the scenario has ORM units of work
(``Workload.orm_share > 0``), so it is part of their cold start only then.

A unit of work is what an ORM application does for one request:

1. ``session.add(StressWrite(...))`` and ``session.flush()``: the parent row is inserted
   (``INSERT ... RETURNING seq``) so its key is known;
2. ``session.add_all(...)`` of :data:`LINES_PER_UNIT` ``StressLine`` rows that point at it
   (a foreign key), flushed at commit;
3. the caller commits (``session.commit()``, or ``pgwarden.sqlalchemy.run_transaction``).

The parent row goes to the same table as every other write, with the request id, so the
harness counts duplicates and lost acknowledged writes of units of work exactly as it
does for plain writes; the lines let it check that every committed unit is whole
(``torn``: a request id whose line count is not :data:`LINES_PER_UNIT` times its parent
rows, which only a unit committed in pieces can leave).
"""

from __future__ import annotations

import uuid

from sqlalchemy import BigInteger, ForeignKey, Integer, Text, Uuid
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from pgwarden.stress.clients import LINES_PER_UNIT, LINES_TABLE, TABLE

__all__ = ["LINES_PER_UNIT", "Base", "StressLine", "StressWrite", "unit_of_work"]


class Base(DeclarativeBase):
    pass


class StressWrite(Base):
    """A row of ``pgwarden_stress_writes`` (``created_at`` is left to its server default)."""

    __tablename__ = TABLE

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    run: Mapped[str] = mapped_column(Text)
    req_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    worker: Mapped[int] = mapped_column(Integer)


class StressLine(Base):
    """A row of ``pgwarden_stress_lines``: a child of one ``StressWrite``."""

    __tablename__ = LINES_TABLE

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    write_seq: Mapped[int] = mapped_column(ForeignKey(f"{TABLE}.seq"))
    run: Mapped[str] = mapped_column(Text)
    req_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    n: Mapped[int] = mapped_column(Integer)


def unit_of_work(session: Session, run: str, req_id: str, worker: int) -> None:
    """One request's unit of work, up to (not including) the commit."""
    rid = uuid.UUID(req_id)
    write = StressWrite(run=run, req_id=rid, worker=worker)
    session.add(write)
    session.flush()  # INSERT ... RETURNING seq: the lines need the parent's key
    session.add_all(
        [StressLine(write_seq=write.seq, run=run, req_id=rid, n=n) for n in range(LINES_PER_UNIT)]
    )
