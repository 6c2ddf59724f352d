"""Rewrite the metric tables of docs/observability.md from the metric catalog.

    .venv/bin/python scripts/metrics_doc.py            # rewrite the tables in place
    .venv/bin/python scripts/metrics_doc.py --check    # exit 1 if they are out of date

Each table sits between ``<!-- catalog:NAME:begin -->`` and ``<!-- catalog:NAME:end -->``
(NAME is ``prometheus`` or ``otel``); everything outside the markers is left alone.  The
tables come from :func:`pgwarden.core.catalog.markdown_tables`, and
``tests/unit/test_catalog.py`` fails when the document disagrees with them.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from pgwarden.core.catalog import markdown_tables

DOC = Path(__file__).resolve().parents[1] / "docs" / "observability.md"


def render(text: str) -> str:
    """*text* with every generated table replaced by the catalog's current one."""
    for name, table in markdown_tables().items():
        pattern = re.compile(
            rf"(<!-- catalog:{name}:begin -->\n).*?(<!-- catalog:{name}:end -->)", re.S
        )
        if not pattern.search(text):
            raise ValueError(f"no <!-- catalog:{name}:begin/end --> markers in the document")
        text = pattern.sub(lambda m: m.group(1) + table + m.group(2), text)  # noqa: B023
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether it is current")
    parser.add_argument("--doc", type=Path, default=DOC)
    args = parser.parse_args(argv)
    text = args.doc.read_text()
    fresh = render(text)
    if args.check:
        if fresh != text:
            print(f"{args.doc}: metric tables out of date; run scripts/metrics_doc.py")
            return 1
        return 0
    if fresh != text:
        args.doc.write_text(fresh)
        print(f"{args.doc}: metric tables rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
