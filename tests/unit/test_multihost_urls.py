"""Multi-host URLs (``host=a,b``, ``postgresql://h1:p1,h2:p2/db``), as failover setups
write them: settings accept them as they are, and no form leaks its password.

The host list itself goes to libpq unchanged (psycopg splits it into one attempt per host,
in order); these tests cover what pgwarden does with the string: parse the password out
to mask it anywhere, show a redacted URL, keep the hosts readable.
"""

from __future__ import annotations

import pytest

from pgwarden import Settings
from pgwarden._handle.config import connect_kwargs, password_of
from pgwarden._redact import redact

SECRET = "s3cr3t-pw"

#: (url, what redact() must turn it into)
FORMS = [
    (
        f"postgresql://app:{SECRET}@10.0.0.1:5432,10.0.0.2:5433/shop?target_session_attrs=read-write",
        "postgresql://app:***@10.0.0.1:5432,10.0.0.2:5433/shop?target_session_attrs=read-write",
    ),
    (
        f"postgres://app:{SECRET}@db-a.internal,db-b.internal/shop",
        "postgres://app:***@db-a.internal,db-b.internal/shop",
    ),
    (
        f"postgresql://app:{SECRET}@[::1]:5432,[::1]:5433/shop",
        "postgresql://app:***@[::1]:5432,[::1]:5433/shop",
    ),
    (
        f"postgresql://app@h1:5432,h2:5432/shop?password={SECRET}&target_session_attrs=read-write",
        "postgresql://app@h1:5432,h2:5432/shop?password=***&target_session_attrs=read-write",
    ),
    (
        f"host=h1,h2 port=5432,5433 user=app password={SECRET} target_session_attrs=read-write",
        "host=h1,h2 port=5432,5433 user=app password=*** target_session_attrs=read-write",
    ),
    (
        f"host=h1,h2 port=5432 password='{SECRET} x' dbname=shop",
        "host=h1,h2 port=5432 password=*** dbname=shop",
    ),
]


@pytest.mark.parametrize(("url", "shown"), FORMS)
def test_redact_masks_the_password_and_keeps_the_hosts(url: str, shown: str) -> None:
    assert redact(url) == shown


@pytest.mark.parametrize(("url", "shown"), FORMS)
def test_password_of_finds_it_in_every_form(url: str, shown: str) -> None:
    found = password_of(url)
    assert found is not None
    assert found.startswith(SECRET)
    # Echoed anywhere else (psycopg sometimes repeats parts of the conninfo), it is masked.
    assert SECRET not in redact(f"connection failed near {found}", found)


def test_a_percent_encoded_password_is_masked_decoded_too() -> None:
    url = "postgresql://app:p%40ss%2Cword@h1:5432,h2:5433/shop"
    assert password_of(url) == "p@ss,word"
    assert redact(url) == "postgresql://app:***@h1:5432,h2:5433/shop"
    assert "p@ss,word" not in redact("echo: p@ss,word", password_of(url))


@pytest.mark.parametrize(("url", "shown"), FORMS)
def test_settings_take_multi_host_urls_unchanged(url: str, shown: str) -> None:
    settings = Settings(url=url)
    assert settings.url == url  # handed to libpq as it is: it tries the hosts in order
    assert settings.safe_url == shown
    assert SECRET not in repr(settings)
    from_env = Settings.from_env({"DATABASE_URL": url})
    assert from_env.url == url
    assert SECRET not in repr(from_env)
    # The per-connection keywords never carry or override the host list.
    kwargs = connect_kwargs(settings, pgbouncer=False)
    assert not {"host", "hostaddr", "port", "target_session_attrs"} & set(kwargs)


def test_a_url_without_password_is_left_readable() -> None:
    url = "postgresql://app@h1:5432,h2:5433/shop?target_session_attrs=read-write"
    assert password_of(url) is None
    assert redact(url) == url
    assert Settings(url=url).safe_url == url
