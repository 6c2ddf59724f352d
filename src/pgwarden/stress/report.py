"""The stress report: a terminal table per scenario, a JSON file, a self-contained HTML page.

The HTML page has no script and loads nothing: its charts are inline SVG drawn here, so it
opens offline and from a mail attachment alike.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pgwarden.stress import failover
from pgwarden.stress.clients import PGWARDEN_CLIENTS

__all__ = [
    "fmt_orm",
    "format_scenario",
    "format_summary",
    "invariant_failures",
    "render_html",
    "render_markdown",
    "write_html",
    "write_json",
    "write_markdown",
]

COLUMNS = (
    ("client", "<"),
    ("reqs", ">"),
    ("success", ">"),
    ("fail-left", ">"),
    ("p50", ">"),
    ("p95", ">"),
    ("p99", ">"),
    ("max", ">"),
    ("conns", ">"),
    ("recovery", ">"),
    ("dups", ">"),
    ("lost", ">"),
    ("errors", "<"),
)

CLIENT_COLORS = {
    "pgwarden": "#2563eb",
    "psycopg_pool": "#d97706",
    "sqlalchemy": "#7c3aed",
    "sqlalchemy-pgwarden": "#db2777",
    "django": "#0891b2",
    "django-pgwarden": "#65a30d",
    "naive": "#059669",
    "pgwarden+budget": "#1e3a8a",
}
#: The processes of the fleet chart, by wave (a wave's processes share a hue).
_WAVE_COLORS = ("#2563eb", "#d97706", "#059669", "#db2777", "#7c3aed", "#0891b2")
_KIND_COLORS = {"ok": "#16a34a", "late": "#f59e0b", "hung": "#7f1d1d"}
_FAIL = "#dc2626"


# --------------------------------------------------------------------------------------------
# Formatting helpers


def fmt_ms(ms: float | None) -> str:
    """``0.8ms``, ``12ms``, ``1.25s``; ``-`` for None."""
    if ms is None:
        return "-"
    if ms < 10:
        return f"{ms:.1f}ms"
    if ms < 1000:
        return f"{ms:.0f}ms"
    return f"{ms / 1000:.2f}s"


def fmt_recovery(result: dict[str, Any]) -> str:
    if not result.get("recoveries"):
        return "-"
    if result.get("unrecovered_faults"):
        return "never"
    return fmt_ms(float(result["recovery_s"]) * 1000)


def fmt_errors(errors: dict[str, int], limit: int = 4) -> str:
    if not errors:
        return "-"
    items = list(errors.items())
    text = ", ".join(f"{kind} {n}" for kind, n in items[:limit])
    if len(items) > limit:
        text += f", +{len(items) - limit} more"
    return text


def fmt_success(r: dict[str, Any]) -> str:
    """``100%`` only when nothing failed; otherwise rounded down, so 9995/10000 is 99.95%."""
    if not r["requests"]:
        return "-"
    if r["ok"] == r["requests"]:
        return "100%"
    return f"{math.floor(10000 * r['ok'] / r['requests']) / 100:.2f}%"


def fmt_orm(r: dict[str, Any]) -> str | None:
    """The ORM units of work of one result in a line, None if it ran none."""
    orm = r.get("orm")
    if not orm:
        return None
    counters = r.get("client_stats") or {}
    reruns = ""
    if isinstance(counters.get("orm_attempts"), int) and isinstance(counters.get("orm_units"), int):
        reruns = f", {counters['orm_attempts'] - counters['orm_units']} re-run(s)"
    text = (
        f"ORM units of work {orm['units']} ({orm['ok']} ok, {orm['failed']} failed{reruns}): "
        f"{orm['duplicates']} duplicate(s), {orm['lost']} lost, {orm['torn']} torn"
    )
    if orm.get("unacked_committed"):
        text += f", {orm['unacked_committed']} failed but committed"
    return text


def _row(client: str, r: dict[str, Any]) -> list[str]:
    lat = r["latency_ms"]
    return [
        client,
        str(r["requests"]),
        fmt_success(r),
        str(r["failed_with_deadline_left"]),
        fmt_ms(lat["p50"]),
        fmt_ms(lat["p95"]),
        fmt_ms(lat["p99"]),
        fmt_ms(lat["max"]),
        "-" if r["peak_server_connections"] is None else str(r["peak_server_connections"]),
        fmt_recovery(r),
        str(r["duplicates"]),
        str(r["lost_writes"]),
        fmt_errors(r["errors"]),
    ]


def format_table(rows: Sequence[Sequence[str]]) -> list[str]:
    header = [name for name, _ in COLUMNS]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(COLUMNS))]
    lines = []
    for row in [header, *rows]:
        cells = []
        for i, (_, align) in enumerate(COLUMNS):
            cell = str(row[i])
            last = i == len(COLUMNS) - 1
            cells.append(cell if last else f"{cell:{align}{widths[i]}}")
        lines.append("  ".join(cells).rstrip())
    return lines


def describe_params(entry: Mapping[str, Any]) -> str:
    p = entry["params"]
    parts = [
        f"{p['processes']} processes x {p['threads']} threads",
        f"pool {p['pool_size']}",
        f"deadline {p['deadline_s']:g}s",
    ]
    settings = p.get("server_settings") or {}
    if settings:
        parts.append(", ".join(f"{k}={v}" for k, v in settings.items()))
    if p["faults"]:
        faults = [f"{f['label']} @{f['at']:g}s" for f in p["faults"][:4]]
        more = len(p["faults"]) - 4
        parts.append("faults: " + "; ".join(faults) + (f"; +{more} more" if more > 0 else ""))
    return ", ".join(parts)


def format_scenario(entry: Mapping[str, Any]) -> str:
    """The terminal table (and notes) of one scenario."""
    title = f"{entry['name']}: {entry['title']}"
    if entry.get("skipped"):
        return f"== {title}: SKIPPED: {entry['skipped']}"
    lines = [f"== {title}", f"   {describe_params(entry)}"]
    if entry.get("target"):
        lines.append(f"   target: {entry['target']}")
    results: dict[str, dict[str, Any]] = entry["results"]
    lines.extend(format_table([_row(client, r) for client, r in results.items()]))
    if entry["name"].endswith("storm"):
        firsts = []
        for client, r in results.items():
            fs = r["first_success_s"]
            missing = r["processes_without_success"]
            firsts.append(
                f"{client} p50 {fmt_ms(_ms(fs['p50']))} max {fmt_ms(_ms(fs['max']))}"
                + (f" ({missing} of {r['processes']} never)" if missing else "")
            )
        lines.append("   first success per process (from start): " + "; ".join(firsts))
        from_spawn = fmt_first_row(results)
        if from_spawn is not None:
            lines.append("   " + from_spawn)
    fleet = fmt_fleet(results)
    if fleet is not None:
        lines.append("   " + fleet)
    after_promotion = failover.describe(results)
    if after_promotion is not None:
        lines.append(after_promotion)
    for client, r in results.items():
        notes = []
        orm = fmt_orm(r)
        if orm is not None:
            notes.append(orm)
        if r.get("unacked_writes_committed"):
            notes.append(f"{r['unacked_writes_committed']} failed write(s) committed anyway")
        if r.get("worker_errors"):
            notes.append(f"worker problems: {r['worker_errors'][0]}")
        if r.get("harness_errors"):
            notes.append(f"harness: {r['harness_errors'][0]}")
        if notes:
            lines.append(f"   {client}: " + "; ".join(notes))
    return "\n".join(lines)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def fmt_first_row(results: dict[str, dict[str, Any]]) -> str | None:
    """Per client, from spawning a process to its first row (without the wait at the start
    barrier): median and worst; None when no result has the figure."""
    parts = []
    for client, r in results.items():
        fs = r.get("first_row_from_spawn_s")
        if not fs or fs.get("p50") is None:
            continue
        parts.append(f"{client} p50 {fmt_ms(_ms(fs['p50']))} max {fmt_ms(_ms(fs['max']))}")
    if not parts:
        return None
    return "from process spawn to first row (bytecode compiled): " + "; ".join(parts)


def fmt_fleet(results: dict[str, dict[str, Any]]) -> str | None:
    """The fleet figures in a line: per client, first success from arrival (median, worst,
    never) and each process's share of the connections while all were in."""
    parts = []
    for client, r in results.items():
        fleet = r.get("fleet")
        if not fleet:
            continue
        fs = fleet["first_success_s"]
        share = fleet["share_all_arrived"]
        text = f"{client} first success p50 {fmt_ms(_ms(fs['p50']))} max {fmt_ms(_ms(fs['max']))}"
        if fleet["never"]:
            text += f" ({fleet['never']} of {len(fleet['processes'])} never)"
        if share["min_pct"] is not None:
            text += f", share {share['min_pct']:g}-{share['max_pct']:g}%"
        parts.append(text)
    if not parts:
        return None
    return "per process, from its arrival; share of connections while all were in: " + (
        "; ".join(parts)
    )


def _is_pgwarden(name: str) -> bool:
    """A client on pgwarden, or a variant of one (``pgwarden+budget``)."""
    return name.partition("+")[0] in PGWARDEN_CLIENTS


def invariant_failures(report: Mapping[str, Any], client: str | None = None) -> list[str]:
    """pgwarden's hard invariants that failed: duplicates, lost acknowledged writes, and
    torn units of work, for ``client`` or (None) every client on pgwarden
    (:data:`~pgwarden.stress.clients.PGWARDEN_CLIENTS`)."""
    out = []
    for entry in report["scenarios"]:
        ran = list(entry.get("results", {}))
        names = [n for n in ran if _is_pgwarden(n)] if client is None else [client]
        for name in names:
            r = entry.get("results", {}).get(name)
            if r is None:
                continue
            where = entry["name"] if name == "pgwarden" else f"{entry['name']} ({name})"
            if r["duplicates"]:
                out.append(f"{where}: {r['duplicates']} duplicate write(s)")
            if r["lost_writes"]:
                out.append(f"{where}: {r['lost_writes']} lost acknowledged write(s)")
            orm = r.get("orm") or {}
            if orm.get("torn"):
                out.append(f"{where}: {orm['torn']} torn unit(s) of work")
    return out


def _pgwarden_clients(report: Mapping[str, Any]) -> list[str]:
    """The clients on pgwarden that ran in some scenario, in order."""
    ran = {c for e in report["scenarios"] if not e.get("skipped") for c in e["results"]}
    return [c for c in PGWARDEN_CLIENTS if c in ran]


def _invariants_line(report: Mapping[str, Any], failures: list[str]) -> str:
    clients = _pgwarden_clients(report)
    which = f", for {' and '.join(clients)}" if clients and clients != ["pgwarden"] else ""
    return f"pgwarden invariants (no duplicates, no lost acknowledged writes{which}): " + (
        "held" if not failures else "FAILED: " + "; ".join(failures)
    )


def format_summary(report: Mapping[str, Any], json_path: Path, html_path: Path) -> str:
    lines = []
    failures = invariant_failures(report)
    ran = [e for e in report["scenarios"] if not e.get("skipped")]
    clients = _pgwarden_clients(report)
    if clients:
        left = {
            c: sum(e["results"][c]["failed_with_deadline_left"] for e in ran if c in e["results"])
            for c in clients
        }
        if clients == ["pgwarden"]:
            counts = str(left["pgwarden"])
        else:
            counts = ", ".join(f"{c} {n}" for c, n in left.items())
        lines.append(f"{_invariants_line(report, failures)}; failures with deadline left: {counts}")
    for client, why in (report.get("options", {}).get("left_out") or {}).items():
        lines.append(f"left out: {client}: {why}")
    bytecode = fmt_bytecode(report)
    if bytecode is not None:
        lines.append(bytecode)
    lines.append(f"JSON:   {json_path}")
    lines.append(f"report: {html_path}")
    return "\n".join(lines)


def fmt_bytecode(report: Mapping[str, Any]) -> str | None:
    """What the harness compiled before spawning the workers, in a line (None: nothing)."""
    bytecode = report.get("bytecode")
    if not bytecode:
        return None
    done = [k for k, v in bytecode["packages"].items() if v != "not installed"]
    failed = [k for k, v in bytecode["packages"].items() if v == "errors"]
    return (
        f"bytecode: compiled {', '.join(done)} before spawning the workers, as an installed "
        "package has it"
        + (
            " (PYTHONDONTWRITEBYTECODE is set: the workers read it, write none)"
            if bytecode.get("dont_write_bytecode")
            else ""
        )
        + (f"; some modules of {', '.join(failed)} did not compile" if failed else "")
    )


def render_markdown(report: Mapping[str, Any]) -> str:
    """The tables as a Markdown document (for ``docs/benchmarks.md``), with the machine."""
    m = report["machine"]
    opts = report["options"]
    packages = ", ".join(f"{k} {v}" for k, v in m["packages"].items() if v)
    versions = sorted(
        {
            f"PostgreSQL {e['server_version']}"
            for e in report["scenarios"]
            if e.get("server_version")
        }
        | {
            f"PgBouncer {e['pgbouncer_version']}"
            for e in report["scenarios"]
            if e.get("pgbouncer_version")
        }
    )
    lines = [
        "## Stress scenarios (`pgwarden stress`)",
        "",
        f"Run {report['started_at']} to {report['finished_at']}"
        + (" (interrupted)" if report.get("interrupted") else "")
        + f", size `{opts['size']}`, deadline {opts['deadline_s']:g} s, target {opts['target']}.",
        "",
        f"Machine: {m['platform']}, {m['cpus']} CPUs, Python {m['python']}; {packages}"
        + (f"; {', '.join(versions)}" if versions else "")
        + (f"; load average at start {m['loadavg']}" if m.get("loadavg") else "")
        + ".",
        "",
    ]
    failures = invariant_failures(report)
    verdict = _invariants_line(report, failures)
    if failures:
        head, _, rest = verdict.partition(": FAILED: ")
        verdict = f"{head}: **FAILED**: {rest}"
    lines.append(verdict + ".")
    lines.append("")
    for entry in report["scenarios"]:
        lines += [f"### {entry['name']}: {entry['title']}", ""]
        if entry.get("skipped"):
            lines += [f"Skipped: {entry['skipped']}", ""]
            continue
        lines += ["```", format_scenario(entry), "```", ""]
    return "\n".join(lines)


def write_markdown(report: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_markdown(report), encoding="utf-8")


def write_json(report: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def write_html(report: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(report), encoding="utf-8")


# --------------------------------------------------------------------------------------------
# SVG charts


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


class _Frame:
    """A plot area with axes; maps data to pixels."""

    def __init__(
        self,
        width: int,
        height: int,
        x_max: float,
        y_min: float,
        y_max: float,
        *,
        log: bool,
    ) -> None:
        self.w, self.h = width, height
        self.left, self.right, self.top, self.bottom = 52, 12, 10, 26
        self.x_max = max(x_max, 1e-9)
        self.log = log
        self.y_min, self.y_max = y_min, max(y_max, y_min + 1e-9)

    def x(self, t: float) -> float:
        span = self.w - self.left - self.right
        return self.left + span * max(0.0, min(t, self.x_max)) / self.x_max

    def y(self, v: float) -> float:
        span = self.h - self.top - self.bottom
        if self.log:
            lo, hi = math.log10(self.y_min), math.log10(self.y_max)
            frac = (math.log10(max(v, self.y_min)) - lo) / (hi - lo)
        else:
            frac = (v - self.y_min) / (self.y_max - self.y_min)
        return self.top + span * (1 - max(0.0, min(frac, 1.0)))

    def axes(self, y_ticks: Sequence[tuple[float, str]]) -> list[str]:
        out = [
            f'<rect x="{self.left}" y="{self.top}" width="{self.w - self.left - self.right}" '
            f'height="{self.h - self.top - self.bottom}" fill="#fff" stroke="#cbd5e1"/>'
        ]
        for value, label in y_ticks:
            y = self.y(value)
            out.append(
                f'<line x1="{self.left}" x2="{self.w - self.right}" y1="{y:.1f}" y2="{y:.1f}" '
                'stroke="#eef2f7"/>'
                f'<text x="{self.left - 4}" y="{y + 3:.1f}" text-anchor="end">{_esc(label)}</text>'
            )
        step = _nice_step(self.x_max)
        t = 0.0
        for _ in range(200):
            if t > self.x_max + 1e-9:
                break
            x = self.x(t)
            out.append(
                f'<text x="{x:.1f}" y="{self.h - self.bottom + 14}" text-anchor="middle">'
                f"{t:g}s</text>"
            )
            t += step
        return out

    def faults(self, faults: Sequence[dict[str, Any]]) -> list[str]:
        out = []
        for f in faults:
            start, end = float(f["start"]), float(f.get("end") or f["start"])
            x0, x1 = self.x(start), self.x(end)
            title = f"<title>{_esc(f['label'])} {start:.2f}s-{end:.2f}s</title>"
            if x1 - x0 >= 1:
                out.append(
                    f'<rect x="{x0:.1f}" y="{self.top}" width="{x1 - x0:.1f}" '
                    f'height="{self.h - self.top - self.bottom}" fill="#fde68a" '
                    f'fill-opacity="0.45">{title}</rect>'
                )
            out.append(
                f'<line x1="{x0:.1f}" x2="{x0:.1f}" y1="{self.top}" '
                f'y2="{self.h - self.bottom}" stroke="#b45309" stroke-dasharray="4 3">'
                f"{title}</line>"
            )
        return out


def _nice_step(span: float) -> float:
    raw = span / 8
    for step in (0.5, 1, 2, 5, 10, 15, 20, 30, 60, 120, 300):
        if step >= raw:
            return float(step)
    return float(math.ceil(raw / 60) * 60)


def _svg(width: int, height: int, body: list[str], label: str) -> str:
    return (
        f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-label="{_esc(label)}">' + "".join(body) + "</svg>"
    )


def latency_chart(result: dict[str, Any], deadline_s: float, x_max: float, client: str) -> str:
    """Every request (sampled) as a dot: time it started vs latency (log scale)."""
    width, height = 560, 220
    points = result["series"]["requests"]
    top = max([deadline_s * 1000 * 1.5, *(float(p[1]) for p in points)])
    frame = _Frame(width, height, x_max, 0.1, 10 ** math.ceil(math.log10(max(top, 1.0))), log=True)
    labels = {0.1: "0.1ms", 1: "1ms", 10: "10ms", 100: "100ms", 1000: "1s", 10000: "10s"}
    ticks = [(float(v), text) for v, text in labels.items() if v <= frame.y_max]
    body = frame.axes(ticks)
    body += frame.faults(result.get("faults", []))
    dl = frame.y(deadline_s * 1000)
    body.append(
        f'<line x1="{frame.left}" x2="{width - frame.right}" y1="{dl:.1f}" y2="{dl:.1f}" '
        'stroke="#64748b" stroke-dasharray="2 3"><title>deadline</title></line>'
    )
    for t, ms, kind, *_ in points:
        color = _KIND_COLORS.get(kind, _FAIL)
        r = 1.4 if kind == "ok" else 2.2
        body.append(
            f'<circle cx="{frame.x(float(t)):.1f}" cy="{frame.y(float(ms)):.1f}" r="{r}" '
            f'fill="{color}" fill-opacity="{0.45 if kind == "ok" else 0.85}"/>'
        )
    return _svg(width, height, body, f"latency over time, {client}")


def fleet_chart(result: dict[str, Any], x_max: float, budget: object, client: str) -> str:
    """Each process's connections over time, stacked (a band per process, coloured by its
    wave): the bands' heights are their shares of the clients' connections."""
    width, height = 560, 220
    fleet = result["fleet"]
    series = {int(w): steps for w, steps in fleet["connections"].items()}
    waves = {p["worker"]: p["wave"] for p in fleet["processes"]}
    times = sorted({float(t) for steps in series.values() for t, _ in steps})

    def at(steps: list[list[float]], t: float) -> float:
        value = 0.0
        for st, n in steps:
            if float(st) > t:
                break
            value = float(n)
        return value

    stacks = {t: 0.0 for t in times}
    bands = []
    for w in sorted(series):
        lower = dict(stacks)
        for t in times:
            stacks[t] += at(series[w], t)
        bands.append((w, lower, dict(stacks)))
    peak = max([*stacks.values(), float(budget) if isinstance(budget, int) else 0.0, 1.0])
    y_max = peak * 1.1 + 1
    frame = _Frame(width, height, x_max, 0.0, y_max, log=False)
    step = max(1, int(_nice_step(y_max)))
    body = frame.axes([(float(v), str(v)) for v in range(0, int(y_max) + 1, step)])
    for w, lower, upper in bands:
        if not times:
            break
        # Steps: each value holds until the next sample time.
        top_pts, bottom_pts = [], []
        for i, t in enumerate(times):
            t_next = times[i + 1] if i + 1 < len(times) else t
            for tt in (t, t_next):
                top_pts.append(f"{frame.x(tt):.1f},{frame.y(upper[t]):.1f}")
                bottom_pts.append(f"{frame.x(tt):.1f},{frame.y(lower[t]):.1f}")
        color = _WAVE_COLORS[waves.get(w, 0) % len(_WAVE_COLORS)]
        points = " ".join(top_pts + bottom_pts[::-1])
        body.append(
            f'<polygon points="{points}" fill="{color}" fill-opacity="0.55" stroke="#fff" '
            f'stroke-width="0.4"><title>process {w} (wave {waves.get(w, 0)})</title></polygon>'
        )
    if isinstance(budget, int):
        y = frame.y(budget)
        body.append(
            f'<line x1="{frame.left}" x2="{width - frame.right}" y1="{y:.1f}" y2="{y:.1f}" '
            'stroke="#0f172a" stroke-dasharray="6 3"><title>fleet_budget</title></line>'
        )
    return _svg(width, height, body, f"connections per process over time, {client}")


def connections_chart(
    results: dict[str, dict[str, Any]], x_max: float, max_connections: int | None
) -> str:
    """Server connections over time, one line per client (each run aligned at its start)."""
    width, height = 560, 220
    peak = max(
        [n for r in results.values() for _, n in r["series"]["connections"] if n is not None] or [1]
    )
    y_max = float(max(peak, max_connections or 0) * 1.1 + 1)
    frame = _Frame(width, height, x_max, 0.0, y_max, log=False)
    step = max(1, int(_nice_step(y_max)))
    ticks = [(float(v), str(v)) for v in range(0, int(y_max) + 1, step)]
    body = frame.axes(ticks)
    if max_connections:
        y = frame.y(max_connections)
        body.append(
            f'<line x1="{frame.left}" x2="{width - frame.right}" y1="{y:.1f}" y2="{y:.1f}" '
            'stroke="#dc2626" stroke-dasharray="6 3"><title>max_connections</title></line>'
        )
    for client, r in results.items():
        pts = [(t, n) for t, n in r["series"]["connections"] if n is not None]
        if not pts:
            continue
        path = " ".join(f"{frame.x(float(t)):.1f},{frame.y(float(n)):.1f}" for t, n in pts)
        color = CLIENT_COLORS.get(client, "#334155")
        body.append(
            f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.6">'
            f"<title>{_esc(client)}</title></polyline>"
        )
    return _svg(width, height, body, "server connections over time")


# --------------------------------------------------------------------------------------------
# The page

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#0f172a;
background:#f8fafc}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:32px 0 4px}
h3{font-size:14px;margin:12px 0 4px}
.muted{color:#64748b} table{border-collapse:collapse;background:#fff;margin:8px 0}
th,td{border:1px solid #e2e8f0;padding:3px 8px;text-align:right;white-space:nowrap}
th{background:#f1f5f9} td.l,th.l{text-align:left} td.bad{background:#fee2e2;color:#991b1b}
td.good{background:#dcfce7} .charts{display:flex;flex-wrap:wrap;gap:12px}
.chart{background:#fff;border:1px solid #e2e8f0;padding:6px;max-width:580px}
svg text{font-size:10px;fill:#475569} svg text.axis{font-weight:600}
.legend span{display:inline-block;margin-right:12px}
.dot{display:inline-block;width:10px;height:10px;border-radius:50%;margin-right:4px;
vertical-align:middle}
code{background:#eef2f7;padding:0 3px}
"""


def _legend() -> str:
    items = [
        ("#16a34a", "ok"),
        ("#f59e0b", "late (after the deadline)"),
        (_FAIL, "failed"),
        ("#7f1d1d", "hung (cut off at the end)"),
    ]
    dots = "".join(
        f'<span><i class="dot" style="background:{c}"></i>{_esc(t)}</span>' for c, t in items
    )
    return (
        f'<div class="legend muted">{dots}<span>shaded/dashed: fault</span>'
        "<span>dotted: deadline</span></div>"
    )


def _scenario_html(entry: Mapping[str, Any]) -> str:
    name = entry["name"]
    out = [f'<h2 id="{_esc(name)}">{_esc(name)}: {_esc(entry["title"])}</h2>']
    out.append(f'<p class="muted">{_esc(entry["description"])}</p>')
    if entry.get("skipped"):
        out.append(f"<p><b>Skipped:</b> {_esc(entry['skipped'])}</p>")
        return "\n".join(out)
    out.append(f'<p class="muted">{_esc(describe_params(entry))}<br>{_esc(entry["target"])}</p>')
    results: dict[str, dict[str, Any]] = entry["results"]
    header = "".join(
        f'<th class="{"l" if align == "<" else ""}">{_esc(col)}</th>' for col, align in COLUMNS
    )
    rows = []
    for client, r in results.items():
        cells = _row(client, r)
        tds = []
        for i, (col, align) in enumerate(COLUMNS):
            cls = "l" if align == "<" else ""
            if col in ("dups", "lost", "fail-left") and cells[i] not in ("0", "-"):
                cls += " bad"
            if col == "recovery" and cells[i] == "never":
                cls += " bad"
            tds.append(f'<td class="{cls.strip()}">{_esc(cells[i])}</td>')
        rows.append("<tr>" + "".join(tds) + "</tr>")
    out.append(f"<table><tr>{header}</tr>{''.join(rows)}</table>")
    after_promotion = failover.describe(results)
    if after_promotion is not None:
        out.append(f"<p>{_esc(after_promotion.strip())}</p>")
    x_max = max(
        [
            float(p[0]) + float(p[1]) / 1000
            for r in results.values()
            for p in r["series"]["requests"]
        ]
        + [float(t) for r in results.values() for t, _ in r["series"]["connections"]]
        + [1.0]
    )
    deadline = float(entry["params"]["deadline_s"])
    out.append('<div class="charts">')
    legend = "".join(
        f'<span><i class="dot" style="background:{CLIENT_COLORS.get(c, "#334155")}"></i>'
        f"{_esc(c)}</span>"
        for c in results
    )
    out.append(
        '<div class="chart"><h3>Server connections (pg_stat_activity, every 100 ms)</h3>'
        + connections_chart(results, x_max, entry.get("max_connections"))
        + f'<div class="legend muted">{legend}<span>red dashed: max_connections</span></div></div>'
    )
    for client, r in results.items():
        out.append(
            f'<div class="chart"><h3>{_esc(client)}: latency of each request</h3>'
            + latency_chart(r, deadline, x_max, client)
            + _legend()
            + "</div>"
        )
    variants = entry["params"].get("variants") or {}
    budget = next((v["fleet_budget"] for v in variants.values() if v.get("fleet_budget")), None)
    for client, r in results.items():
        if not r.get("fleet"):
            continue
        out.append(
            f'<div class="chart"><h3>{_esc(client)}: connections per process (stacked: '
            "share over time)</h3>"
            + fleet_chart(r, x_max, budget if client in variants else None, client)
            + '<div class="legend muted"><span>one band per process, one colour per wave'
            "</span>"
            + ("<span>dashed: fleet_budget</span>" if client in variants else "")
            + "</div></div>"
        )
    out.append("</div>")
    for line in (fmt_first_row(results) if name.endswith("storm") else None, fmt_fleet(results)):
        if line is not None:
            out.append(f"<p>{_esc(line)}</p>")
    details = []
    for client, r in results.items():
        bits = []
        for kind, message in r.get("error_samples", {}).items():
            bits.append(f"<li><code>{_esc(kind)}</code>: {_esc(message)}</li>")
        for rec in r.get("recoveries", []):
            secs = rec["seconds"]
            shown = "never" if secs is None else fmt_ms(float(secs) * 1000)
            bits.append(f"<li>recovery after {_esc(rec['fault'])} at {rec['at']}s: {shown}</li>")
        for problem in r.get("worker_errors", [])[:3] + r.get("harness_errors", [])[:3]:
            bits.append(f"<li>{_esc(problem)}</li>")
        if r.get("unacked_writes_committed"):
            bits.append(
                f"<li>{r['unacked_writes_committed']} write(s) reported as failed were "
                "committed anyway (outcome unknown to the caller)</li>"
            )
        orm = fmt_orm(r)
        if orm is not None:
            bits.append(f"<li>{_esc(orm)}</li>")
        if bits:
            details.append(f"<h3>{_esc(client)}</h3><ul>{''.join(bits)}</ul>")
    if details:
        out.append("<details><summary>Errors, recoveries and notes</summary>")
        out.extend(details)
        out.append("</details>")
    return "\n".join(out)


def render_html(report: Mapping[str, Any]) -> str:
    m = report["machine"]
    opts = report["options"]
    toc = " · ".join(
        f'<a href="#{_esc(e["name"])}">{_esc(e["name"])}</a>' for e in report["scenarios"]
    )
    failures = invariant_failures(report)
    head = _invariants_line(report, failures).partition(": ")[0]
    verdict = (
        f"<p>{_esc(head)}: "
        + ("<b>held</b>" if not failures else "<b>FAILED</b>: " + _esc("; ".join(failures)))
        + "</p>"
    )
    head = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        "<title>pgwarden stress report</title>"
        f"<style>{_CSS}</style></head><body>"
        "<h1>pgwarden stress report</h1>"
        f'<p class="muted">{_esc(report["started_at"])} to {_esc(report["finished_at"])}'
        f"{' (interrupted)' if report.get('interrupted') else ''} · size {_esc(opts['size'])}"
        f" · deadline {_esc(opts['deadline_s'])}s · target {_esc(opts['target'])}<br>"
        f"{_esc(m['platform'])}, {_esc(m['cpus'])} CPUs, Python {_esc(m['python'])} · "
        + _esc(", ".join(f"{k} {v}" for k, v in m["packages"].items() if v))
        + "</p>"
        + verdict
        + (f'<p class="muted">{_esc(bc)}</p>' if (bc := fmt_bytecode(report)) else "")
        + f"<p>{toc}</p>"
        + '<p class="muted">Columns: <b>success</b> requests that returned within their '
        "deadline; <b>fail-left</b> failures that came back with at least 10% of the deadline "
        "left; latencies are of every request, successful or not; <b>conns</b> peak client "
        "backends on the server; <b>recovery</b> worst time from the end of a fault to the "
        "next success; <b>dups</b> writes that ran twice; <b>lost</b> acknowledged writes "
        "missing from the table. ORM units of work (the SQLAlchemy clients, in some "
        "scenarios) count in dups and lost like any write; the notes add their own figures "
        "and <b>torn</b> units (committed in pieces).</p>"
    )
    body = [_scenario_html(e) for e in report["scenarios"]]
    return head + "\n".join(body) + "</body></html>\n"
