"""The ``failover`` scenario: a primary with a synchronous standby, promoted under load.

The target is a :class:`pgwarden.testing.StandbyPair`; every client gets the same
multi-host URL (both nodes, ``target_session_attrs=read-write``), so each library's own
way of finding the primary is what is measured. The plan (see
:mod:`pgwarden.stress.scenarios`) fails over twice, so each client's run starts and ends
with the same node as primary:

1. ``failover_fence``: the primary turns read-only in place (its sessions stay open: reads
   work, writes fail with 25006), then the standby is promoted;
2. ``rejoin``: the old primary comes back as a synchronous standby of the new one
   (``pg_rewind``), which restarts it: sessions still open there break;
3. ``failover_crash``: the primary is killed (SIGQUIT), the standby promoted;
4. ``rejoin`` again.

Per client and promotion (:func:`figures`): the time from promotion to the first
successful write issued after it, writes that failed with 25006 after it ("stuck" on the
old primary, and for how long), and, from the whole run, acknowledged writes missing on
the final primary (``lost_writes``, as in every scenario). Promotion is the moment the
new primary was first seen out of recovery (polled every 2 ms).

Standard library only at import: the harness and the report import this module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["ACTIONS", "apply", "describe", "figures", "open_pair", "reset"]

#: Fault actions this module carries out (the harness's Injector hands them over).
ACTIONS = ("failover_fence", "failover_crash", "rejoin")

#: Write requests (plain writes and ORM units of work) in the worker's records.
_WRITES = ("w", "o")


# --------------------------------------------------------------------------------------------
# The target


def open_pair(target: Any, plan: Any, say: Any) -> None:
    """Start the pair with the plan's settings and prepare it as the harness prepares its
    own server (schema, the clients' role); point ``target`` at it."""
    from pgwarden._redact import redact
    from pgwarden.stress.targets import ROLE, HarnessError, prepare_schema_and_role
    from pgwarden.testing import StandbyPair

    try:
        pair = StandbyPair(dict(plan.server_settings))
        target.closers.append(pair.close)
        pair.start()
    except Exception as exc:
        raise HarnessError(f"cannot start a primary and its standby: {redact(str(exc))}") from exc
    target.pair = pair
    _point_admin_at(target, pair.primary)
    password = prepare_schema_and_role(target)
    target.server_version = str(pair.primary.version)
    target.client_url = pair.url_for(user=ROLE, password=password)
    a, b = pair.nodes
    target.description = (
        f"a primary and a synchronous standby (PostgreSQL {target.server_version}) on "
        f"127.0.0.1:{a.port},{b.port}; every client has both hosts, "
        "target_session_attrs=read-write"
    )


def _point_admin_at(target: Any, server: Any) -> None:
    target.admin_params = {
        "host": str(server.socket_dir),
        "port": server.port,
        "user": server.user,
        "dbname": server.dbname,
    }


def apply(action: str, target: Any, t_go: float) -> dict[str, Any]:
    """Carry out one of :data:`ACTIONS`; returns what the fault record should add
    (``promoted_at`` relative to ``t_go``, a ``detail`` line)."""
    from pgwarden.stress.targets import ADMIN_APP

    pair = target.pair
    if action == "rejoin":
        seconds = pair.rejoin("rewind")
        return {"detail": f"back as a synchronous standby in {seconds:.2f}s (pg_rewind)"}
    demote = "fence" if action == "failover_fence" else "crash"
    old = pair.primary
    record = pair.failover(demote)
    _point_admin_at(target, pair.primary)
    if demote == "fence":
        # The harness's sampler keeps one session open; it must count on the new primary.
        with contextlib.suppress(Exception):
            old.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s AND pid <> pg_backend_pid()",
                [ADMIN_APP],
            )
    promotion_ms = round(record.promotion_seconds * 1000, 1)
    detail = f"promoted in {promotion_ms:g} ms"
    if record.terminated:
        detail += f"; {record.terminated} transaction(s) older than the fence terminated"
    return {
        "promoted_at": round(record.promoted_at - t_go, 4),
        "promotion_ms": promotion_ms,
        "demote": demote,
        "detail": detail,
    }


def reset(target: Any) -> None:
    """Between clients: both nodes up, the first one primary with the second streaming
    from it, and no client session left on either."""
    from pgwarden.stress.targets import APP_PREFIX

    pair = target.pair
    if pair.demoted is not None:
        pair.rejoin("rewind")
    if pair.primary is not pair.nodes[0]:
        pair.failover("fence")
        pair.rejoin("rewind")
    _point_admin_at(target, pair.primary)
    for node in pair.nodes:
        with contextlib.suppress(Exception):
            node.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name LIKE %s AND pid <> pg_backend_pid()",
                [APP_PREFIX + "%"],
            )


# --------------------------------------------------------------------------------------------
# Figures


def figures(
    records: Sequence[Sequence[Any]],
    faults: Sequence[Mapping[str, Any]],
    client_stats: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Per promotion: the first successful write issued after it (seconds from it; None:
    none succeeded before the next failover or the end), the writes issued after it and
    how many failed, and the writes that failed with 25006 ("stuck": ``read_only``) after
    it, and until when. ``records`` are ``[start, latency, op, kind]`` relative to the
    run's start, like the fault times."""
    promotions = [f for f in faults if f.get("promoted_at") is not None]
    starts = [float(f["start"]) for f in faults if f.get("promoted_at") is not None]
    per: list[dict[str, Any]] = []
    for i, fault in enumerate(promotions):
        at = float(fault["promoted_at"])
        until = starts[i + 1] if i + 1 < len(starts) else float("inf")
        issued = [r for r in records if r[2] in _WRITES and at <= float(r[0]) < until]
        done = [float(r[0]) + float(r[1]) for r in issued if r[3] == "ok"]
        stuck_ends = [
            float(r[0]) + float(r[1])
            for r in records
            if r[2] in _WRITES and r[3] == "read_only" and at <= float(r[0]) + float(r[1]) < until
        ]
        per.append(
            {
                "label": fault["label"],
                "demote": fault.get("demote"),
                "promoted_at": at,
                "promotion_ms": fault.get("promotion_ms"),
                "first_write_s": round(min(done) - at, 4) if done else None,
                "writes_issued": len(issued),
                "writes_failed": sum(1 for r in issued if r[3] != "ok"),
                "stuck_writes": len(stuck_ends),
                "stuck_for_s": round(max(stuck_ends) - at, 3) if stuck_ends else 0.0,
            }
        )
    firsts = [p["first_write_s"] for p in per]
    errors = (client_stats or {}).get("errors")
    seen = int(errors.get("failover", 0)) if isinstance(errors, Mapping) else None
    return {
        "promotions": per,
        "first_write_s": None if not firsts or None in firsts else max(firsts),
        "never": sum(1 for f in firsts if f is None),
        "stuck_writes": sum(p["stuck_writes"] for p in per),
        # 25006 met inside the client, which retried the write (the clients on pgwarden
        # count them); None for a client that keeps no such count.
        "read_only_errors_absorbed": seen,
    }


def _seconds(value: float | None) -> str:
    if value is None:
        return "never"
    return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.2f}s"


def describe(results: Mapping[str, Mapping[str, Any]]) -> str | None:
    """One line for the report: per client, the worst time from promotion to the first
    write, stuck writes, lost writes; None when no result has failover figures."""
    parts = []
    for client, r in results.items():
        fo = r.get("failover")
        if not fo:
            continue
        promos = fo["promotions"]
        text = f"{client} first write {_seconds(fo['first_write_s'])}"
        if fo["never"]:
            text += f" ({fo['never']} of {len(promos)} never)"
        stuck = fo["stuck_writes"]
        text += f", {stuck} stuck"
        if stuck:
            text += f" (25006, up to {max(p['stuck_for_s'] for p in promos):.2f}s after)"
        text += f", {r.get('lost_writes', 0)} lost"
        parts.append(text)
    if not parts:
        return None
    return "   after promotion (worst of each failover): " + "; ".join(parts)
