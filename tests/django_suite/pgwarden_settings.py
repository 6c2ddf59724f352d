"""Settings for Django's own test suite (``tests/runtests.py --settings=pgwarden_settings``).

The server comes from ``PGWARDEN_TEST_DJANGO_URL`` (the throwaway server of
``tests/integration/test_django_suite.py``); ``PGWARDEN_TEST_DJANGO_ENGINE`` may name
Django's own backend instead, for a baseline run of the same apps. Django's suite needs
two databases, ``default`` and ``other``; its runner creates ``test_<NAME>`` for each.
"""

from __future__ import annotations

import os
from typing import Any

from psycopg.conninfo import conninfo_to_dict

_URL = os.environ["PGWARDEN_TEST_DJANGO_URL"]
_ENGINE = os.environ.get("PGWARDEN_TEST_DJANGO_ENGINE", "pgwarden.django")
_PARTS = conninfo_to_dict(_URL)


def _database(name: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if _ENGINE == "pgwarden.django":
        # The suite holds one connection per test class (TestCase's transaction) for far
        # longer than a request: not a leak worth a warning.
        options["pgwarden"] = {"leak_threshold": 3600.0}
    return {
        "ENGINE": _ENGINE,
        "NAME": name,
        "USER": _PARTS.get("user", "postgres"),
        "PASSWORD": _PARTS.get("password", ""),
        "HOST": _PARTS.get("host", "127.0.0.1"),
        "PORT": _PARTS.get("port", "5432"),
        "OPTIONS": options,
    }


DATABASES = {"default": _database("django_tests"), "other": _database("django_other")}

SECRET_KEY = "django_tests_secret_key"

# A fast hasher, as Django's sample test settings use.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

USE_TZ = False
TEST_RUNNER = "pgwarden_runner.PgwardenRunner"
