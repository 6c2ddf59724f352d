"""``pgwarden stress``: fault scenarios, pgwarden against psycopg_pool, SQLAlchemy and naive.

Runs the named scenarios (default: every scenario but the opt-in ``fleet``) with each client
in turn, prints live progress
(stderr) and a table per scenario (stdout), and writes ``results.json`` and a self-contained
``report.html`` to ``--out``. Without ``--url`` each scenario starts its own throwaway
PostgreSQL (and PgBouncer or a fault proxy when it needs one); see ``docs/stress.md``.

``--dashboard [PORT]`` also serves the live dashboard (:func:`pgwarden.dashboard.app`) on
``127.0.0.1:PORT`` (default 8765, 0 picks a free port) while the scenarios run, showing the
pgwarden client's stats merged across its worker processes (:mod:`pgwarden.stress.live`);
its URL is printed on stderr, and it stops when the run ends or is interrupted.

Exit status: 0 the run finished and pgwarden had no duplicate and no lost acknowledged
write; 1 it finished and pgwarden broke one of those invariants; 2 bad arguments or the
harness could not start a server; 130 interrupted (the finished scenarios are written).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

from pgwarden.cli._args import port, positive_float

__all__ = ["build_parser", "run"]

DEFAULT_OUT = "pgwarden-report"
DEFAULT_DASHBOARD_PORT = 8765


def _deadline_seconds(text: str) -> float:
    value = positive_float(text)
    if value > 600:
        raise argparse.ArgumentTypeError(f"must be between 0 and 600 seconds: {text!r}")
    return value


def build_parser(prog: str = "pgwarden stress") -> argparse.ArgumentParser:
    from pgwarden.stress.clients import CLIENTS
    from pgwarden.stress.scenarios import ALIASES, OPT_IN, QUICK, SCENARIOS, SIZES

    scenario_list = "\n".join(
        f"  {s.name:<18} {s.title}" + (" (opt-in)" if s.name in OPT_IN else "")
        for s in SCENARIOS.values()
    )
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            f"Run fault scenarios with {len(CLIENTS)} clients (pgwarden, psycopg_pool with its "
            "defaults, SQLAlchemy QueuePool with pool_pre_ping, the same SQLAlchemy code on "
            "pgwarden's postgresql+pgwarden:// dialect, Django's PostgreSQL backend, the same "
            "Django code on pgwarden's backend, a naive connect-per-request client) "
            "and report success, errors, latency, server connections, recovery time, "
            "duplicate writes and lost acknowledged writes."
        ),
        epilog=(
            f"scenarios:\n{scenario_list}\n"
            f"aliases: {', '.join(ALIASES)}\n"
            f"default: every scenario but the opt-in ones ({', '.join(OPT_IN)}); "
            "'all' includes them.\n\n"
            f"--quick runs the flagship ({' + '.join(QUICK)}) at size small.\n"
            "exit status: 0 done and pgwarden kept its invariants, 1 pgwarden had a "
            "duplicate or lost write, 2 usage or setup error, 130 interrupted."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--scenario",
        action="append",
        metavar="NAME",
        help="a scenario or alias; repeatable, or comma-separated (default: every scenario "
        "but the opt-in ones)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"the flagship: {' and '.join(QUICK)} at size small (under 2 minutes)",
    )
    parser.add_argument(
        "--size",
        choices=SIZES,
        default=None,
        help="workload size: tiny (smoke test), small (default), full (make bench)",
    )
    parser.add_argument(
        "--clients",
        default=",".join(CLIENTS),
        metavar="LIST",
        help="comma-separated clients to run (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        default=DEFAULT_OUT,
        metavar="DIR",
        help="directory for results.json and report.html (default: ./%(default)s)",
    )
    parser.add_argument(
        "--url",
        metavar="URL",
        help="run against this server (loopback only) instead of starting one; scenarios "
        "that must restart or reconfigure the server are skipped",
    )
    parser.add_argument(
        "--deadline",
        type=_deadline_seconds,
        default=5.0,
        metavar="SECONDS",
        help="per-request deadline for every client (default: %(default)g)",
    )
    parser.add_argument(
        "--markdown",
        metavar="FILE",
        help="also write the tables and the machine as Markdown (for docs/benchmarks.md)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--dashboard",
        nargs="?",
        type=port,
        const=DEFAULT_DASHBOARD_PORT,
        default=None,
        metavar="PORT",
        help="while the scenarios run, serve the live dashboard of the pgwarden client "
        f"(merged across its workers) on 127.0.0.1:PORT (default {DEFAULT_DASHBOARD_PORT}; "
        "0 picks a free port)",
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no live progress lines (tables still print)"
    )
    return parser


def run(argv: Sequence[str], prog: str = "pgwarden stress") -> int:
    """Entry point used by :mod:`pgwarden.cli.main`. Returns the exit code."""
    parser = build_parser(prog)
    args = parser.parse_args(list(argv))

    from pgwarden._redact import redact
    from pgwarden.stress.clients import CLIENTS
    from pgwarden.stress.harness import (
        HarnessError,
        Options,
        loopback_problem,
        new_report,
        run_stress,
    )
    from pgwarden.stress.report import (
        format_scenario,
        format_summary,
        invariant_failures,
        write_html,
        write_json,
        write_markdown,
    )
    from pgwarden.stress.results import ScenarioEntry
    from pgwarden.stress.scenarios import QUICK, Size, resolve

    names: list[str] = []
    for item in args.scenario or []:
        names.extend(part for part in item.split(",") if part.strip())
    if not names:
        names = list(QUICK) if args.quick else ["default"]
    try:
        scenarios = resolve(names)
    except ValueError as exc:
        parser.error(str(exc))
    clients = [c.strip() for c in str(args.clients).split(",") if c.strip()]
    bad = [c for c in clients if c not in CLIENTS]
    if bad or not clients:
        parser.error(
            f"unknown client(s): {', '.join(bad) or '(none)'}; choose from {', '.join(CLIENTS)}"
        )
    clients = list(dict.fromkeys(clients))
    if importlib.util.find_spec("sqlalchemy") is None:
        left_out = [c for c in clients if c.startswith("sqlalchemy")]
        if left_out:
            clients = [c for c in clients if c not in left_out]
            print(
                f"{prog}: SQLAlchemy is not installed, so {', '.join(left_out)} "
                "left out (pip install 'pgwarden[stress]')",
                file=sys.stderr,
            )
            if not clients:
                return 2
    url: str | None = args.url
    if url is not None:
        problem = loopback_problem(url)
        if problem is not None:
            print(
                f"{prog}: refusing {redact(url)}: {problem}; pgwarden stress only runs "
                "against servers on this machine",
                file=sys.stderr,
            )
            return 2
    if args.dashboard is not None and "pgwarden" not in clients:
        parser.error("--dashboard shows the pgwarden client: include it in --clients")
    size: Size = args.size or "small"
    out = Path(args.out)
    json_path = out / "results.json"
    html_path = out / "report.html"

    def say(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    def on_scenario(entry: ScenarioEntry) -> None:
        print(format_scenario(entry), flush=True)
        print(flush=True)
        write_json(report, json_path)

    options = Options(
        scenarios=scenarios,
        clients=clients,
        size=size,
        out=out,
        url=url,
        deadline=args.deadline,
        seed=args.seed,
        say=say,
        on_scenario=on_scenario,
    )
    if url is not None:
        say(f"target: {redact(url)} (scenarios that need their own server are skipped)")
    else:
        say("target: throwaway PostgreSQL servers started per scenario (embedded default)")
    dashboard = None
    if args.dashboard is not None:
        from pgwarden.stress.live import DashboardServer, LiveStats

        options.live = LiveStats()
        try:
            dashboard = DashboardServer(options.live, int(args.dashboard)).start()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            print(
                f"{prog}: cannot serve the dashboard on 127.0.0.1:{args.dashboard}: {reason}",
                file=sys.stderr,
            )
            return 2
        print(
            f"{prog}: dashboard at {dashboard.url} (the pgwarden client, merged across its "
            "worker processes; stops with the run)",
            file=sys.stderr,
            flush=True,
        )
    report = new_report(options)
    code = 0
    try:
        run_stress(options, report)
    except KeyboardInterrupt:
        report["interrupted"] = True
        print(f"{prog}: interrupted; everything started was stopped", file=sys.stderr)
        code = 130
    except HarnessError as exc:
        report["error"] = str(exc)
        print(f"{prog}: {exc}", file=sys.stderr)
        code = 2
    finally:
        if dashboard is not None:
            dashboard.close()
    write_json(report, json_path)
    write_html(report, html_path)
    if args.markdown:
        write_markdown(report, Path(args.markdown))
    print(format_summary(report, json_path, html_path), flush=True)
    if code == 0 and invariant_failures(report):
        code = 1
    return code
