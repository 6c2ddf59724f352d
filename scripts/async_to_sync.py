#!/usr/bin/env python3
"""Generate the sync shell and the sync tests from their async sources.

Token replacement in the style of httpcore's ``scripts/unasync.py``, with the
escape hatch of psycopg's ``tools/async_to_sync.py``. The async files are the
source of truth:

- every ``*.py`` in ``src/pgwarden/_async/`` is written to ``src/pgwarden/_sync/``;
- every ``*.py`` in ``tests/_async/`` is written to ``tests/_sync/``;

except ``__init__.py`` and ``_compat.py``, which are written by hand on both
sides (``_compat.py`` holds everything that differs between asyncio and threads).

Lines that must differ use a block the async side runs and the sync side
replaces by its ``else:`` body, dedented and copied verbatim (no substitution)::

    if True:  # ASYNC
        other = pgwarden.connect(url)
    else:
        other = pgwarden.connect_async(url)

``--check`` fails (exit 1) when a generated file is stale, so CI catches a hand
edit or a forgotten regeneration. Every run fails (exit 1) when a substitution
is used by no converted file: a dead rule is removed, not carried along.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# (async source directory, generated sync directory)
TREES: tuple[tuple[Path, Path], ...] = (
    (ROOT / "src" / "pgwarden" / "_async", ROOT / "src" / "pgwarden" / "_sync"),
    (ROOT / "tests" / "_async", ROOT / "tests" / "_sync"),
)
HAND_WRITTEN = frozenset({"__init__.py", "_compat.py"})

# (pattern, replacement), applied line by line in this order: longer, more
# specific tokens first. Each must be used by at least one converted file.
SUBS: list[tuple[str, str]] = [
    (r"\bAsyncIterator\b", "Iterator"),
    (r"\basynccontextmanager\b", "contextmanager"),
    (r"\bAwaitable\[T\]", "T"),
    (r"\bAsyncConnectionPool\b", "ConnectionPool"),
    (r"\bAsyncConnection\b", "Connection"),
    (r"\bAsyncDatabase\b", "Database"),
    (r"\bAsyncTransaction\b", "Transaction"),
    (r"\bAsyncTransactions\b", "Transactions"),
    (r"\bAsyncConnections\b", "Connections"),
    (r"\bAsyncLease\b", "Lease"),
    (r"\bAsyncCheckout\b", "Checkout"),
    (r"\bAsyncStatements\b", "Statements"),
    (r"\bAsyncWarmup\b", "Warmup"),
    (r"\bAsyncFleetSampler\b", "FleetSampler"),
    (r"\bAsyncStream\b", "Stream"),
    (r"\bAsyncRows\b", "Rows"),
    (r"\bPgwAsyncPool\b", "PgwPool"),
    (r"\bPgwAsyncConnection\b", "PgwConnection"),
    (r"\bpgwarden\._async\b", "pgwarden._sync"),
    (r"\bconnect_async\b", "connect"),
    (r"__aenter__", "__enter__"),
    (r"__aexit__", "__exit__"),
    (r"\basync with\b", "with"),
    (r"\basync for\b", "for"),
    (r"__aiter__", "__iter__"),
    (r"__anext__", "__next__"),
    (r"\bStopAsyncIteration\b", "StopIteration"),
    (r"\baclose\b", "close"),
    (r"\basync def\b", "def"),
    (r"\bawait ", ""),
    (r"\(asyncio\)", "(threads)"),
    (r"\basyncio handle\b", "threaded handle"),
]

HEADER = (
    "# WARNING: generated from {source} by scripts/async_to_sync.py.\n"
    "# Edit the async file and run `python scripts/async_to_sync.py`.\n"
)
GENERATED = "# WARNING: generated from "

_ASYNC_IF = re.compile(r"^[ \t]*if True:[ \t]*#[ \t]*ASYNC\b", re.MULTILINE)
_ELSE = re.compile(r"[ \t]*else[ \t]*:")


class ConvertError(Exception):
    """The async source cannot be converted (a malformed ``# ASYNC`` block)."""


class UnusedSubstitution(ConvertError):
    """Some substitutions matched nothing in any converted file."""

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = list(patterns)
        super().__init__("unused substitution(s): " + ", ".join(self.patterns))


def _first_async_block(text: str) -> ast.If | None:
    """The outermost ``if True:  # ASYNC`` block of *text* (the one that starts first)."""
    if not _ASYNC_IF.search(text):
        return None
    lines = text.splitlines()
    found: ast.If | None = None
    for node in ast.walk(ast.parse(text)):
        if (
            isinstance(node, ast.If)
            and isinstance(node.test, ast.Constant)
            and node.test.value is True
            and _ASYNC_IF.match(lines[node.lineno - 1])
            and (found is None or node.lineno < found.lineno)
        ):
            found = node
    return found


def drop_async_branches(text: str) -> list[tuple[str, bool]]:
    """Replace each ``if True:  # ASYNC`` block by its dedented ``else:`` body.

    Returns the lines (with their ends) and, for each, whether it came from an
    ``else:`` body and must be copied verbatim. Blocks nested in an ``else:``
    body are resolved too; those in the async body go away with it.
    """
    lines = text.splitlines(keepends=True)
    verbatim = [False] * len(lines)
    origin = list(range(1, len(lines) + 1))  # line numbers in *text*, for errors
    while (node := _first_async_block("".join(lines))) is not None:
        where = f"line {origin[node.lineno - 1]}: `if True:  # ASYNC`"
        if not node.orelse:
            raise ConvertError(f"{where} needs an `else:` branch for the sync side")
        # The `else:` line sits between the end of the body and the first else statement.
        first, last = node.body[-1].end_lineno or node.lineno, node.orelse[0].lineno - 1
        else_at = next((i for i in range(first, last) if _ELSE.match(lines[i])), None)
        if else_at is None:
            raise ConvertError(f"{where} must be followed by `else:`, not `elif`")
        end = node.end_lineno or node.lineno
        delta = node.orelse[0].col_offset - node.col_offset
        body = [_dedent(line, delta) for line in lines[else_at + 1 : end]]
        start = node.lineno - 1
        lines[start:end] = body
        verbatim[start:end] = [True] * len(body)
        origin[start:end] = origin[else_at + 1 : end]
    return list(zip(lines, verbatim, strict=True))


def _dedent(line: str, delta: int) -> str:
    """*line* without *delta* columns of indentation (kept whole if it has fewer)."""
    return line if line[:delta].strip(" \t") else line[delta:]


def convert(text: str, subs: Sequence[tuple[str, str]] = SUBS, used: set[str] | None = None) -> str:
    """The sync version of *text*; the patterns that matched are added to *used*."""
    compiled = [(pattern, re.compile(pattern), replacement) for pattern, replacement in subs]
    out = []
    for line, verbatim in drop_async_branches(text):
        if not verbatim:
            for pattern, regex, replacement in compiled:
                line, count = regex.subn(replacement, line)
                if count and used is not None:
                    used.add(pattern)
        out.append(line)
    return "".join(out)


def convert_all(texts: Mapping[str, str], subs: Sequence[tuple[str, str]] = SUBS) -> dict[str, str]:
    """Convert each named text; raise `UnusedSubstitution` if a pattern matched none of them."""
    used: set[str] = set()
    converted = {}
    for name, text in texts.items():
        try:
            converted[name] = convert(text, subs, used)
        except (ConvertError, SyntaxError) as exc:
            raise ConvertError(f"{name}: {exc}") from exc
    unused = [pattern for pattern, _ in subs if pattern not in used]
    if unused:
        raise UnusedSubstitution(unused)
    return converted


def sources() -> list[tuple[Path, Path]]:
    """(async file, sync file) for every file to convert, discovered on disk."""
    pairs = []
    for source_dir, target_dir in TREES:
        for path in sorted(source_dir.glob("*.py")):
            if path.name not in HAND_WRITTEN:
                pairs.append((path, target_dir / path.name))
    return pairs


def orphans(pairs: Sequence[tuple[Path, Path]]) -> list[Path]:
    """Generated files whose async source is gone."""
    wanted = {target for _, target in pairs}
    found = []
    for _, target_dir in TREES:
        for path in sorted(target_dir.glob("*.py")):
            if path not in wanted and path.read_text().startswith(GENERATED):
                found.append(path)
    return found


def ruff_format(text: str, path: Path) -> str:
    """Format like the rest of the tree, so `ruff format --check` agrees with us."""
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        raise SystemExit("ruff is needed to format the generated files (pip install ruff)")
    # Sort imports and drop the ones only the async side used, then format.
    fixed = subprocess.run(
        [ruff, "check", "--fix-only", "--select", "I,F401", "--stdin-filename", str(path), "-"],
        input=text,
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    done = subprocess.run(
        [ruff, "format", "--stdin-filename", str(path), "-"],
        input=fixed,
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return done.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a sync file is stale")
    args = parser.parse_args(argv)
    pairs = sources()
    texts = {source.relative_to(ROOT).as_posix(): source.read_text() for source, _ in pairs}
    try:
        converted = convert_all(texts)
    except UnusedSubstitution as exc:
        print(f"{exc}; remove them from SUBS in scripts/async_to_sync.py", file=sys.stderr)
        return 1
    except ConvertError as exc:
        print(f"cannot convert {exc}", file=sys.stderr)
        return 1
    stale = []
    for (source_name, text), (_, target) in zip(converted.items(), pairs, strict=True):
        header = HEADER.format(source=source_name)
        wanted = ruff_format(header + text, target)
        current = target.read_text() if target.exists() else ""
        if current == wanted:
            continue
        name = str(target.relative_to(ROOT))
        if args.check:
            stale.append(name)
            diff = difflib.unified_diff(
                current.splitlines(), wanted.splitlines(), name, "generated", lineterm=""
            )
            print("\n".join(list(diff)[:40]), file=sys.stderr)
        else:
            target.write_text(wanted)
            print(f"wrote {name}")
    for orphan in orphans(pairs):
        name = str(orphan.relative_to(ROOT))
        if args.check:
            stale.append(name)
            print(f"{name}: generated, but its async source is gone", file=sys.stderr)
        else:
            orphan.unlink()
            print(f"removed {name}")
    if stale:
        print(
            f"sync files out of date: {', '.join(stale)}; run `python scripts/async_to_sync.py`",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
