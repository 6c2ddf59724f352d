"""What SQL text says about a statement: might it change data?

`is_write_sql` is a cheap lexer-level guess, cached per text; `query_is_write`
applies it to a query of any type. Used on every call (`pgwarden.core.resend`
decides from it how a statement is sent), apart from the failure classifier.
"""

from __future__ import annotations

import functools
import re
from typing import Final

__all__ = ["is_write_sql", "query_is_write"]


# One token per match: a comment or literal (skipped), a word, a paren or a
# semicolon. Block comments and dollar quotes are only *opened* here, because
# they need a scan for their end (block comments nest). Identifiers are
# spelled with \w: explicit Unicode ranges took ~13 ms to compile at import.
_TOKEN_RE: Final = re.compile(
    r"""
      (?P<skip> --[^\n]*
              | [Ee]'(?:[^'\\]|\\.|'')*'?
              | '(?:[^']|'')*'?
              | "(?:[^"]|"")*"?
              )
    | (?P<block> /\* )
    | (?P<dollar> \$(?:[^\W\d]\w*)?\$ )
    | (?P<word> [^\W\d][\w$]* )
    | (?P<punct> [();] )
    """,
    re.VERBOSE | re.DOTALL,
)


# Compiled on first use: only a statement with a block comment needs it.
@functools.cache
def _block_re() -> re.Pattern[str]:
    return re.compile(r"/\*|\*/")


_READ_HEADS: Final = frozenset({"SELECT", "VALUES", "TABLE", "SHOW"})
_WRITE_WORDS: Final = frozenset({"INSERT", "UPDATE", "DELETE", "MERGE", "INTO"})
_ANALYZE: Final = frozenset({"ANALYZE", "ANALYSE"})
_OFF: Final = frozenset({"FALSE", "OFF"})
_EXPLAIN_BARE_OPTIONS: Final = _ANALYZE | {"VERBOSE"}


def _tokens(sql: str) -> list[str]:
    """Upper-cased words plus ``(``, ``)`` and ``;``, outside comments and literals."""
    out: list[str] = []
    pos = 0
    end = len(sql)
    while pos < end:
        m = _TOKEN_RE.search(sql, pos)
        if m is None:
            break
        kind = m.lastgroup
        pos = m.end()
        if kind == "word" or kind == "punct":
            out.append(m.group().upper())
        elif kind == "block":
            depth = 1
            block_re = _block_re()
            while depth:
                b = block_re.search(sql, pos)
                if b is None:
                    return out
                depth += 1 if b.group() == "/*" else -1
                pos = b.end()
        elif kind == "dollar":
            close = sql.find(m.group(), pos)
            if close < 0:
                return out
            pos = close + len(m.group())
    return out


def _statement_writes(words: list[str]) -> bool:
    i = 0
    while i < len(words) and words[i] == "(":
        i += 1
    if i == len(words):
        return False
    head = words[i]
    if head in _READ_HEADS:
        # SELECT ... INTO creates a table; nothing else a plain SELECT can write
        # (functions with side effects are invisible to a lexer).
        return "INTO" in words[i:]
    if head == "WITH":
        return any(
            w in _WRITE_WORDS and not (w == "UPDATE" and words[j - 1] in ("FOR", "KEY"))
            for j, w in enumerate(words[i:], start=i)
        )
    if head == "EXPLAIN":
        return _explain_writes(words, i + 1)
    return True


def _explain_writes(words: list[str], i: int) -> bool:
    """EXPLAIN runs nothing; EXPLAIN ANALYZE runs the statement it explains."""
    analyze = False
    if i < len(words) and words[i] == "(":
        depth = 0
        while i < len(words):
            w = words[i]
            depth += (w == "(") - (w == ")")
            if w in _ANALYZE and not (i + 1 < len(words) and words[i + 1] in _OFF):
                analyze = True
            i += 1
            if depth == 0:
                break
    else:
        while i < len(words) and words[i] in _EXPLAIN_BARE_OPTIONS:
            analyze = analyze or words[i] in _ANALYZE
            i += 1
    return analyze and _statement_writes(words[i:])


@functools.lru_cache(maxsize=1024)
def is_write_sql(sql: str) -> bool:
    """Might *sql* change data? A cheap, conservative lexer-level guess.

    Read: statements starting (after comments, whitespace and parentheses)
    with SELECT (without INTO), VALUES, TABLE, SHOW, EXPLAIN without ANALYZE,
    EXPLAIN ANALYZE of a read, and WITH queries with no INSERT, UPDATE (other
    than FOR [NO KEY] UPDATE), DELETE, MERGE or INTO. Everything else is a
    write, and so is a string with several statements if any one writes.
    Literals, quoted identifiers and comments are skipped. Results are cached
    (1024 entries), since the same SQL text recurs.
    """
    statement: list[str] = []
    for word in _tokens(sql):
        if word == ";":
            if _statement_writes(statement):
                return True
            statement = []
        else:
            statement.append(word)
    return _statement_writes(statement)


def query_is_write(query: object) -> bool:
    """May the statement change data? By its text (:func:`is_write_sql`) for
    ``str`` and ``bytes``; any other query (a composed one) is assumed to."""
    if isinstance(query, str):
        return is_write_sql(query)
    if isinstance(query, bytes):
        return is_write_sql(query.decode(errors="replace"))
    return True
