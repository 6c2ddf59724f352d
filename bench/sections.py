"""Put one ``## `` section into a Markdown file, replacing the section of that heading.

``make bench`` assembles ``docs/benchmarks.md`` from several writers (``micro.py`` writes
the head; the SQLAlchemy, deadline and Django benchmarks and the stress tables each own a
section). Each replaces only its own section, so re-running one keeps the others, and
hand-written sections stay. Usage::

    python bench/sections.py FILE SECTION_FILE   # the section's first line is its heading
"""

from __future__ import annotations

import sys
from pathlib import Path


def section_bounds(text: str, heading: str) -> tuple[int, int] | None:
    """Where the section under *heading* (a ``## `` line) starts and ends in *text*."""
    start = 0 if text.startswith(heading + "\n") else text.find("\n" + heading + "\n") + 1
    if start == 0 and not text.startswith(heading + "\n"):
        return None
    end = text.find("\n## ", start + len(heading))
    return start, (end + 1 if end >= 0 else len(text))


def put_section(path: Path, section: str) -> None:
    """Replace the section whose heading is *section*'s first line, or append it."""
    heading = section.split("\n", 1)[0]
    if not heading.startswith("## "):
        raise ValueError(f"a section starts with a '## ' heading, not {heading[:40]!r}")
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    body = section.rstrip("\n") + "\n"
    bounds = section_bounds(old, heading)
    if bounds is None:
        new = old.rstrip("\n") + ("\n\n" if old.strip() else "") + body
    else:
        start, end = bounds
        rest = old[end:]
        new = old[:start] + body + ("\n" + rest if rest else "")
    path.write_text(new, encoding="utf-8")


def other_sections(text: str, own: set[str]) -> str:
    """Every ``## `` section of *text* whose heading is not in *own*, in order."""
    kept: list[str] = []
    position = text.find("\n## ")
    while position >= 0:
        start = position + 1
        end = text.find("\n## ", start)
        chunk = text[start : end + 1 if end >= 0 else len(text)]
        if chunk.split("\n", 1)[0] not in own:
            kept.append(chunk.rstrip("\n") + "\n")
        position = end
    return "\n".join(kept)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    put_section(Path(argv[0]), Path(argv[1]).read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
