"""From request records to the figures in the report. Pure functions, no I/O.

Definitions (they are also in ``docs/stress.md``):

* **success %**: requests that returned within their deadline, over all requests. A call
  that returned after its deadline counts as ``late`` (the caller had given up), one still
  running when the workers were stopped as ``hung``; both are failures here.
* **failed with deadline left**: failures (other than ``late`` and ``hung``) that came back
  having used less than 90% of their deadline: the client gave up while there was still
  time to succeed.
* **latency**: of every request, successful or not (``hung`` ones at the time they were
  cut off), nearest-rank percentiles.
* **peak conns**: the most client backends that ``pg_stat_activity`` showed at once
  (sampled every 100 ms from a separate admin connection).
* **recovery**: for each fault that ends (the server accepts again, the network heals,
  a backend was killed), the time from its end to the first request that completed
  successfully after it; the worst of them. ``never``: some fault was never followed by a
  success.
* **duplicates**: rows beyond the first for one request id (a write that ran twice).
* **lost writes**: writes the client acknowledged whose row is not in the table.
* **ORM units of work** (the SQLAlchemy clients, in some scenarios): each is also a write
  (its parent row carries the request id), so it counts in duplicates and lost writes; on
  their own they are reported as ``orm`` with their duplicates, lost ones, and **torn**
  ones: request ids whose child rows are not ``lines_per_unit`` times their parent rows (a
  unit committed in pieces).
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "DEADLINE_LEFT_SHARE",
    "orm_summary",
    "percentile",
    "recoveries",
    "summarize",
]

#: A failure that used less than this share of its deadline "had deadline left".
DEADLINE_LEFT_SHARE = 0.9

#: Most points per chart series kept in the JSON and HTML (failures are kept first).
MAX_POINTS = 2500

Record = Sequence[Any]  # [start, latency, op, kind] with start relative to the run's go


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile ``q`` (0-100) of already sorted values; None if empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def recoveries(
    records: Iterable[Record], faults: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """For each fault with ``recover``: seconds from its ``end`` to the first success."""
    completions = sorted(float(r[0]) + float(r[1]) for r in records if r[3] == "ok")
    out: list[dict[str, Any]] = []
    for fault in faults:
        if not fault.get("recover"):
            continue
        end = float(fault["end"])
        i = bisect.bisect_left(completions, end)
        seconds = completions[i] - end if i < len(completions) else None
        out.append({"fault": fault["label"], "at": round(end, 3), "seconds": _r(seconds, 4)})
    return out


def orm_summary(
    records: Sequence[Record],
    acked: Iterable[str],
    unacked: Iterable[str],
    rows: Mapping[str, int],
    line_rows: Mapping[str, int],
    *,
    lines_per_unit: int,
) -> dict[str, Any] | None:
    """The ORM units of work of one run (records with op ``o``), None if there were none.

    ``duplicates`` and ``lost`` as for every write, over the units' request ids; ``torn``:
    units whose child rows (``line_rows``) are not ``lines_per_unit`` per parent row.
    """
    units = [r for r in records if r[2] == "o"]
    if not units:
        return None
    acked_list = list(acked)
    unacked_list = list(unacked)
    ok = sum(1 for r in units if r[3] == "ok")
    torn = 0
    for rid in {*acked_list, *unacked_list}:
        if line_rows.get(rid, 0) != lines_per_unit * rows.get(rid, 0):
            torn += 1
    return {
        "units": len(units),
        "ok": ok,
        "failed": len(units) - ok,
        "acked": len(acked_list),
        "duplicates": sum(
            rows[rid] - 1 for rid in set(acked_list + unacked_list) if rows.get(rid, 0) > 1
        ),
        "lost": sum(1 for rid in acked_list if rid not in rows),
        "torn": torn,
        "unacked_committed": sum(1 for rid in unacked_list if rid in rows),
        "lines_per_unit": lines_per_unit,
    }


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _downsample(records: Sequence[Record], limit: int) -> list[list[Any]]:
    """Keep every failure (up to ``limit``) and an even stride of the successes."""
    bad = [r for r in records if r[3] != "ok"]
    good = [r for r in records if r[3] == "ok"]
    if len(bad) > limit // 2:
        step = len(bad) / (limit // 2)
        bad = [bad[int(i * step)] for i in range(limit // 2)]
    room = limit - len(bad)
    if len(good) > room:
        step = len(good) / max(1, room)
        good = [good[int(i * step)] for i in range(room)]
    points = sorted([*bad, *good], key=lambda r: float(r[0]))
    return [[round(float(r[0]), 3), round(float(r[1]) * 1000, 2), r[3], r[2]] for r in points]


def summarize(
    records: Sequence[Record],
    *,
    deadline: float,
    faults: Sequence[Mapping[str, Any]],
    samples: Sequence[tuple[float, int | None]],
    acked: Iterable[str],
    unacked: Iterable[str],
    rows: Mapping[str, int],
    first_ok: Sequence[float | None] = (),
    orm_acked: Iterable[str] = (),
    orm_unacked: Iterable[str] = (),
    line_rows: Mapping[str, int] | None = None,
    lines_per_unit: int = 2,
) -> dict[str, Any]:
    """The result of one client in one scenario.

    ``records`` have their start relative to the run's start; ``rows`` maps each request
    id found in the table to how many rows it has; ``first_ok`` is, per worker process,
    the time of its first success (None if it had none). ``orm_acked``/``orm_unacked``
    are the request ids of the ORM units of work (also in ``acked``/``unacked``) and
    ``line_rows`` their child rows per request id (see :func:`orm_summary`).
    """
    total = len(records)
    kinds = Counter(str(r[3]) for r in records)
    ok = kinds.pop("ok", 0)
    limit = deadline * DEADLINE_LEFT_SHARE
    left = sum(1 for r in records if r[3] not in ("ok", "late", "hung") and float(r[1]) < limit)
    latencies = sorted(float(r[1]) for r in records)
    peak = max((n for _, n in samples if n is not None), default=None)
    recs = recoveries(records, faults)
    if not recs:
        recovery: float | None = None
        unrecovered = 0
    else:
        unrecovered = sum(1 for r in recs if r["seconds"] is None)
        recovery = None if unrecovered else max(float(r["seconds"]) for r in recs)
    acked_list = list(acked)
    unacked_list = list(unacked)
    duplicates = sum(n - 1 for n in rows.values() if n > 1)
    lost = sum(1 for rid in acked_list if rid not in rows)
    committed_anyway = sum(1 for rid in unacked_list if rid in rows)
    writes = sum(1 for r in records if r[2] in ("w", "o"))
    reached = [t for t in first_ok if t is not None]
    reached.sort()

    def ms(q: float) -> float | None:
        value = percentile(latencies, q)
        return None if value is None else round(value * 1000, 2)

    return {
        "requests": total,
        "ok": ok,
        "success_pct": round(100.0 * ok / total, 2) if total else None,
        "failed": total - ok,
        "failed_with_deadline_left": left,
        "errors": dict(sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0]))),
        "latency_ms": {"p50": ms(50), "p95": ms(95), "p99": ms(99), "max": ms(100)},
        "peak_server_connections": peak,
        "recovery_s": _r(recovery, 4),
        "unrecovered_faults": unrecovered,
        "recoveries": recs,
        "writes": writes,
        "writes_acked": len(acked_list),
        "duplicates": duplicates,
        "lost_writes": lost,
        "unacked_writes_committed": committed_anyway,
        "orm": orm_summary(
            records,
            orm_acked,
            orm_unacked,
            rows,
            line_rows or {},
            lines_per_unit=lines_per_unit,
        ),
        "processes": len(first_ok),
        "processes_without_success": len(first_ok) - len(reached),
        "first_success_s": {
            "p50": _r(percentile(reached, 50)),
            "max": _r(reached[-1] if reached else None),
        },
        "series": {
            "requests": _downsample(records, MAX_POINTS),
            "connections": [[round(t, 2), n] for t, n in samples],
        },
    }
