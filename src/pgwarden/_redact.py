"""Remove secrets from connection strings and error text.

Every message pgwarden logs or raises that might contain a DSN passes through
:func:`redact`. It handles URLs (``postgresql://user:secret@host``), key=value
conninfo strings (``password=secret``) and a known password value anywhere in
free text (psycopg sometimes echoes parts of the conninfo back).
"""

from __future__ import annotations

import functools
import re
from collections import deque

__all__ = ["mask_secret", "redact", "sanitize_sql"]

MASK = "***"

#: How many secrets from credentials callables `redact` keeps masking: the current one and
#: those before it (a rotation, an IAM token per host), not every token of a long run.
RECENT_SECRETS = 32

# Secrets that reached a connect without being in any URL (what `Settings.credentials`
# returned). Held only to mask them; a deque's append is atomic under threads.
_recent: deque[str] = deque(maxlen=RECENT_SECRETS)


def mask_secret(secret: str) -> None:
    """Make every later `redact` mask *secret* too (a password handed to a connect)."""
    if secret not in _recent:
        _recent.append(secret)


@functools.cache
def _password_patterns() -> tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str]]:
    # Compiled on first use, not at import: a process whose first query logs and raises
    # nothing never needs them.
    url = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:@/\s]*):(?P<pw>[^@\s]*)@")
    key_value = re.compile(
        r"(?P<key>(?<![?&])\bpassword\s*=\s*)(?P<val>'(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE
    )
    query = re.compile(r"(?P<key>[?&]password=)(?P<val>[^&\s]+)", re.IGNORECASE)
    return url, key_value, query


def redact(text: str, *secrets: str | None) -> str:
    """Return *text* with URL passwords, ``password=`` pairs and every given
    secret value masked. Empty or very short secrets are ignored to avoid
    masking ordinary words."""
    # A password found in the text is masked wherever else it appears too (a
    # database or user name that repeats it, an echoed fragment).
    url, key_value, query = _password_patterns()
    found = [m["pw"] for m in url.finditer(text)]
    found += [m["val"].strip("'") for m in key_value.finditer(text)]
    found += [m["val"] for m in query.finditer(text)]
    out = url.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    out = key_value.sub(lambda m: f"{m['key']}{MASK}", out)
    out = query.sub(lambda m: f"{m['key']}{MASK}", out)
    for secret in (*secrets, *found, *_recent):
        if secret and len(secret) >= 3:
            out = out.replace(secret, MASK)
    return out


@functools.cache
def _sql_patterns() -> tuple[re.Pattern[str], re.Pattern[str]]:
    literal = re.compile(
        r"'(?:[^']|'')*'"  # string literals
        r"|\$(?P<tag>[A-Za-z_]*)\$.*?\$(?P=tag)\$"  # dollar-quoted strings
        r"|\b\d+(?:\.\d+)?\b",  # numbers
        re.DOTALL,
    )
    return literal, re.compile(r"\s+")


def sanitize_sql(sql: object, limit: int = 200) -> str:
    """Statement text safe to log: literals become ``?``, whitespace folds, long text is cut.

    Parameters are never part of the text psycopg sends separately, but
    literals written into the SQL itself may hold secrets, so they go too.
    """
    text = sql.decode(errors="replace") if isinstance(sql, bytes) else str(sql)
    literal, whitespace = _sql_patterns()
    text = whitespace.sub(" ", literal.sub("?", text)).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"
