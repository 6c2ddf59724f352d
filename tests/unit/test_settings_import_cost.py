"""`Settings` is written out by hand for a cheap import (see pgwarden/settings.py); these
pin that it still is, and behaves as, the frozen dataclass it was declared as."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import pickle
import subprocess
import sys

import pytest

from pgwarden.settings import Settings


def test_init_matches_the_fields() -> None:
    params = list(inspect.signature(Settings).parameters.values())
    fields = dataclasses.fields(Settings)
    assert [p.name for p in params] == [f.name for f in fields]
    assert [p.default for p in params] == [f.default for f in fields]
    assert [p.annotation for p in params] == [f.type for f in fields]
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params)
    assert all(getattr(Settings, f.name) == f.default for f in fields)
    assert list(vars(Settings())) == [f.name for f in fields]


def test_dataclass_view() -> None:
    assert dataclasses.is_dataclass(Settings)
    params = Settings.__dataclass_params__  # type: ignore[attr-defined]
    assert (params.init, params.repr, params.eq, params.frozen) == (True, False, False, True)
    by_name = {f.name: f for f in dataclasses.fields(Settings)}
    assert not by_name["url"].repr
    assert all(f.repr for name, f in by_name.items() if name != "url")
    assert Settings.__match_args__ == tuple(by_name)
    assert [(n, d, r) for n, d, r in Settings.describe()] == [
        (f.name, f.default, f.metadata["reason"]) for f in by_name.values()
    ]
    assert all(reason for _, _, reason in Settings.describe())


def test_dataclass_functions() -> None:
    s = Settings(url="postgresql://u:pw@h/db", max_size=20)
    assert dataclasses.asdict(s)["max_size"] == 20
    assert dataclasses.astuple(s)[3] == 20
    assert dataclasses.replace(s, min_size=2).min_size == 2
    assert s.replace(min_size=3) == Settings(url="postgresql://u:pw@h/db", max_size=20, min_size=3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        s.replace(bogus=1)
    assert pickle.loads(pickle.dumps(s)) == s  # noqa: S301 - our own bytes
    assert copy.deepcopy(s) == s
    assert hash(copy.copy(s)) == hash(s)
    assert Settings("postgresql://h/db", None, 1, 2).max_size == 2


def test_frozen() -> None:
    s = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'min_size'"):
        s.min_size = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'other'"):
        s.other = 1  # type: ignore[attr-defined]
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot delete field 'min_size'"):
        del s.min_size


def test_a_dataclass_subclass_inherits_the_fields() -> None:
    @dataclasses.dataclass(frozen=True, repr=False, eq=False)
    class Extended(Settings):
        extra: int = 1

    e = Extended(max_size=5, extra=2)
    assert [f.name for f in dataclasses.fields(e)][-2:] == ["leak_threshold", "extra"]
    assert (e.max_size, e.extra) == (5, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.extra = 3  # type: ignore[misc]


def test_import_does_not_run_dataclasses() -> None:
    # dataclasses' processing of Settings was ~3 ms of a cold start; it must stay lazy.
    code = (
        "import dataclasses\n"
        "calls = []\n"
        "real = dataclasses._process_class\n"
        "dataclasses._process_class = lambda *a, **k: calls.append(a[0]) or real(*a, **k)\n"
        "import pgwarden.settings as m\n"
        "m.Settings.from_env({'PGWARDEN_MAX_SIZE': '3'})\n"
        "assert 'Settings' not in [c.__name__ for c in calls], calls\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
