"""``pgwarden`` entry point: parse the subcommand name, then import and run only that module.

Each subcommand is a module with ``run(argv: list[str], prog: str) -> int`` that builds its own
argparse parser, so ``pgwarden check --help`` is answered by ``pgwarden.cli.check`` and
``pgwarden --help`` imports no subcommand at all (this module imports only the standard
library; psycopg is loaded only by a subcommand that needs it).

Exit codes shared by all subcommands: 0 success, 1 the command ran and failed, 2 usage error or
the database could not be reached, 130 interrupted (Ctrl-C or SIGTERM), 141 stdout was closed
by its reader (``| head``), which ends the command quietly, without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NamedTuple, Protocol, cast

__all__ = ["COMMANDS", "main"]

PROG = "pgwarden"


class Command(NamedTuple):
    module: str
    summary: str


#: Subcommand name -> (module, one-line summary). Modules are imported on demand.
COMMANDS: dict[str, Command] = {
    "check": Command(
        "pgwarden.cli.check",
        "connect once; report version, latency, limits, PgBouncer, TLS, risky settings",
    ),
    "dashboard": Command(
        "pgwarden.cli.dashboard",
        "serve a live dashboard for a database or a running app's stats endpoint",
    ),
    "stress": Command(
        "pgwarden.cli.stress",
        "fault scenarios: pgwarden vs psycopg_pool, SQLAlchemy and naive; JSON + HTML report",
    ),
}


class _Runner(Protocol):
    def __call__(self, argv: list[str], prog: str) -> int: ...


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("pgwarden")
    except Exception:  # not installed (running from a source tree)
        return "unknown"


class _VersionAction(argparse.Action):
    """``--version`` that looks the version up only when asked (metadata lookups cost)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="show the version and exit")

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        # On stdout, like any tool's --version: it is the answer, not a diagnostic.
        print(f"{PROG} {_version()}", flush=True)
        parser.exit()


def _top_parser() -> argparse.ArgumentParser:
    width = max(len(name) for name in COMMANDS) + 2
    listing = "\n".join(f"  {name:<{width}}{cmd.summary}" for name, cmd in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="pgwarden: one shared, self-healing PostgreSQL handle per process.",
        epilog=f"commands:\n{listing}\n\nRun '{PROG} COMMAND --help' for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_VersionAction)
    parser.add_argument(
        "command", metavar="COMMAND", choices=sorted(COMMANDS), help="one of: %(choices)s"
    )
    return parser


def _dispatch(args: list[str]) -> int:
    parser = _top_parser()
    # Options before the command belong to pgwarden itself; everything after the command
    # name belongs to the subcommand, whose own parser handles it (including --help).
    index = next((i for i, arg in enumerate(args) if not arg.startswith("-")), None)
    if index is None:
        parser.parse_args(args)  # --help / --version exit here
        parser.print_usage(sys.stderr)
        print(
            f"{PROG}: error: a COMMAND is required (one of: {', '.join(COMMANDS)})", file=sys.stderr
        )
        return 2
    ns = parser.parse_args(args[: index + 1])  # validates the name (exit 2 if unknown)
    name = cast(str, ns.command)
    module = importlib.import_module(COMMANDS[name].module)
    run = cast(_Runner, module.run)
    return run(args[index + 1 :], f"{PROG} {name}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with *argv* (default ``sys.argv[1:]``) and return the exit code.

    argparse's ``SystemExit`` (for ``--help``, ``--version`` and usage errors) is turned into a
    return value, so the function can be called in-process.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(args)
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _stdout_closed()


#: Exit status when the reader of stdout went away (``pgwarden check URL | head -1``):
#: 128 + SIGPIPE, what a shell reports for a tool that SIGPIPE ended.
EXIT_BROKEN_PIPE = 141


def _stdout_closed() -> int:
    """The reader of stdout is gone: end quietly, as a Unix tool does. stdout is pointed
    at /dev/null so that the interpreter's final flush finds nowhere to fail (it would
    print "Exception ignored ... BrokenPipeError" on stderr)."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
