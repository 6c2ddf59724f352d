"""Remove secrets from connection strings and error text.

Every message pgwarden logs or raises that might contain a DSN passes through
:func:`redact`. It handles URLs (``postgresql://user:secret@host``), key=value
conninfo strings (``password=secret``) and a known password value anywhere in
free text (psycopg sometimes echoes parts of the conninfo back).
"""

from __future__ import annotations

import re

__all__ = ["redact", "sanitize_sql"]

MASK = "***"

_URL_PASSWORD = re.compile(
    r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:@/\s]*):(?P<pw>[^@\s]*)@"
)
_KV_PASSWORD = re.compile(
    r"(?P<key>(?<![?&])\bpassword\s*=\s*)(?P<val>'(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE
)
_QUERY_PASSWORD = re.compile(r"(?P<key>[?&]password=)(?P<val>[^&\s]+)", re.IGNORECASE)


def redact(text: str, *secrets: str | None) -> str:
    """Return *text* with URL passwords, ``password=`` pairs and every given
    secret value masked. Empty or very short secrets are ignored to avoid
    masking ordinary words."""
    # A password found in the text is masked wherever else it appears too (a
    # database or user name that repeats it, an echoed fragment).
    found = [m["pw"] for m in _URL_PASSWORD.finditer(text)]
    found += [m["val"].strip("'") for m in _KV_PASSWORD.finditer(text)]
    found += [m["val"] for m in _QUERY_PASSWORD.finditer(text)]
    out = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    out = _KV_PASSWORD.sub(lambda m: f"{m['key']}{MASK}", out)
    out = _QUERY_PASSWORD.sub(lambda m: f"{m['key']}{MASK}", out)
    for secret in (*secrets, *found):
        if secret and len(secret) >= 3:
            out = out.replace(secret, MASK)
    return out


_SQL_LITERAL = re.compile(
    r"'(?:[^']|'')*'"  # string literals
    r"|\$(?P<tag>[A-Za-z_]*)\$.*?\$(?P=tag)\$"  # dollar-quoted strings
    r"|\b\d+(?:\.\d+)?\b",  # numbers
    re.DOTALL,
)
_WHITESPACE = re.compile(r"\s+")


def sanitize_sql(sql: object, limit: int = 200) -> str:
    """Statement text safe to log: literals become ``?``, whitespace folds, long text is cut.

    Parameters are never part of the text psycopg sends separately, but
    literals written into the SQL itself may hold secrets, so they go too.
    """
    text = sql.decode(errors="replace") if isinstance(sql, bytes) else str(sql)
    text = _WHITESPACE.sub(" ", _SQL_LITERAL.sub("?", text)).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"
