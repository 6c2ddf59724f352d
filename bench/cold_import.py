"""pgwarden's own cold-start CPU in single fresh interpreters, this tree against another.

    python bench/cold_import.py --baseline-src /tmp/old/src [--pairs 16]

Two figures per shell (sync, async), CPU time of fresh interpreters run in pairs, the two
trees alternating which goes first; bytecode is compiled first, as installed packages are:

- **import**: ``import pgwarden`` plus the modules a first query loads (the registry and
  the shell's database module), after ``import psycopg, psycopg_pool``;
- **first row**: from ``import pgwarden`` to ``connect(url).fetchval("SELECT 1")``
  returning (includes the connect, the same for both trees), with the pgwarden modules
  it loaded.

Reported: the medians and their ratio (this tree / baseline). The storm in
``bench/cold_start.py`` shows what this costs 40 processes sharing the cores; this shows
the import alone, which that storm's noise hides when the change is ~1%.
"""

from __future__ import annotations

import argparse
import compileall
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE_SRC = str(Path(__file__).resolve().parent.parent / "src")

IMPORT_CHILD = """
import time
import psycopg, psycopg_pool
t0 = time.process_time()
import pgwarden, pgwarden._registry
import pgwarden.{shell}.database
print((time.process_time() - t0) * 1000, 0)
"""

FIRST_ROW_CHILD = """
import os, sys, time
import psycopg, psycopg_pool
before = set(sys.modules)
t0 = time.process_time()
import pgwarden
url = os.environ["PGW_BENCH_URL"]
if "{shell}" == "_sync":
    db = pgwarden.connect(url, max_size=4)
    assert db.fetchval("SELECT 1") == 1
    t1 = time.process_time()
    db.close()
else:
    import asyncio
    async def main():
        db = pgwarden.connect_async(url, max_size=4)
        assert await db.fetchval("SELECT 1") == 1
        t = time.process_time()
        await db.close()
        return t
    t1 = asyncio.run(main())
ours = [m for m in set(sys.modules) - before if m == "pgwarden" or m.startswith("pgwarden.")]
print((t1 - t0) * 1000, len(ours))
"""


def _run(code: str, src: str, url: str) -> tuple[float, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGWARDEN_")}
    env["PYTHONPATH"] = src
    env["PGW_BENCH_URL"] = url
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    ms, modules = out.stdout.split()
    return float(ms), int(modules)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-src", required=True, help="the other tree's src directory")
    parser.add_argument("--pairs", type=int, default=16)
    args = parser.parse_args()
    trees = {"this tree": HERE_SRC, "baseline": args.baseline_src}
    for src in trees.values():
        compileall.compile_dir(os.path.join(src, "pgwarden"), quiet=1)

    from pgwarden.testing import PostgresServer

    with PostgresServer() as pg:
        print(f"# {args.pairs} pairs per row, CPU ms, medians; load {os.getloadavg()}")
        print("| shell | measure | this tree | baseline | ratio | pgwarden modules |")
        print("|---|---|---|---|---|---|")
        for shell in ("_sync", "_async"):
            for measure, child in (("import", IMPORT_CHILD), ("first row", FIRST_ROW_CHILD)):
                code = child.replace("{shell}", shell)
                cpu: dict[str, list[float]] = {name: [] for name in trees}
                modules: dict[str, int] = {}
                for pair in range(args.pairs):
                    order = list(trees) if pair % 2 == 0 else list(reversed(trees))
                    for name in order:
                        ms, modules[name] = _run(code, trees[name], pg.url)
                        cpu[name].append(ms)
                mine, theirs = (statistics.median(cpu[name]) for name in trees)
                shown = "" if measure == "import" else " / ".join(str(modules[n]) for n in trees)
                print(
                    f"| {shell.strip('_')} | {measure} | {mine:.2f} | {theirs:.2f} "
                    f"| {mine / theirs:.3f} | {shown} |"
                )


if __name__ == "__main__":
    main()
