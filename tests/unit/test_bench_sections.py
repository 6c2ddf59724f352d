"""bench/deadlines.py keeps the previous run's figures when it rewrites its section."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_deadline_section_is_appended_then_replaced_keeping_the_previous_run(
    tmp_path: Path,
) -> None:
    bench = load("deadlines")
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Other\n\nkept\n")
    run_one = f"{bench.SECTION}\n\n| run | one |\n"
    bench.write_section(doc, run_one)
    assert doc.read_text().count(bench.SECTION) == 1
    assert "## Other\n\nkept" in doc.read_text()

    bench.write_section(doc, f"{bench.SECTION}\n\n| run | two |\n")
    text = doc.read_text()
    assert "| run | two |" in text
    assert "### Previous run\n\n| run | one |" in text

    bench.write_section(doc, f"{bench.SECTION}\n\n| run | three |\n")
    text = doc.read_text()
    # Only the latest previous run is carried: two, not one.
    assert "| run | three |" in text
    assert "| run | two |" in text
    assert "| run | one |" not in text
    assert "## Other\n\nkept" in text


def test_put_section_replaces_only_its_own_section(tmp_path: Path) -> None:
    sections = load("sections")
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nhead\n\n## A\n\na1\n\n## B\n\nb1\n")
    sections.put_section(doc, "## A\n\na2\n")
    assert doc.read_text() == "# Benchmarks\n\nhead\n\n## A\n\na2\n\n## B\n\nb1\n"
    sections.put_section(doc, "## B\n\nb2\n")
    sections.put_section(doc, "## C\n\nc1\n")
    assert doc.read_text() == "# Benchmarks\n\nhead\n\n## A\n\na2\n\n## B\n\nb2\n\n## C\n\nc1\n"


def test_other_sections_keeps_what_the_head_writer_does_not_own() -> None:
    sections = load("sections")
    text = "# Benchmarks\n\nhead\n\n## Previous run\n\nold\n\n## Mine\n\nx\n\n## Theirs\n\ny\n"
    kept = sections.other_sections(text, {"## Previous run", "## Mine"})
    assert kept == "## Theirs\n\ny\n"
