"""Rotating credentials against a real server: a role whose password changes mid-run.

`Settings.credentials` is called for every new connection (the warmup's included); a
password rejected after a rotation (28P01) fails with an error naming the role, and the
handle recovers as soon as the callable returns the new one. No password shows in logs,
errors, health, stats or repr.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

from pgwarden import AsyncDatabase, Database, Settings


@dataclass
class Rotating:
    """A credentials callable over a password that the test changes."""

    current: str
    calls: int = 0
    seen: list[str] = field(default_factory=list)

    def __call__(self) -> str:
        self.calls += 1
        self.seen.append(self.current)
        return self.current

    __hash__ = object.__hash__  # a dataclass with eq would be unhashable


@dataclass(frozen=True)
class Role:
    name: str
    password: str
    url: str  # no password in it


@pytest.fixture
def role(pg_server: Any) -> Iterator[Role]:
    suffix = uuid.uuid4().hex[:10]
    name = f"pgw_rot_{suffix}"
    password = f"Old-{secrets.token_hex(10)}"
    pg_server.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
    yield Role(name, password, pg_server.url_for(user=name))
    pg_server.execute(
        f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{name}'"
    )
    pg_server.execute(f"DROP ROLE IF EXISTS {name}")


def rotate(pg_server: Any, role: Role) -> str:
    """Change the role's password and end its sessions (so new connections are needed)."""
    new = f"New-{secrets.token_hex(10)}"
    pg_server.execute(f"ALTER ROLE {role.name} PASSWORD '{new}'")
    pg_server.execute(
        f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role.name}'"
    )
    return new


def settings_for(role: Role, source: Any) -> Settings:
    # Timeouts long enough that "fails fast" and "waited them out" differ by far.
    return Settings(
        url=role.url, credentials=source, acquire_timeout=10.0, ready_timeout=10.0, max_size=2
    )


def assert_nowhere(texts: list[str], *passwords: str) -> None:
    for text in texts:
        for password in passwords:
            assert password not in text


def test_rotation_fails_clearly_then_recovers(
    pg_server: Any, role: Role, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    source = Rotating(role.password)
    db = Database(settings_for(role, source))
    try:
        assert db.fetchval("SELECT current_user") == role.name
        assert source.calls >= 1  # the warmup's connection asked it

        new = rotate(pg_server, role)  # the callable still returns the old password
        started = time.monotonic()
        with pytest.raises(Exception) as failure:
            db.fetchval("SELECT 1")
        failed_after = time.monotonic() - started
        chain = [failure.value, failure.value.__cause__, getattr(failure.value, "last_error", None)]
        described = " | ".join(str(e) for e in chain if e is not None)
        assert "password authentication failed" in described
        assert role.name in described
        assert any(getattr(e, "sqlstate", None) == "28P01" for e in chain)
        assert "rejected this handle's login" in described
        # Fails fast: not after waiting out acquire_timeout for a pool that cannot grow.
        assert failed_after < db.settings.acquire_timeout / 4, failed_after

        calls_before = source.calls
        source.current = new
        recovered_at = None
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            try:
                assert db.fetchval("SELECT current_user") == role.name
                recovered_at = time.monotonic()
                break
            except Exception:
                time.sleep(0.05)
        assert recovered_at is not None, "the handle did not recover with the new password"
        # Recovers at the next connect attempt, not after a breaker cooldown or backoff.
        assert recovered_at - (deadline - 5.0) < 2.0
        assert source.calls > calls_before  # it was asked again, not a cached password
        assert source.seen[-1] == new

        texts = [
            caplog.text,
            repr(db.settings),
            str(db.health()),
            str(db.stats()),
            described,
            repr(failure.value),
        ]
        assert_nowhere(texts, role.password, new)
        assert "credentials=<Rotating>" in repr(db.settings)
    finally:
        db.close()


def test_warmup_with_rejected_password_ends_at_once_then_recovers(role: Role) -> None:
    wrong = "not-the-password-" + secrets.token_hex(6)
    source = Rotating(wrong)
    db = Database(settings_for(role, source))
    try:
        started = time.monotonic()
        with pytest.raises(Exception) as failure:
            db.ready()
        # 28P01 is permanent: the warmup does not retry it until ready_timeout.
        assert time.monotonic() - started < db.settings.ready_timeout / 4
        assert "password authentication failed" in str(failure.value)
        assert role.name in str(failure.value)
        assert wrong not in str(failure.value) + repr(failure.value.__cause__)
        source.current = role.password
        assert db.fetchval("SELECT current_user") == role.name
    finally:
        db.close()


def test_sync_handle_rejects_an_async_callable(role: Role) -> None:
    async def token() -> str:
        return role.password

    db = Database(settings_for(role, token))
    try:
        with pytest.raises(Exception, match="cannot await"):
            db.ready()
    finally:
        db.close()


def test_mapping_overrides_url_parameters(pg_server: Any, role: Role) -> None:
    # The URL names another user; the callable supplies the whole login.
    def login() -> dict[str, str]:
        return {"user": role.name, "password": role.password}

    db = Database(Settings(url=pg_server.url_for(user="nobody_here"), credentials=login))
    try:
        assert db.fetchval("SELECT current_user") == role.name
    finally:
        db.close()


def test_async_handle_awaits_an_async_callable(pg_server: Any, role: Role) -> None:
    calls: list[float] = []

    async def token() -> str:
        await asyncio.sleep(0)
        calls.append(time.monotonic())
        return role.password

    async def main() -> None:
        db = AsyncDatabase(settings_for(role, token))
        try:
            assert await db.fetchval("SELECT current_user") == role.name
        finally:
            await db.close()

    asyncio.run(main())
    assert calls


def test_callable_failure_is_a_connect_failure_without_its_text(role: Role) -> None:
    secret = "leaky-" + secrets.token_hex(8)

    def broken() -> str:
        raise RuntimeError(f"vault said no; token was {secret}")

    db = Database(settings_for(role, broken))
    try:
        with pytest.raises(Exception) as failure:
            db.ready()
        assert isinstance(failure.value.__cause__, psycopg.OperationalError)
        assert "credentials callable failed (RuntimeError)" in str(failure.value)
        assert secret not in str(failure.value) + repr(failure.value.__cause__)
    finally:
        db.close()


def test_async_handle_fails_fast_after_rotation_then_recovers(pg_server: Any, role: Role) -> None:
    source = Rotating(role.password)

    async def main() -> tuple[float, str]:
        db = AsyncDatabase(settings_for(role, source))
        try:
            assert await db.fetchval("SELECT current_user") == role.name
            new = rotate(pg_server, role)
            started = time.monotonic()
            with pytest.raises(psycopg.errors.InvalidPassword) as failure:
                await db.fetchval("SELECT 1")
            failed_after = time.monotonic() - started
            source.current = new
            deadline = time.monotonic() + 5.0
            while True:
                try:
                    assert await db.fetchval("SELECT current_user") == role.name
                    break
                except psycopg.Error:
                    assert time.monotonic() < deadline, "no recovery with the new password"
                    await asyncio.sleep(0.05)
            health = await db.health()
            return failed_after, str(failure.value) + repr(failure.value) + str(health)
        finally:
            await db.close()

    failed_after, shown = asyncio.run(main())
    assert failed_after < settings_for(role, source).acquire_timeout / 4
    assert role.name in shown
    assert role.password not in shown
    assert source.seen[-1] not in shown
