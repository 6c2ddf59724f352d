"""Sphinx configuration of pgwarden's API reference and task guides (``make docs``).

Only ``index.rst``, ``api/`` and ``guides/`` are built; the other pages under docs/ are
Markdown read on GitHub. Offline by design: no intersphinx, no theme or extension beyond
Sphinx itself. ``make docs-check`` (part of ``make test``) builds with ``-W``: every
warning (a broken docstring, a missing module) fails the build.
"""

from __future__ import annotations

import sys
from pathlib import Path

from docutils.parsers.rst import Directive
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.util import logging

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

project = "pgwarden"
author = "pgwarden contributors"
copyright = "pgwarden contributors"

extensions = ["sphinx.ext.autodoc"]
include_patterns = ["index.rst", "api/**", "guides/**"]
exclude_patterns = ["_build"]
root_doc = "index"

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": True}
# Names in docstrings written as `Settings` (one backtick pair) are object references.
default_role = "py:obj"
# The docstrings refer to psycopg's and the standard library's objects, which are not part
# of this build (offline: no intersphinx); only pgwarden's own names must resolve.
nitpicky = False

html_theme = "alabaster"
html_title = "pgwarden"
html_static_path: list[str] = []


def _settings_table() -> str:
    """Every setting with its default and reason, from ``Settings.describe()`` itself."""
    from pgwarden.settings import Settings

    lines = [
        ".. list-table::",
        "   :header-rows: 1",
        "   :widths: 20 15 65",
        "",
        "   * - setting (``PGWARDEN_<NAME>``)",
        "     - default",
        "     - why",
    ]
    for name, default, reason in Settings.describe():
        shown = "``None``" if default is None else f"``{default!r}``"
        lines += [
            f"   * - ``{name}``",
            f"     - {shown}",
            f"     - {' '.join(reason.split()) or '-'}",
        ]
    return "\n".join(lines) + "\n"


class SettingsTable(Directive):
    """``.. pgwarden-settings::``: the table above, parsed in place (nothing is written)."""

    def run(self) -> list[object]:
        self.state_machine.insert_input(
            StringList(_settings_table().splitlines()), "pgwarden.settings.Settings.describe()"
        )
        return []


# Public names documented under the module that defines them (autodoc cannot read the
# ``#:`` comment of a name re-exported lazily).
_DOCUMENTED_AS = {
    "pgwarden.testing.DEFAULT_SETTINGS": "pgwarden.testing.postgres.DEFAULT_SETTINGS",
    "pgwarden.testing.StopMode": "pgwarden.testing.postgres.StopMode",
}


def _public_api() -> list[str]:
    """Every name exported by ``pgwarden`` and ``pgwarden.testing``, and the public methods
    and properties their classes define (Settings' fields are the generated table)."""
    import inspect

    import pgwarden
    import pgwarden.testing

    names: list[str] = []
    for module in (pgwarden, pgwarden.testing):
        for name in module.__all__:
            qualified = f"{module.__name__}.{name}"
            names.append(qualified)
            obj = getattr(module, name)
            if not inspect.isclass(obj) or issubclass(obj, BaseException):
                continue
            for member, value in vars(obj).items():
                if member.startswith("_"):
                    continue
                if inspect.isfunction(value) or isinstance(value, (property, classmethod)):
                    names.append(f"{qualified}.{member}")
    return names


def _check_complete(app: Sphinx, env: BuildEnvironment) -> None:
    """Warn (an error under -W) for each public name the reference does not show: autodoc
    leaves out a member without a docstring, so this also catches a missing docstring."""
    documented = set(env.get_domain("py").objects)  # type: ignore[attr-defined]
    for name in _public_api():
        if name not in documented and _DOCUMENTED_AS.get(name) not in documented:
            logger.warning("public API missing from the reference (no docstring?): %s", name)


def setup(app: Sphinx) -> dict[str, object]:
    app.add_directive("pgwarden-settings", SettingsTable)
    app.connect("env-check-consistency", _check_complete)
    return {"parallel_read_safe": True}
