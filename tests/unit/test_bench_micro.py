"""bench/micro.py carries the previous run's figures forward when it rewrites its file."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def load_micro() -> ModuleType:
    spec = importlib.util.spec_from_file_location("micro", ROOT / "bench" / "micro.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_rewrite_keeps_only_the_run_before_it(tmp_path: Path) -> None:
    micro = load_micro()
    doc = tmp_path / "benchmarks.md"
    assert micro.previous_figures(doc) == []  # no file yet: nothing to carry

    def write(ratio: float) -> str:
        results = {"cold start (fresh interpreter)": {"ratio": ratio}}
        previous = micro.previous_figures(doc)
        doc.write_text(micro.render(results, "machine", "15", previous=previous))
        return doc.read_text()

    first = write(1.5)
    assert micro.PREVIOUS_HEADING not in first
    second = write(1.25)
    current, carried = second.split(micro.PREVIOUS_HEADING)
    assert "ratio=1.250" in current
    assert "ratio=1.500" not in current
    assert "ratio=1.500" in carried
    assert "- machine: machine" in carried
    third = write(1.125)
    assert "ratio=1.250" in third.split(micro.PREVIOUS_HEADING)[1]
    assert "ratio=1.500" not in third  # the run before the previous one is not carried again
    assert third.count(micro.PREVIOUS_HEADING) == 1


def test_only_the_figures_before_other_sections_are_carried(tmp_path: Path) -> None:
    micro = load_micro()
    doc = tmp_path / "benchmarks.md"
    doc.write_text(
        "# Benchmarks\n\n## Another benchmark\n\n- machine: elsewhere\n\n| a | b |\n|---|---|\n"
    )
    assert micro.previous_figures(doc) == []  # that table is another section's
