"""Settings: defaults, environment, validation messages without secrets."""

from __future__ import annotations

import pytest

from pgwarden import Settings, SettingsError
from pgwarden._handle.state import HandleState
from pgwarden._redact import redact, sanitize_sql

URL = "postgresql://app:hunter2-secret@db.example:5432/shop"


def test_defaults_are_documented_and_valid() -> None:
    s = Settings()
    assert s.min_size == 0
    assert s.url is None
    for name, _default, reason in Settings.describe():
        assert reason, f"{name} has no documented reason"


def test_environment_and_overrides() -> None:
    env = {
        "DATABASE_URL": URL,
        "PGWARDEN_MAX_SIZE": "20",
        "PGWARDEN_DEFAULT_TIMEOUT": "2.5",
        "PGWARDEN_ADAPTIVE_SIZING": "false",
        "PGWARDEN_PROBE_QUERY": "SELECT 1",
        "PGWARDEN_TEST_PG_BINDIR": "/ignored/by/settings",
        "OTHER": "x",
    }
    s = Settings.from_env(env, min_size=2)
    assert (s.url, s.max_size, s.default_timeout, s.adaptive_sizing) == (URL, 20, 2.5, False)
    assert s.min_size == 2
    assert s.probe_query == "SELECT 1"
    assert Settings.from_env(env, url="postgresql://other/db").url == "postgresql://other/db"


def test_unknown_and_malformed_environment_raise_clearly() -> None:
    with pytest.raises(SettingsError, match="PGWARDEN_MAX_SIZ"):
        Settings.from_env({"PGWARDEN_MAX_SIZ": "3"})
    with pytest.raises(SettingsError, match="PGWARDEN_MAX_SIZE='lots'"):
        Settings.from_env({"PGWARDEN_MAX_SIZE": "lots"})
    with pytest.raises(SettingsError, match="unknown setting"):
        Settings.from_env({}, max_sise=3)


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"max_size": 0}, "max_size"),
        ({"min_size": 5, "max_size": 2}, "min_size"),
        ({"acquire_timeout": -1}, "acquire_timeout"),
        ({"lifetime_jitter": 1.5}, "lifetime_jitter"),
        ({"pgbouncer": "maybe"}, "pgbouncer"),
        ({"retry_attempts": 0}, "retry_attempts"),
        ({"breaker_max_cooldown": 0.1, "breaker_cooldown": 1.0}, "breaker_max_cooldown"),
        ({"probe_query": "  "}, "probe_query"),
    ],
)
def test_validation_names_the_setting(overrides: dict[str, object], name: str) -> None:
    with pytest.raises(SettingsError, match=f"invalid setting {name}="):
        Settings(url=URL, **overrides)  # type: ignore[arg-type]


def test_secrets_never_printed() -> None:
    s = Settings(url=URL)
    assert "hunter2-secret" not in repr(s)
    assert "hunter2-secret" not in s.safe_url
    with pytest.raises(SettingsError) as info:
        Settings(url=12345)  # type: ignore[arg-type]
    assert "hunter2" not in str(info.value)


def test_settings_are_frozen_and_hashable() -> None:
    a, b = Settings(url=URL, max_size=3), Settings(url=URL, max_size=3)
    assert a == b
    assert hash(a) == hash(b)
    with pytest.raises(AttributeError):
        a.max_size = 4  # type: ignore[misc]
    assert a.replace(max_size=4).max_size == 4


def test_lifetime_jitter_spreads_processes() -> None:
    lifetimes = {HandleState(Settings(url=URL)).max_lifetime for _ in range(50)}
    assert len(lifetimes) > 40
    assert all(1800 * 0.8 <= t <= 1800 for t in lifetimes)


def test_redaction_forms() -> None:
    assert redact(URL) == "postgresql://app:***@db.example:5432/shop"
    assert redact("host=x password=s3cr3t user=u") == "host=x password=*** user=u"
    assert redact("host=x password='a b' user=u") == "host=x password=*** user=u"
    assert redact("postgresql://h/db?password=abc&x=1") == "postgresql://h/db?password=***&x=1"
    assert redact("error mentioning s3cr3t-value", "s3cr3t-value") == "error mentioning ***"


def test_sanitize_sql_drops_literals() -> None:
    text = sanitize_sql("SELECT * FROM t WHERE token = 'abc''def' AND n = 42 AND $$x$$ = b")
    assert "abc" not in text
    assert "42" not in text
    assert "x$$" not in text
    assert sanitize_sql("x" * 500, limit=50).endswith("…")
