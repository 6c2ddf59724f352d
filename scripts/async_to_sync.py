#!/usr/bin/env python3
"""Generate the sync shell (`src/pgwarden/_sync/`) from the async one.

Token replacement in the style of httpcore's ``scripts/unasync.py``: the async
files are the source of truth, the sync files are written from them, and
``--check`` fails (exit 1) when a sync file is out of date, so CI catches a
hand edit or a forgotten regeneration. `_compat.py` is written by hand on both
sides and is not converted.
"""

from __future__ import annotations

import argparse
import difflib
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "src" / "pgwarden" / "_async"
TARGET = ROOT / "src" / "pgwarden" / "_sync"
FILES = ("database.py", "pool.py")

# Order matters: longer, more specific tokens first.
SUBS: list[tuple[str, str]] = [
    (r"\bAsyncIterator\b", "Iterator"),
    (r"\basynccontextmanager\b", "contextmanager"),
    (r"\bAwaitable\[T\]", "T"),
    (r"\bAsyncConnectionPool\b", "ConnectionPool"),
    (r"\bAsyncConnection\b", "Connection"),
    (r"\bAsyncDatabase\b", "Database"),
    (r"\bAsyncTransaction\b", "Transaction"),
    (r"\bPgwAsyncPool\b", "PgwPool"),
    (r"\bPgwAsyncConnection\b", "PgwConnection"),
    (r"\bpgwarden\._async\b", "pgwarden._sync"),
    (r"__aenter__", "__enter__"),
    (r"__aexit__", "__exit__"),
    (r"\basync with\b", "with"),
    (r"\basync for\b", "for"),
    (r"\basync def\b", "def"),
    (r"\bawait ", ""),
    (r"\(asyncio\)", "(threads)"),
    (r"\basyncio handle\b", "threaded handle"),
    (r"`pgwarden\.connect_async\(\)`", "`pgwarden.connect()`"),
]

HEADER = (
    "# WARNING: generated from src/pgwarden/_async/{name} by scripts/async_to_sync.py.\n"
    "# Edit the async file and run `python scripts/async_to_sync.py`.\n"
)


def convert(text: str) -> str:
    for pattern, replacement in SUBS:
        text = re.sub(pattern, replacement, text)
    return text


def render(name: str) -> str:
    source = (SOURCE / name).read_text()
    return ruff_format(HEADER.format(name=name) + convert(source), TARGET / name)


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
    stale = []
    for name in FILES:
        wanted = render(name)
        target = TARGET / name
        current = target.read_text() if target.exists() else ""
        if current == wanted:
            continue
        if args.check:
            stale.append(name)
            diff = difflib.unified_diff(
                current.splitlines(), wanted.splitlines(), str(target), "generated", lineterm=""
            )
            print("\n".join(list(diff)[:40]), file=sys.stderr)
        else:
            target.write_text(wanted)
            print(f"wrote {target.relative_to(ROOT)}")
    if stale:
        print(
            f"sync shell out of date: {', '.join(stale)}; run `python scripts/async_to_sync.py`",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
