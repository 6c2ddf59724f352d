"""Rotating credentials, pure parts: the settings field, the connect parameters a
callable's result becomes, masking, login-rejection detection, and the token cache
and rate bound of `pgwarden.aws` on a fake clock (no AWS)."""

from __future__ import annotations

import importlib.util
import secrets
from typing import Any

import psycopg
import pytest

from pgwarden import Settings, SettingsError, aws
from pgwarden._async.pool import login_rejection
from pgwarden._handle.config import CREDENTIALS_KEY, connect_kwargs, credential_params
from pgwarden._redact import RECENT_SECRETS, mask_secret, redact
from pgwarden.core.credentials import TokenBucket, TokenCache


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def secret() -> str:
    return "s3cr3t-" + secrets.token_hex(8)


# --- Settings.credentials --------------------------------------------------------------------


def test_settings_with_the_same_callable_are_one_handle_key() -> None:
    def one() -> str:
        return "a"

    def other() -> str:
        return "a"

    assert Settings(credentials=one) == Settings(credentials=one)
    assert hash(Settings(credentials=one)) == hash(Settings(credentials=one))
    assert Settings(credentials=one) != Settings(credentials=other)
    assert Settings(credentials=one) != Settings()


def test_settings_repr_names_the_callable_only() -> None:
    password = secret()

    class Holder:
        def __call__(self) -> str:
            return password

        def __repr__(self) -> str:
            return f"Holder({password})"

    shown = repr(Settings(credentials=Holder()))
    assert "credentials=<" in shown
    assert "Holder" in shown
    assert password not in shown


def test_settings_reject_non_callable_and_unhashable_credentials() -> None:
    with pytest.raises(SettingsError, match="credentials: must be a callable"):
        Settings(credentials="hunter2")  # type: ignore[arg-type]

    class Unhashable:
        __hash__ = None  # type: ignore[assignment]

        def __call__(self) -> str:
            return "x"

    with pytest.raises(SettingsError, match="must be hashable"):
        Settings(credentials=Unhashable())


def test_connect_kwargs_carry_the_callable_not_a_value() -> None:
    def source() -> str:
        raise AssertionError("called while building arguments")

    assert connect_kwargs(Settings(credentials=source), pgbouncer=False)[CREDENTIALS_KEY] is source
    assert CREDENTIALS_KEY not in connect_kwargs(Settings(), pgbouncer=False)


# --- what a callable returns -----------------------------------------------------------------


def test_a_string_is_the_password_and_a_mapping_the_parameters() -> None:
    password = secret()
    assert credential_params(password) == {"password": password}
    assert credential_params({"user": "u", "password": password, "port": 6432}) == {
        "user": "u",
        "password": password,
        "port": 6432,
    }
    with pytest.raises(TypeError, match="not bytes"):
        credential_params(password.encode())


def test_a_returned_password_is_masked_in_later_text() -> None:
    password = secret()
    text = f'FATAL: something echoed "{password}"'
    assert password in redact(text)
    credential_params(password)
    assert password not in redact(text)
    assert password not in redact(text.upper().replace(password.upper(), password))


def test_masking_keeps_a_bounded_number_of_secrets() -> None:
    first = secret()
    mask_secret(first)
    for _ in range(RECENT_SECRETS):
        mask_secret(secret())
    assert first in redact(first)  # forgotten after RECENT_SECRETS newer ones


# --- login rejection -------------------------------------------------------------------------


def test_login_rejection_by_sqlstate_and_by_libpq_text() -> None:
    assert login_rejection(psycopg.errors.InvalidPassword("x")) == "28P01"
    assert login_rejection(psycopg.errors.InvalidAuthorizationSpecification("x")) == "28000"
    assert login_rejection(psycopg.errors.TooManyConnections("x")) is None
    text = 'connection failed: FATAL:  password authentication failed for user "app"'
    assert login_rejection(psycopg.OperationalError(text)) == "28P01"
    assert login_rejection(psycopg.OperationalError("FATAL: PAM authentication failed")) == "28P01"
    assert login_rejection(psycopg.OperationalError("no pg_hba.conf entry for host")) == "28000"
    competing = "The IAM authentication failed because of too many competing requests"
    assert login_rejection(psycopg.OperationalError(competing)) is None
    assert login_rejection(psycopg.OperationalError("connection refused")) is None


# --- TokenCache ------------------------------------------------------------------------------


def test_token_cache_reuses_then_refreshes_and_falls_back_to_a_valid_old_one() -> None:
    cache = TokenCache(refresh_after=600.0, lifetime=900.0, grace=30.0)
    assert cache.current(0.0) is None
    cache.store("t1", issued_at=0.0)
    assert cache.current(599.0) == "t1"
    assert cache.current(600.0) is None  # time to make a new one
    assert cache.usable_old(869.0) == "t1"
    assert cache.usable_old(870.0) is None  # would expire during the handshake


def test_token_cache_rejects_a_refresh_after_its_expiry() -> None:
    with pytest.raises(ValueError):
        TokenCache(refresh_after=900.0, lifetime=900.0)


# --- TokenBucket -----------------------------------------------------------------------------


def test_bucket_allows_a_burst_then_spaces_callers_at_the_rate() -> None:
    bucket = TokenBucket(rate=100.0, burst=5.0)
    assert [bucket.reserve(0.0) for _ in range(5)] == [0.0] * 5
    delays = [bucket.reserve(0.0) for _ in range(3)]
    assert delays == pytest.approx([0.01, 0.02, 0.03])
    # The reserved slots are paid back before new ones: after 0.03 s the queue is empty.
    assert bucket.reserve(0.03) == pytest.approx(0.01)


def test_bucket_rate_over_a_long_run_is_bounded() -> None:
    rate, burst = 200.0, 10.0
    bucket = TokenBucket(rate=rate, burst=burst)
    # 10 000 callers arriving at once: the last may start only after (n - burst) / rate.
    last = max(bucket.reserve(0.0) for _ in range(10_000))
    assert last == pytest.approx((10_000 - burst) / rate)


def test_bucket_refills_up_to_its_burst_only() -> None:
    bucket = TokenBucket(rate=10.0, burst=2.0)
    bucket.reserve(0.0)
    assert [bucket.reserve(100.0) for _ in range(3)] == pytest.approx([0.0, 0.0, 0.1])


# --- RdsIamToken (fake generator and clock) --------------------------------------------------


class FakeSigner:
    def __init__(self) -> None:
        self.made = 0
        self.fail = False

    def __call__(self) -> str:
        if self.fail:
            raise RuntimeError("no credentials")
        self.made += 1
        return f"token-{self.made}"


@pytest.fixture
def fast_bucket() -> object:
    aws.set_connection_rate(1e9, burst=1e9)
    yield
    aws.set_connection_rate(aws.DEFAULT_RATE, aws.DEFAULT_BURST)


def test_iam_token_is_cached_and_refreshed_before_expiry(fast_bucket: object) -> None:
    clock, signer = FakeClock(), FakeSigner()
    token = aws.RdsIamToken("db.example", 5432, "app", "eu-west-1", generate=signer, clock=clock)
    assert [token() for _ in range(50)] == ["token-1"] * 50
    clock.now += aws.IAM_TOKEN_REFRESH_AFTER - 1
    assert token() == "token-1"
    clock.now += 1
    assert token() == "token-2"
    assert signer.made == 2


def test_iam_token_keeps_a_valid_old_token_when_signing_fails(fast_bucket: object) -> None:
    clock, signer = FakeClock(), FakeSigner()
    token = aws.RdsIamToken("db.example", 5432, "app", generate=signer, clock=clock)
    assert token() == "token-1"
    signer.fail = True
    clock.now += aws.IAM_TOKEN_REFRESH_AFTER + 60
    assert token() == "token-1"  # still valid for minutes
    clock.now += aws.IAM_TOKEN_LIFETIME
    with pytest.raises(RuntimeError):
        token()


def test_iam_token_calls_share_the_process_rate(fast_bucket: object) -> None:
    aws.set_connection_rate(50.0, burst=3.0)
    clock = FakeClock()
    # Reserve as callers would, at one instant: past the burst each one waits longer.
    delays = [aws._reserve_slot(clock()) for _ in range(6)]
    assert delays[:3] == [0.0, 0.0, 0.0]
    assert delays[3:] == pytest.approx([0.02, 0.04, 0.06])


def test_iam_token_repr_never_shows_the_token(fast_bucket: object) -> None:
    token = aws.RdsIamToken("db.example", 5432, "app", generate=lambda: "tok-SECRET-x")
    assert token() == "tok-SECRET-x"
    assert "SECRET" not in repr(token) + repr(Settings(credentials=token))


def test_async_variant_awaits_the_same_cache(fast_bucket: object) -> None:
    import asyncio

    signer = FakeSigner()
    token = aws.RdsIamToken("db.example", 5432, "app", generate=signer)

    async def main() -> list[str]:
        return [await token.call_async() for _ in range(3)]

    assert asyncio.run(main()) == ["token-1"] * 3
    assert Settings(credentials=token.call_async) == Settings(credentials=token.call_async)


@pytest.mark.skipif(importlib.util.find_spec("botocore") is None, reason="needs botocore")
def test_botocore_signs_a_token_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # Signing is local: fake credentials make a well-formed token without any network.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    token = aws.rds_iam_token("db.example.eu-west-1.rds.amazonaws.com", 5432, "app", "eu-west-1")
    assert token is aws.rds_iam_token(
        "db.example.eu-west-1.rds.amazonaws.com", 5432, "app", "eu-west-1"
    )
    value = token.token()
    assert value.startswith("db.example.eu-west-1.rds.amazonaws.com:5432/?Action=connect")
    assert "DBUser=app" in value
    assert "X-Amz-Signature=" in value


def test_without_botocore_the_helper_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "botocore" else real_find_spec(name, *args)

    # As if botocore were not installed (the test suite installs it, extra "aws").
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ImportError, match=r"pgwarden\[aws\]"):
        aws.rds_iam_token("db.example", 5432, "app")
